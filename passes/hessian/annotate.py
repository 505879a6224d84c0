r"""The annotation pass, and the readers of what it leaves on the weights.

GPTQ's Hessian blends ``A`` with the gradient-weighted ``A_u`` at equal trace
(:func:`gptq_hessian`): ``H = (1 − s)·A/tr A + s·A_u/tr A_u``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from hessc.ir import meta
from hessc.ir import weights as qweights
from hessc.passes.hessian.backward import _collect_backward
from hessc.passes.hessian.cache import (
    _CACHE_VERSION, _cache_root, _config_digest, _load, _store, calibration_digest, model_digest,
)
from hessc.passes.hessian.config import HessianConfig
from hessc.passes.hessian.forward import _collect_forward, _mean_covariance, _top_eigs, pools
from hessc.passes.hessian.hvp import _collect_hvp
from hessc.passes.hessian.layers import _targets
from hessc.passes.hessian.losses import _Loss, resolve_loss

logger = logging.getLogger(__name__)


WEIGHTED_SHARE = 0.5
"""Share of the gradient-weighted covariance in GPTQ's Hessian (see :func:`gptq_hessian`)."""


def gptq_hessian(stats: meta.HessianStats) -> np.ndarray | None:
    """The layer Hessian GPTQ minimises ``tr(Δ H Δᵀ)`` under, from a weight's statistics.

    ``A = E[x xᵀ]`` counts every row alike, which is wrong where the loss reads a few rows far
    more than the rest: on SmolLM2 the attention-sink token (position 0) is 1 row in 512 of a
    ``v_proj`` input but every later token attends to its value, and GPTQ with ``A`` alone moved
    error onto it (2-11x RTN's error there, 3-5x less elsewhere; perplexity 37.2 against RTN's
    30.9 at 4 bits). When the gradient-weighted covariance ``A_u`` was measured, the Hessian is
    the equal-trace blend ``(1 − s)·A/tr A + s·A_u/tr A_u`` with ``s =`` :data:`WEIGHTED_SHARE`:
    ``A_u`` puts the weight where the loss is and ``A`` keeps the estimate well conditioned
    (4-bit, group 128: perplexity 29.5 with ``A_u`` alone, 28.7 blended).
    """
    a, aw = stats.a, getattr(stats, "a_weighted", None)
    if a is None or aw is None:
        return a
    ta, tw = float(np.trace(a)), float(np.trace(aw))
    if not (ta > 0 and tw > 0):
        return a
    return (1.0 - WEIGHTED_SHARE) * (a / ta) + WEIGHTED_SHARE * (aw / tw)


def hessian_for(ref: qweights.WeightRef) -> np.ndarray | None:
    """GPTQ's Hessian (in × in, float64) of a weight (:func:`gptq_hessian`), or None.

    Reads the :class:`hessc.ir.meta.HessianStats` that :class:`AnnotateHessianPass` left on the
    weight value; use as ``InsertQDQPass(hessian_for=hessian_for)``.
    """
    stats = ref.value.meta.get(meta.HESSIAN_KEY)
    if not isinstance(stats, meta.HessianStats) or stats.a is None:
        return None
    if stats.a.shape[0] != ref.matrix_shape[1]:
        logger.warning("%s: A is %s but the weight has %d inputs; not used", ref.name, stats.a.shape, ref.matrix_shape[1])
        return None
    return gptq_hessian(stats)


def gradient_for(ref: qweights.WeightRef) -> np.ndarray | None:
    """The loss gradient ``∂L/∂W`` (out × in) that :class:`AnnotateHessianPass` left on a weight,
    or None; use as ``InsertQDQPass(gradient_for=gradient_for)`` (``rtn-grad``)."""
    stats = ref.value.meta.get(meta.HESSIAN_KEY)
    return stats.grad if isinstance(stats, meta.HessianStats) else None


class AnnotateHessianPass(ir.passes.InPlacePass):
    """Annotates every MatMul/Gemm/Conv weight with :class:`hessc.ir.meta.HessianStats`.

    An analysis pass: the graph is never changed (``modified=False``). Each weight value gets
    ``value.meta[HESSIAN_KEY]``; ``model.meta[CURVATURE_KEY]`` maps each weight's user-facing name
    to the JSON-able summary for the plan record. Embedding tables (``Gather``) and weights inside
    subgraphs get no statistics. Progress goes to :func:`hessc.progress.report` with stage
    ``covariance``, ``backward`` or ``hvp``.

    Args:
        config: what to compute.
        feeds: calibration feeds (a list of ``{input name: array}``, or anything
            :func:`hessc.runtime.calibration.feeds_from` accepts); None reads the
            :class:`hessc.ir.meta.Calibration` under ``model.meta[CALIBRATION_KEY]``, whose
            ``labels`` and ``loss`` then stand in for a config without labels and with
            ``loss="auto"``.
    """

    def __init__(self, config: HessianConfig = HessianConfig(), feeds: Any = None) -> None:
        super().__init__()
        self.config = config
        self.feeds = feeds

    def requires(self, model: ir.Model) -> None:
        self._source(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from hessc.runtime import calibration

        source, config = self._source(model)
        n_feeds = max(config.max_samples if config.covariance else 0,
                      config.max_grad_samples if config.backward else 0,
                      config.hvp_samples if config.hvp else 0, 1)
        feeds = calibration.feeds_from(source, model, limit=n_feeds)
        targets = _targets(model)
        stats = self._cached_or_computed(model, targets, feeds, config)
        summaries = {}
        for t in targets:
            s = stats.get(t.key)
            if s is None:
                continue
            meta.set_annotation(t.value, meta.HESSIAN_KEY, s)
            summaries[t.name] = s.summary()
        model.meta[meta.CURVATURE_KEY] = summaries
        return ir.passes.PassResult(model, modified=False)

    def _source(self, model: ir.Model) -> tuple[Any, HessianConfig]:
        """The calibration data and the config this run uses: the explicit feeds and config, else
        the model's :class:`hessc.ir.meta.Calibration` with its labels and loss filled in."""
        if self.feeds is not None:
            return self.feeds, self.config
        calib = model.meta.get(meta.CALIBRATION_KEY)
        if calib is None:
            raise ir.passes.PreconditionError(
                "AnnotateHessianPass needs calibration feeds: pass feeds=[{input name: array}, ...] or "
                f"attach hessc.ir.meta.Calibration(feeds) as model.meta[{meta.CALIBRATION_KEY!r}]"
            )
        if not isinstance(calib, meta.Calibration):
            raise ir.passes.PreconditionError(
                f"model.meta[{meta.CALIBRATION_KEY!r}] holds a {type(calib).__name__}, not the "
                "hessc.ir.meta.Calibration AnnotateHessianPass reads its calibration feeds from"
            )
        config = self.config
        if config.labels is None and calib.labels is not None:
            config = dataclasses.replace(config, labels=calib.labels)
        if not callable(config.loss) and config.loss == "auto" and calib.loss is not None:
            config = dataclasses.replace(config, loss=calib.loss)
        return calib.feeds, config

    def _cached_or_computed(self, model, targets, feeds, config: HessianConfig) -> dict[str, meta.HessianStats]:
        root = _cache_root(config)
        path = key = None
        if root is not None:
            start = time.perf_counter()
            m_digest = model_digest(model)
            c_digest = calibration_digest(feeds, config.labels)
            key = hashlib.sha256(f"{m_digest}:{c_digest}:{_config_digest(config)}:{_CACHE_VERSION}".encode()).hexdigest()
            path = root / m_digest[:24] / key[:32]
            logger.debug("hessian cache key %s (hashing %.2f s)", key[:16], time.perf_counter() - start)
            loaded = _load(path, key)
            if loaded is not None and set(loaded) == {t.key for t in targets}:
                logger.info("hessian statistics of %d weights loaded from cache %s", len(loaded), path.parent)
                return loaded
        stats = self._compute(model, targets, feeds, config)
        if path is not None:
            try:
                _store(path, key, stats)
            except OSError as e:
                logger.warning("could not write the hessian cache %s (%s)", path, e)
        return stats

    def _compute(self, model, targets, feeds, config: HessianConfig) -> dict[str, meta.HessianStats]:
        fields: dict[str, dict[str, Any]] = {t.key: {} for t in targets}
        if not targets:
            return {}
        if config.covariance:
            start = time.perf_counter()
            acts = list(dict.fromkeys(a for t in targets for a in t.acts))
            used = feeds[: config.max_samples]
            halves = None
            pooled = pools([t.acts for t in targets])
            if config.split_covariance and len(used) >= 2:
                halves = [_collect_forward(model, acts, part, config, pooled) for part in (used[0::2], used[1::2])]
                sums = {a: (None if halves[0][a][0] is None else halves[0][a][0] + halves[1][a][0],
                            halves[0][a][1] + halves[1][a][1]) for a in acts}
            else:
                sums = _collect_forward(model, acts, used, config, pooled)
            eig_cache: dict[tuple, tuple] = {}
            for t in targets:
                key = tuple(t.acts)
                if key not in eig_cache:
                    a, count = _mean_covariance(sums, t.acts)
                    if a is None:
                        continue
                    split = tuple(_mean_covariance(h, t.acts)[0] for h in halves) if halves else (None, None)
                    eig_cache[key] = (a, _top_eigs(a, config.top_eigs), float(np.trace(a)), count, split)
                a, eigs, trace, count, (a_fit, a_check) = eig_cache[key]
                fields[t.key].update(a=a, a_eig_top=eigs, a_trace=trace, samples=count)
                if a_fit is not None and a_check is not None:
                    fields[t.key].update(a_fit=a_fit, a_check=a_check)
            logger.info("hessian: covariance of %d layer inputs over %d feeds in %.1f s",
                        len(eig_cache), min(len(feeds), config.max_samples), time.perf_counter() - start)
        if config.backward:
            start = time.perf_counter()
            loss = _Loss(resolve_loss(config, model), model, config)
            acc = _collect_backward(model, targets, feeds[: config.max_grad_samples], config, loss)
            for t in targets:
                st = acc[t.key]
                f = fields[t.key]
                f.update(loss_name=loss.name, grad_samples=st.rows)
                if config.gradient:
                    f["grad"] = (st.grad.numpy() if st.grad is not None
                                 else np.zeros(t.refs[0].matrix_shape, dtype=np.float64))
                if config.split_gradient and all(h is not None for h in st.halves):
                    f["grad_fit"], f["grad_check"] = (h.numpy() for h in st.halves)
                if config.kfac and st.g is not None:
                    f["g_diag" if st.g.ndim == 1 else "g"] = st.g.numpy()
                if config.fisher_diag and st.fisher is not None:
                    f["fisher_diag_mean"] = float(st.fisher)
                if config.weighted_covariance and st.a_weighted is not None:
                    f["a_weighted"] = st.a_weighted.numpy()
            logger.info("hessian: backward statistics (loss %s) over %d feeds in %.1f s",
                        loss.name, min(len(feeds), config.max_grad_samples), time.perf_counter() - start)
        if config.hvp:
            start = time.perf_counter()
            res = _collect_hvp(model, targets, feeds[: config.hvp_samples], config)
            for key, values in res.items():
                fields[key].update(values)
                fields[key].setdefault("loss_name", resolve_loss(config, model))
            logger.info("hessian: HVP statistics of %d layers in %.1f s", len(res), time.perf_counter() - start)
        return {k: meta.HessianStats(**v) for k, v in fields.items()}
