"""onnxruntime-genai folders: a decoder with the ``genai_config.json`` and tokenizer files that
``onnxruntime_genai.Model(folder)`` loads beside it.

A decoder read from such a folder (onnxruntime-genai's model builder writes them) is written back
as one: the optimized model, its ``genai_config.json`` (the decoder's file name and the target's
execution provider updated, everything else kept), and every other file of the source folder
(tokenizer, chat template, processor configs). Model files and their external data are not copied.
"""

from __future__ import annotations

import json
import os
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


def output_file(output: str | os.PathLike, source: Path | None, model_name: str) -> Path:
    """Where the model goes: ``output`` itself, or, for a genai source, ``output/<model_name>``
    when ``output`` names a folder (an existing directory, or a path without ``.onnx``)."""
    out = Path(output)
    if source is not None and (out.is_dir() or out.suffix != ".onnx"):
        return out / model_name
    return out


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


def _readable(path: str) -> None:
    """``mkstemp`` makes files only its owner reads: give the file the mode a new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        _readable(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomic(dst: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", dir=dst.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _readable(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
