"""onnxruntime-genai folders: a decoder with the ``genai_config.json`` and tokenizer files that
``onnxruntime_genai.Model(folder)`` loads beside it.

A decoder read from such a folder (onnxruntime-genai's model builder writes them) is written back
as one: the optimized model, its ``genai_config.json`` (the decoder's file name and the target's
execution provider updated, everything else kept), and every other file of the source folder
(tokenizer, chat template, processor configs). Model files and their external data are not copied.
A transformers decoder hessc exported with its cache (``kv_cache=True``) saved to a folder gets a
config written from its transformers config and its cache's names, and the tokenizer files of the
folder it was loaded from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from hessc.errors import InputError

CONFIG = "genai_config.json"

_PROVIDERS = {"cpu": [], "onnx": [], "cuda": [{"cuda": {}}]}


def source_folder(path: str | os.PathLike | None) -> Path | None:
    """The onnxruntime-genai folder a model file sits in, or None."""
    if path is None:
        return None
    folder = Path(path).resolve().parent
    return folder if (folder / CONFIG).is_file() else None


def output_file(output: str | os.PathLike, decoder: bool, model_name: str = "model.onnx") -> Path:
    """Where the model goes: ``output`` itself, or, for a decoder written as a genai folder,
    ``output/<model_name>`` when ``output`` names a folder (an existing directory, or a path
    without ``.onnx``)."""
    out = Path(output)
    if decoder and (out.is_dir() or out.suffix != ".onnx"):
        return out / model_name
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def write_config(decoder: dict, cache, model_path: Path, target: str, in_place: bool = False) -> list[str]:
    """Writes ``genai_config.json`` for a decoder hessc exported with its cache (``decoder``:
    ``meta.DECODER_CONFIG_KEY``; ``cache``: its :class:`hessc.runtime.decoder.KVCache`), and the
    tokenizer files of the folder it was loaded from, when there is one. The cache lives in one
    preallocated buffer (``past_present_share_buffer``) when ``in_place``
    (:func:`hessc.runtime.fuse_attention.cache_in_place`: only ``GroupQueryAttention`` reads it);
    otherwise it grows each step, as the exported attention concatenates past and new keys.
    The model type is genai's generic ``decoder``: the exported graph carries the architecture
    (rotary, norms, attention), and genai's named types either mean the same plain decoder or,
    for some (``gpt2``, ``chatglm``, ``phi3small``), a builder's own cache layout; transformers
    families genai has no name for (OPT, Falcon, StableLM, OLMo-2, ...) run the same way.
    """
    def template(name: str) -> str:
        return re.sub(r"\.0\.", ".%d.", name, count=1)

    key_past, value_past = cache.pairs[0][0], cache.pairs[1][0]
    key_present, value_present = cache.pairs[0][1], cache.pairs[1][1]
    inputs = {"input_ids": cache.ids, "past_key_names": template(key_past), "past_value_names": template(value_past)}
    if cache.mask:
        inputs["attention_mask"] = cache.mask
    if cache.positions:
        inputs["position_ids"] = cache.positions
    eos = decoder.get("eos_token_id")
    config = {
        "model": {
            "bos_token_id": decoder.get("bos_token_id") if decoder.get("bos_token_id") is not None else 1,
            "context_length": decoder["context_length"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": _PROVIDERS.get(target, [])},
                "filename": model_path.name, "head_size": decoder["head_size"], "hidden_size": decoder["hidden_size"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": template(key_present),
                            "present_value_names": template(value_present)},
                "num_attention_heads": decoder["heads"], "num_hidden_layers": decoder["layers"],
                "num_key_value_heads": decoder["kv_heads"],
            },
            "eos_token_id": eos if eos is not None else 2,
            "pad_token_id": decoder.get("pad_token_id") if decoder.get("pad_token_id") is not None else (eos if eos is not None else 2),
            "type": "decoder", "vocab_size": decoder["vocab_size"],
        },
        "search": {"do_sample": False, "max_length": decoder["context_length"], "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": bool(in_place), "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    out = model_path.parent
    written = []
    source = Path(decoder["source"]) if decoder.get("source") else None
    if source is not None and source.is_dir() and source.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                _copy_atomic(source / name, out / name)
                written.append(name)
    _write_atomic(out / CONFIG, json.dumps(config, indent=4) + "\n")
    return [*written, CONFIG]


def write_folder(source: Path, model_path: Path, target: str) -> list[str]:
    """Writes the genai config and the source folder's other files beside ``model_path``.

    Returns:
        The names written beside the model.

    Raises:
        InputError: the source config is not readable JSON with a ``model.decoder`` section.
    """
    try:
        config = json.loads((source / CONFIG).read_text())
        decoder = config["model"]["decoder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{source / CONFIG} is not an onnxruntime-genai config ({e}); fix or remove it") from None
    decoder["filename"] = model_path.name
    decoder.setdefault("session_options", {})["provider_options"] = _PROVIDERS.get(target, [])
    out = model_path.parent
    written = []
    if source.resolve() != out.resolve():
        for item in sorted(source.iterdir()):
            if not item.is_file() or item.name == CONFIG or item.suffix in (".onnx", ".data") or item.name.endswith(".onnx.data"):
                continue
            _copy_atomic(item, out / item.name)
            written.append(item.name)
    _write_atomic(out / CONFIG, json.dumps(config, indent=4) + "\n")
    written.append(CONFIG)
    return written


def _atomic(dst: Path, write) -> None:
    """Writes ``dst`` through ``write(temporary path)`` and a rename, with the mode a new file
    gets (``mkstemp`` makes files only their owner reads)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_atomic(src: Path, dst: Path) -> None:
    _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def _write_atomic(dst: Path, text: str) -> None:
    _atomic(dst, lambda tmp: Path(tmp).write_text(text))
