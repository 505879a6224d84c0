"""``hessc bench --model families``: architectures hessc has not been tuned on, each compiled as a
new user would and checked for an honest result.

Each family is a small random-weight model of its ``transformers`` architecture (decoders of
eight LLM families, encoders, vision transformers and conv nets, speech encoders), exported by
``torch.onnx.export(dynamo=True)`` exactly as a user's export would be, with random calibration
inputs. Weights are random, so the quality columns say whether the compile kept the model's
function at that size, not how a trained model would fare; what the table checks is that every
family ends in a result or a clear refusal (never an internal error), that the file stores the
effective bits the allocation planned (``stored_over_plan_bits`` / ``priced_params_in_float``
absent), and that verification passed.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

WIDTH = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512)
TOKENS = 32
IMAGE = 64


def _families() -> dict[str, Callable[[], tuple[Any, str]]]:
    """Name → builder of ``(module, input kind)``; kinds: ``ids``, ``pixels``, ``wave``, ``mel``."""
    import transformers as T

    def lm(config, model, **kw):
        return lambda: (model(config(**{**WIDTH, **kw})), "ids")

    def vision(config, model, **kw):
        return lambda: (model(config(**kw)), "pixels")

    speech = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                  conv_dim=(64,) * 7, num_conv_pos_embeddings=16)
    return {
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512,
                                                        n_positions=128)), "ids"),
        "llama-gqa": lm(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2),
        "qwen2-tied": lm(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2, tie_word_embeddings=True),
        "phi3": lm(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=4, pad_token_id=0),
        "gemma2": lm(T.Gemma2Config, T.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=32),
        "opt": lambda: (T.OPTForCausalLM(T.OPTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                     ffn_dim=256, vocab_size=512, word_embed_proj_dim=128)), "ids"),
        "bloom": lambda: (T.BloomForCausalLM(T.BloomConfig(hidden_size=128, n_layer=2, n_head=4, vocab_size=512)),
                          "ids"),
        "gpt-neox": lm(T.GPTNeoXConfig, T.GPTNeoXForCausalLM),
        "bert": lm(T.BertConfig, T.BertModel),
        "albert-shared": lm(T.AlbertConfig, T.AlbertModel, embedding_size=64),
        "deberta-v2": lm(T.DebertaV2Config, T.DebertaV2Model),
        "vit": vision(T.ViTConfig, T.ViTForImageClassification, image_size=IMAGE, patch_size=8,
                      **{k: v for k, v in WIDTH.items() if k != "vocab_size"}),
        "regnet-grouped": vision(T.RegNetConfig, T.RegNetForImageClassification, hidden_sizes=[32, 64, 128, 256],
                                 depths=[1, 1, 1, 1], groups_width=16),
        "resnet": vision(T.ResNetConfig, T.ResNetForImageClassification, embedding_size=32,
                         hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]),
        "convnext": vision(T.ConvNextConfig, T.ConvNextForImageClassification, hidden_sizes=[32, 64, 128, 256],
                           depths=[1, 1, 2, 1]),
        "mobilenet-v2": vision(T.MobileNetV2Config, T.MobileNetV2ForImageClassification, depth_multiplier=0.5,
                               image_size=96),
        "segformer": vision(T.SegformerConfig, T.SegformerForSemanticSegmentation, depths=[1, 1, 1, 1],
                            hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64),
        "wav2vec2-ctc": lambda: (T.Wav2Vec2ForCTC(T.Wav2Vec2Config(vocab_size=32, **speech)), "wave"),
        "whisper-encoder": lambda: (T.WhisperForAudioClassification(T.WhisperConfig(
            d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=80,
            max_source_positions=100, vocab_size=512, decoder_layers=1, decoder_attention_heads=4)), "mel"),
    }


def _inputs(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "ids":
        return rng.integers(0, WIDTH["vocab_size"], (1, TOKENS)).astype(np.int64)
    if kind == "pixels":
        return rng.standard_normal((1, 3, IMAGE, IMAGE)).astype(np.float32)
    if kind == "wave":
        return rng.standard_normal((1, 8000)).astype(np.float32)
    return rng.standard_normal((1, 80, 200)).astype(np.float32)


def export_family(name: str, path: Path) -> str:
    """Exports one family's random-weight model to ``path``; returns its input kind."""
    import torch

    torch.manual_seed(0)
    module, kind = _families()[name]()
    module.eval()
    key = {"ids": "input_ids", "pixels": "pixel_values", "wave": "input_values", "mel": "input_features"}[kind]

    class Wrapped(torch.nn.Module):  # one tensor in, the model's first output out
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x):
            out = self.inner(**{key: x})
            return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))

    example = torch.from_numpy(_inputs(kind, np.random.default_rng(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), (example,), str(path), dynamo=True, input_names=["x"],
                          output_names=["y"], external_data=False, verbose=False)
    return kind


def compile_family(src: Path, kind: str, target: str, bits, samples: int = 16) -> dict[str, Any]:
    """One compile with the CLI's defaults: the outcome, or the refusal's message."""
    import hessc
    from hessc.errors import HesscError, VerificationError
    from hessc.ir import meta

    rng = np.random.default_rng(1)
    feeds = [{"x": _inputs(kind, rng)} for _ in range(samples)]
    started = time.perf_counter()
    try:
        out = hessc.optimize(str(src), target=target, bits=bits, calibration=feeds, allow_degraded=True)
    except HesscError as e:  # a clear refusal (exit 2), or a result verification rejected
        what = "verification failed" if isinstance(e, VerificationError) else "refused"
        return {"outcome": f"{what}: {str(e)[:160]}", "seconds": round(time.perf_counter() - started, 1)}
    record = meta.read_plan(out)
    s = record["summary"]
    honest = "stored_over_plan_bits" not in s and "priced_params_in_float" not in s
    verification = record["verification"]
    return {
        "outcome": "written", "seconds": round(time.perf_counter() - started, 1),
        "effective_bits": s.get("effective_bits_per_weight"), "planned_bits": s.get("planned_effective_bits"),
        "bytes_ratio": round(s["bytes_after"] / s["bytes_before"], 3), "bits_as_planned": honest,
        "verification": verification.get("status"),
        "cosine": (verification.get("vs_float") or {}).get("cosine"),
    }


def run_families(out_dir: Path, target: str = "cpu", bits: list | None = None, names: list[str] | None = None) -> dict:
    from hessc.report import table

    bits = bits or [4, 3.5]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hessc-families-") as tmp:
        for name in names or list(_families()):
            src = Path(tmp) / f"{name}.onnx"
            try:
                kind = export_family(name, src)
            except Exception as e:  # noqa: BLE001 - the exporter's failure is the row, not hessc's
                rows.append({"family": name, "bits": None, "outcome": f"export failed: {type(e).__name__}"})
                continue
            for b in bits:
                rows.append({"family": name, "bits": b, **compile_family(src, kind, target, b)})
                print(json.dumps(rows[-1]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"target": target, "rows": rows}
    (out_dir / "families.json").write_text(json.dumps(results, indent=2))

    def cell(r, key, digits=4):
        v = r.get(key)
        return "-" if v is None else (round(v, digits) if isinstance(v, float) else v)

    text = table(["family", "bits", "outcome", "eff. bits (planned)", "file x float", "bits as planned",
                  "verification", "cosine to fp32", "s"],
                 [[r["family"], cell(r, "bits"), r["outcome"],
                   f"{cell(r, 'effective_bits')} ({cell(r, 'planned_bits')})", cell(r, "bytes_ratio"),
                   cell(r, "bits_as_planned"), cell(r, "verification"), cell(r, "cosine"), cell(r, "seconds")]
                  for r in rows])
    (out_dir / "families.md").write_text(f"### families on {target}\n\n{text}\n")
    print(text)
    return results
