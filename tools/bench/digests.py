"""Digests of optimize() outputs on the zoo models: a recorded before/after comparison.

Each configuration runs ``hessc.optimize`` on a zoo model and hashes the result's graph and
weights (``metadata_props`` excluded: the plan record may gain fields). Run it on two versions of
hessc and compare the JSON files: equal digests mean bit-identical models.

    python -m hessc.bench.digests --out digests.json [--only minilm]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import time

CONFIGS = (
    ("minilm", dict(target="cpu", bits=4, group_size=32), 8),
    ("minilm", dict(target="cpu", bits=4, group_size=128, method="gptq"), 8),
    ("minilm", dict(target="cpu", bits=3.5, group_size=128, method="gptq"), 8),
    ("minilm", dict(target="cpu", bits="lossless", group_size=128), 8),
    ("efficientnet", dict(target="onnx", bits=4, group_size=128), 8),
    ("efficientnet", dict(target="onnx", bits=4, group_size=128, method="gptq"), 8),
    ("efficientnet", dict(target="onnx", bits=3.5, group_size=128), 8),
    ("efficientnet", dict(target="onnx", bits="lossless", group_size=128), 8),
    ("smollm2", dict(target="cpu", bits=4, group_size=128), 2),
    ("smollm2", dict(target="cpu", bits=4, group_size=128, method="gptq"), 2),
    ("smollm2", dict(target="cpu", bits=3.5, group_size=128, method="gptq"), 2),
    ("smollm2", dict(target="cpu", bits="lossless", group_size=128, quantize_embeddings=False), 4),
)


def digest(model) -> str:
    import onnx_ir as ir

    proto = ir.to_proto(model)
    del proto.metadata_props[:]
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only")
    args = p.parse_args()
    import numpy as np

    import hessc
    try:
        from hessc.bench import zoo
    except ImportError:
        from hessc import zoo
    from hessc.runtime import sessions

    results = []
    for name, kwargs, n in CONFIGS:
        if args.only and name != args.only:
            continue
        zm = zoo.load_zoo(name, eval_tokens=512)
        calibration = zm.calibration(n, 0)
        labels = loss = None
        if kwargs["bits"] == "lossless" and name == "efficientnet":
            sess = sessions.session(zm.onnx_path, "cpu")
            labels = [np.asarray(sess.run(f)[0]).argmax(-1) for f in calibration]
        elif kwargs["bits"] == "lossless" and zm.task_loss is not None:
            loss, calibration = zm.task_loss, zm.task_calibration(n, 0)
        start = time.perf_counter()
        extra = {}
        if "allow_degraded" in inspect.signature(hessc.optimize).parameters:
            extra["allow_degraded"] = True  # the digest is of the graph, whatever its quality
        model = hessc.optimize(str(zm.onnx_path), calibration=calibration, labels=labels, loss=loss, **kwargs, **extra)
        row = {"model": name, "options": {k: v for k, v in kwargs.items()}, "calibration": n,
               "digest": digest(model), "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
