"""``hessc bench --model smollm2 --decode``: a language model as it is served, decoding with a KV
cache in onnxruntime-genai, hessc against onnxruntime-genai's own model builder.

Every variant is an onnxruntime-genai folder run by its ``Generator``: fp32 and int4 from genai's
builder (its RTN: symmetric 4-bit blocks of 32, ``accuracy_level`` 4), and hessc at each of
``bits`` (one group size and method) compiled from the builder's fp32 folder with the zoo's calibration (token ids; hessc runs
them as prefill and continuation on the real cache). Per variant, in one run on one machine:

* stored bytes (model and external data) and bits per parameter of the float model;
* perplexity on the held-out Wikipedia half (the zoo's windows of 512, empty cache);
* prefill latency of a 128-token prompt, decode tokens/s while the cache grows from 128 to 512
  tokens and from 1,920 to 2,048 (medians of interleaved rounds);
* greedy agreement with fp32: over the zoo's prompts (openings of held-out articles), how many
  of 64 greedy tokens match fp32's before the first difference.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from hessc.errors import InputError
from hessc.report import table

logger = logging.getLogger(__name__)

PROMPT = 128
SHORT_CACHE, LONG_CACHE = 512, 2048
LONG_NEW = 128
AGREEMENT_PROMPTS, AGREEMENT_PROMPT_TOKENS, AGREEMENT_NEW = 8, 32, 64


def _stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def _generator(model, prompt: np.ndarray, max_length: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def _decode(model, prompt: np.ndarray, new: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s) of ``prompt`` then ``new`` greedy tokens."""
    gen = _generator(model, prompt, len(prompt) + new)
    start = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))
    prefilled = time.perf_counter()
    count = 0
    while not gen.is_done():
        gen.generate_next_token()
        count += 1
    done = time.perf_counter()
    return 1e3 * (prefilled - start), count / (done - prefilled)


def _greedy(model, prompt: np.ndarray, new: int) -> list[int]:
    gen = _generator(model, prompt, len(prompt) + new)
    gen.append_tokens(prompt.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))[len(prompt):]


def _perplexity(folder: Path, zm) -> float:
    """The zoo's perplexity, each window run with an empty cache through ORT."""
    from hessc.ir import frontend
    from hessc.runtime import decoder, sessions

    model = frontend.load(folder / "model.onnx")
    cache = decoder.find(model)
    session = sessions.session(str(folder / "model.onnx"), "cpu", spinning=False)
    dtypes = {n: np.dtype(np.float32) for n in cache.past_inputs}

    def run(feed):
        ids = feed["input_ids"]
        full = {cache.ids: ids, **cache.empty_past(ids.shape[0], dtypes)}
        if cache.mask:
            full[cache.mask] = np.ones_like(ids)
        return session.inner.run([model.graph.outputs[0].name], full)

    return zm.evaluate(run)["perplexity"]


METHODS = ("rtn", "gptq", "rtn-sym", "gptq-sym")
"""hessc's quantizers here; ``-sym``: symmetric (no zero points: genai int4's format and bytes)."""


def run_decode(bits: Sequence[int | float | str], out_dir: Path, eval_tokens: int = 4096, rounds: int = 3,
               calibration_samples: int = 8, methods: Sequence[str] = ("rtn",), group_sizes: Sequence[int] = (32,)) -> dict:
    """Builds the genai folders, compiles hessc at each of ``bits`` × ``group_sizes`` × ``methods``,
    and measures every variant."""
    import onnx
    import onnxruntime_genai as og

    import hessc
    from hessc.bench import zoo
    from hessc.ir import meta

    zm = zoo.load_zoo("smollm2", eval_tokens=eval_tokens)
    fp32 = zoo.smollm2_genai("fp32")
    folders = {"fp32 (genai builder)": fp32, "genai int4 (builder RTN, block 32)": zoo.smollm2_genai("int4")}
    _, evaluation = zoo._wiki_split()
    stream = zoo._token_stream(evaluation, LONG_CACHE)
    graph = onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph
    params = sum(int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) >= 2 and "cache" not in t.name)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"--decode takes the methods {', '.join(METHODS)}, not {', '.join(unknown)}")
    results: dict = {"model": "smollm2", "rounds": rounds, "rows": []}
    seconds: dict[str, float] = {}
    degraded: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="hessc-decode-") as tmp:
        calibration = zm.calibration(calibration_samples, 0)
        variants = [(b, g, m) for g in group_sizes for b in bits for m in methods]

        def compile_variant(label: str, source, b, group_size: int, method: str, **extra) -> None:
            """Compiles ``source`` into a genai folder under ``label``, timed, degraded or not."""
            out = Path(tmp) / f"variant-{len(folders)}"
            started = time.perf_counter()
            # Measured even where verification finds it degraded (the row says so); no low-rank
            # items: each factor pair is two more kernels per decoded token.
            compiled = hessc.optimize(source, target="cpu", bits=b, calibration=calibration,
                                      method=method.removesuffix("-sym"), symmetric=method.endswith("-sym"),
                                      group_size=group_size, measure_latency=False, allow_degraded=True, low_rank=False,
                                      **extra)
            hessc.save(compiled, out)
            seconds[label] = round(time.perf_counter() - started, 1)
            quality = (meta.read_plan(compiled).get("verification") or {}).get("quality") or {}
            degraded[label] = bool(quality.get("degraded"))
            folders[label] = out

        for b, group_size, method in variants:
            label = f"hessc {b}" + (" bits" if isinstance(b, int) else " effective bits" if b != "lossless" else "") + \
                f" (group {group_size}, {method})"
            compile_variant(label, str(fp32 / "model.onnx"), b, group_size, method)
        # The torch front door on the same checkpoint (the first variant's settings), with and
        # without fuse-attention: the user's path from a transformers model.
        b, group_size, method = variants[0]
        for disabled in ([], ["fuse-attention"]):
            label = f"hessc {b} (group {group_size}, {method}) from torch, kv_cache=True" + \
                (", fuse-attention off" if disabled else "")
            compile_variant(label, zoo.smollm2_causal_lm(), b, group_size, method, kv_cache=True,
                            disable_passes=disabled)
        models = {label: og.Model(str(folder)) for label, folder in folders.items()}
        rows = {label: {"method": label, "stored_mb": round(_stored_bytes(folder) / 1e6, 2),
                        "bits_per_param": round(8 * _stored_bytes(folder) / params, 3)} for label, folder in folders.items()}
        for label, folder in folders.items():
            rows[label]["perplexity"] = round(_perplexity(folder, zm), 3)
        short, long = {k: [] for k in folders}, {k: [] for k in folders}
        for _ in range(rounds):  # interleaved: every variant once per round
            for label, model in models.items():
                short[label].append(_decode(model, stream[:PROMPT], SHORT_CACHE - PROMPT))
            for label, model in models.items():
                long[label].append(_decode(model, stream[: LONG_CACHE - LONG_NEW], LONG_NEW))
        for label in folders:
            rows[label]["prefill_128_ms"] = round(statistics.median(p for p, _ in short[label]), 1)
            rows[label]["decode_to_512_tok_s"] = round(statistics.median(t for _, t in short[label]), 1)
            rows[label]["decode_at_2048_tok_s"] = round(statistics.median(t for _, t in long[label]), 1)
        prompts = [stream[i * 200: i * 200 + AGREEMENT_PROMPT_TOKENS] for i in range(AGREEMENT_PROMPTS)]
        reference = [_greedy(models["fp32 (genai builder)"], p, AGREEMENT_NEW) for p in prompts]
        for label, model in models.items():
            prefixes = []
            for prompt, ref in zip(prompts, reference):
                got = _greedy(model, prompt, AGREEMENT_NEW)
                prefixes.append(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref))))
            rows[label]["agree_first_32"] = f"{sum(p >= 32 for p in prefixes)}/{len(prefixes)}"
            rows[label]["mean_agreeing_prefix"] = round(float(np.mean(prefixes)), 1)
    for label in rows:
        rows[label]["optimize_s"] = seconds.get(label, "–")
        rows[label]["degraded"] = degraded.get(label, False)
    genai_int4 = rows["genai int4 (builder RTN, block 32)"]
    for row in rows.values():
        row["decode_x_genai_int4"] = round(row["decode_to_512_tok_s"] / genai_int4["decode_to_512_tok_s"], 3)
    results["rows"] = list(rows.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(json.dumps(results, indent=2))
    columns = ["method", "stored_mb", "bits_per_param", "perplexity", "prefill_128_ms", "decode_to_512_tok_s",
               "decode_at_2048_tok_s", "decode_x_genai_int4", "agree_first_32", "mean_agreeing_prefix", "optimize_s",
               "degraded"]
    text = table(columns, [[row[c] for c in columns] for row in results["rows"]])
    (out_dir / "decode.md").write_text(text + "\n")
    print(text)
    return results


def check_model(model: str) -> None:
    if model != "smollm2":
        raise InputError(f"--decode is for the zoo's decoder smollm2, not {model!r}")
