"""``python -m hessc.bench.cuda_decode``: decoding one token with a KV cache on the CUDA provider,
hessc against onnxruntime-genai's builder, on random-weight Llama models of a given shape.

For each shape (``smollm2``: SmolLM2-135M's; ``1b``: hidden 2048, 16 layers; ``tiny`` for a local
dry run) it writes a random-weight transformers checkpoint, builds genai's fp16 and int4 CUDA models
and its fp32 model, compiles the fp32 model with ``hessc.optimize(target="cuda", bits=4)``, and
times one decode step (one new token, the cache holding ``--cache`` tokens) of every variant in
ONNX Runtime with I/O binding, with CUDA graphs off and on (interleaved rounds, medians). Where
onnxruntime-genai's CUDA package is installed, each folder is also run by genai's ``Generator``
(decode tokens/s from 128 to 512 tokens). Random weights: latency and bytes only, no quality.

Needs a GPU with onnxruntime-gpu (``../shared/DEVICE.md``); ``--provider cpu`` runs the same steps
on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB = 49152


def checkpoint(shape: str, tokenizer: Path, out: Path) -> Path:
    """A random-weight (seed 0) ``LlamaForCausalLM`` of ``shape`` with a tied head, saved with the
    tokenizer files of ``tokenizer``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **SHAPES[shape], vocab_size=VOCAB, head_dim=64, max_position_embeddings=4096, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    from hessc.genai import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, out / name)
    return out


def _dims(dims: list, cache: int) -> list[int]:
    """Static dims kept; the builder's symbolic ones filled for one new token after ``cache``."""
    named = {"batch_size": 1, "sequence_length": 1, "past_sequence_length": cache,  # genai's builder
             "total_sequence_length": cache + 1, "kv_cache_dim": 64,
             "batch": 1, "sequence": 1, "past_sequence": cache, "total_sequence": cache + 1}  # hessc's export
    return [d if isinstance(d, int) else sum(named[part.strip()] for part in str(d).split("+")) for d in dims]


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32}


def step_ms(path: Path, provider: str, cache: int, graph: bool, runs: int) -> float:
    """Median ms of one decode step of ``path``: one token, ``cache`` tokens in the past, every
    input and output bound on the device (the same buffers every run, as CUDA graphs need)."""
    import onnxruntime as ort

    device = "cuda" if provider == "cuda" else "cpu"
    providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graph else "0"})] if provider == "cuda" \
        else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), ort.SessionOptions(), providers=providers)
    binding = session.io_binding()
    keep = []
    for i in session.get_inputs():
        dtype = _NUMPY[i.type]
        shape = _dims(i.shape, cache)
        if i.name == "input_ids":
            array = np.full(shape, 5, dtype)
        elif i.name == "attention_mask":
            array = np.ones(shape, dtype)
        elif i.name == "position_ids":
            array = np.full(shape, cache, dtype)
        elif "past" in i.name:
            array = (np.random.default_rng(0).standard_normal(shape) * 0.1).astype(dtype)
        else:
            raise ValueError(f"{path}: unknown input {i.name}")
        value = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
        keep.append(value)
        binding.bind_ortvalue_input(i.name, value)
    for o in session.get_outputs():
        value = ort.OrtValue.ortvalue_from_shape_and_type(_dims(o.shape, cache), _NUMPY[o.type], device, 0)
        keep.append(value)
        binding.bind_ortvalue_output(o.name, value)
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def genai_tokens_per_s(folder: Path, prompt: int = 128, total: int = 512) -> float:
    """onnxruntime-genai's ``Generator`` on ``folder``: greedy decode tokens/s from ``prompt`` to
    ``total`` tokens (after one warm-up generation)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = (np.arange(prompt) % 1000 + 10).astype(np.int32)
    rates = []
    for _ in range(2):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        start, count = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return rates[-1]


def stored_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6, 1)


def run(shape: str, work: Path, tokenizer: Path, provider: str, cache: int, rounds: int, runs: int,
        hessc_bits: list, torch_export: bool = False) -> dict:
    import hessc
    from hessc.bench import zoo

    log = {}
    started = time.perf_counter()
    hf = work / f"{shape}-hf"
    if not (hf / "config.json").exists():  # kept from an earlier call on a warm machine
        checkpoint(shape, tokenizer, hf)
    log["checkpoint_s"] = round(time.perf_counter() - started, 1)
    target = "cuda" if provider == "cuda" else "cpu"
    def built(precision: str, provider: str) -> Path:
        folder = work / f"{shape}-genai-{precision}-{provider}"
        if not (folder / "genai_config.json").exists():
            started = time.perf_counter()
            zoo.build_genai(hf, folder, precision, provider)
            log[f"build genai {precision} {provider} s"] = round(time.perf_counter() - started, 1)
        return folder

    folders = {f"genai {p}": built(p, target) for p in ("fp16", "int4")}
    fp32 = built("fp32", "cpu")
    def compile_variant(label: str, source, bits, out: Path, **extra) -> None:
        """hessc's RTN at ``bits`` of ``source`` written to the genai folder ``out``, timed."""
        started = time.perf_counter()
        compiled = hessc.optimize(source, target=target, bits=bits, method="rtn", measure_latency=False,
                                  allow_degraded=True, low_rank=False, **extra)
        shutil.rmtree(out, ignore_errors=True)
        hessc.save(compiled, out)
        folders[label] = out
        log[f"{label} s"] = round(time.perf_counter() - started, 1)

    for bits in hessc_bits:
        compile_variant(f"hessc {bits}", str(fp32 / "model.onnx"), bits, work / f"{shape}-hessc-{bits}")
    if torch_export:  # the torch front door on the same checkpoint
        import transformers

        label = f"hessc {hessc_bits[0]} from torch (kv_cache=True)"
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
            compile_variant(label, lm, hessc_bits[0], work / f"{shape}-hessc-torch-{hessc_bits[0]}", kv_cache=True)
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            log[f"{label} error"] = f"{type(e).__name__}: {str(e)[:500]}"
    rows = {label: {"variant": label, "stored_mb": stored_mb(folder)} for label, folder in folders.items()}
    for graph in ((False, True) if provider == "cuda" else (False,)):
        key = f"step_ms_cache_{cache}" + ("_cuda_graph" if graph else "")
        samples = {label: [] for label in folders}
        for _ in range(rounds):
            for label, folder in folders.items():
                try:
                    samples[label].append(step_ms(folder / "model.onnx", provider, cache, graph, runs))
                except Exception as e:  # noqa: BLE001 - recorded in the row, the other variants go on
                    rows[label][key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for label, got in samples.items():
            if got:
                rows[label][key] = round(statistics.median(got), 4)
    for label, folder in folders.items():
        try:
            rows[label]["genai_tok_s_128_to_512"] = round(genai_tokens_per_s(folder), 1)
        except Exception as e:  # noqa: BLE001
            rows[label]["genai_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return {"shape": shape, **SHAPES[shape], "vocab": VOCAB, "provider": provider, "cache": cache, "log": log,
            "rows": list(rows.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hessc.bench.cuda_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer files (tokenizer.json, ...)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the models")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--cache", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--bits", default="4", help="hessc's bits, comma-separated")
    parser.add_argument("--torch", action="store_true", help="also compile the checkpoint through the torch front door")
    args = parser.parse_args(argv)
    if args.provider == "cuda":
        import onnxruntime

        onnxruntime.preload_dlls()
    bits = [float(b) if "." in b else int(b) for b in args.bits.split(",")]
    result = run(args.shape, args.work, args.tokenizer, args.provider, args.cache, args.rounds, args.runs, bits, args.torch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
