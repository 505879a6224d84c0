"""``python -m hessc.bench.decoder_families``: transformers decoder families through the torch
front door with their KV cache, into onnxruntime-genai.

For each family a small random-weight model (seed 0; hidden 128, 2 layers) is compiled with
``hessc.optimize(lm, kv_cache=True, bits=B)``, saved as a genai folder, and run by genai's
``Generator`` for greedy tokens after an 8-token prompt; the logits genai computed at every step
are compared with transformers' own on the same sequence (cosine), so the whole serving path is
checked: export, fusion, quantization, genai config, cache handling. Each row also says what
``fuse-attention`` did (attentions fused, rotary in the kernel or why not) and whether genai runs
the cache in place. Random weights: no quality claim beyond agreement with the float model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_IDS = dict(bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": ("LlamaConfig", dict(_SHAPE, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(_SHAPE, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(_SHAPE, num_key_value_heads=2, head_dim=32)),
    "mistral": ("MistralConfig", dict(_SHAPE, num_key_value_heads=2, sliding_window=16)),
    "phi3": ("Phi3Config", dict(_SHAPE, num_key_value_heads=4)),
    "gemma": ("GemmaConfig", dict(_SHAPE, num_key_value_heads=1, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(_SHAPE, num_key_value_heads=2, head_dim=32, sliding_window=256)),
    "granite": ("GraniteConfig", dict(_SHAPE, num_key_value_heads=2)),
    "olmo2": ("Olmo2Config", dict(_SHAPE, num_key_value_heads=2)),
    "stablelm": ("StableLmConfig", dict(_SHAPE, num_key_value_heads=2)),
    "falcon": ("FalconConfig", dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True, **_IDS)),
    "gpt2": ("GPT2Config", dict(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=512, **_IDS)),
    "opt": ("OPTConfig", dict(vocab_size=512, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=512, word_embed_proj_dim=128, pad_token_id=0, **_IDS)),
}
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def run_family(name: str, work: Path, bits, new: int = 40) -> dict:
    """One family's row: compiled, generated in genai, compared with transformers."""
    import onnx
    import onnxruntime_genai as og
    import torch
    import transformers

    import hessc

    started = time.perf_counter()
    class_name, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**kwargs)).eval()
    rng = np.random.default_rng(0)
    calibration = [{"input_ids": rng.integers(0, 512, (1, 32)).astype(np.int64)} for _ in range(4)]
    compiled = hessc.optimize(lm, kv_cache=True, bits=bits, calibration=calibration, measure_latency=False)
    folder = work / f"{name}-{bits}"
    hessc.save(compiled, folder)
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([PROMPT], dtype=np.int32))
    tokens, logits = [], [generator.get_logits()[0, -1].copy()]
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if not generator.is_done():
            logits.append(generator.get_logits()[0, -1].copy())
    with torch.no_grad():
        reference = lm(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1:len(PROMPT) - 1 + len(logits)].numpy()
    cosines = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(logits, reference)]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    config = json.loads((folder / "genai_config.json").read_text())
    return {"family": name, "bits": bits, "tokens": len(tokens), "min_logits_cosine": round(min(cosines), 5),
            "mean_logits_cosine": round(float(np.mean(cosines)), 5),
            "fuse_attention": compiled.meta.get("hessc.fuse_attention"),
            "cache_in_place": config["search"]["past_present_share_buffer"],
            "matmul_nbits": sum(n.op_type == "MatMulNBits" for n in graph.node),
            "seconds": round(time.perf_counter() - started, 1)}


def run(families, work: Path, bits) -> list[dict]:
    rows = []
    for name in families:
        try:
            rows.append(run_family(name, work, bits))
        except Exception as e:  # noqa: BLE001 - recorded in the row, the other families go on
            rows.append({"family": name, "bits": bits, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m hessc.bench.decoder_families", description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    parser.add_argument("--bits", default="8", help="hessc's bits (8 checks the path; 4 adds quantization error)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    bits = float(args.bits) if "." in args.bits else int(args.bits)
    with tempfile.TemporaryDirectory(prefix="hessc-families-") as work:
        rows = run(args.families.split(","), Path(work), bits)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
