r"""Weight quantizers: round-to-nearest (RTN) and GPTQ, in ONNX Runtime's blockwise conventions.

A normalised weight ``W`` (out × in, ``y = W x``) is quantized in groups of ``g`` consecutive input
columns (``g = 0``: one group per output row, i.e. per channel). Per group, with ``b`` bits:

* asymmetric (unsigned codes, ``qmax = 2^b − 1``)::

      vmin = min(0, min w),  vmax = max(0, max w),  s = (vmax − vmin) / qmax,
      z = clip(round(−vmin / s), 0, qmax),  q = clip(round(w · (1/s) + z), 0, qmax),  ŵ = (q − z) s

* symmetric (signed codes, no zero point): ``m`` = the element of largest ``|w|`` (signed),
  ``s = m / −2^{b−1}`` (so ``m`` maps to ``−2^{b−1}``; ``s`` may be negative)::

      q = clip(round(w · (1/s) + 2^{b−1}), 0, qmax) − 2^{b−1},  ŵ = q s

* symmetric narrow (the static int8 kernels' grid), with a code limit ``n`` (``narrow=n``):
  ``s = max |w| / n > 0`` and codes in ``[−n, n]``. ``n = 127`` is how ONNX Runtime's own
  quantizer stores int8 conv weights; ``n = 63`` is its ``reduce_range``: x86 CPUs without VNNI
  multiply u8·s8 with ``vpmaddubsw``, whose pairwise sums saturate at int16 (255·127·2 > 32767),
  and 7-bit weights keep every pair exact (255·63·2 < 32767).

These are ONNX Runtime's MLAS ``BlockwiseQuantizer`` formulas (``range2scalezp`` / ``range2scale``
and ``quantizeAndTranspose``, used by ``MatMulNBitsQuantizer`` for ``MatMulNBits``), evaluated in
float32 in the same order: the reciprocal ``1/s`` is formed first and multiplied, the symmetric
codes are rounded with MatMulNBits' implicit zero point ``2^{b−1}`` added, and ``round`` is C's
``roundf`` (half away from zero), not numpy's half-to-even. On x86-64 the codes, scales and zero
points are bit-identical to ORT's (``tests/passes/test_quantizers.py`` checks this through
``MatMulNBitsQuantizer``). One deliberate difference: a group that is entirely zero gets ``s = 1``
here where ORT stores ``s = 0``; codes and dequantized values (all zero) are the same.

GPTQ (Frantar et al., 2023; IST-DASLab reference) minimises the layer-wise proxy
``tr(Δ A Δᵀ)`` with ``A`` the input second moment (any positive multiple, e.g. ``2XXᵀ``): columns
are quantized left to right and each column's rounding error is pushed onto the not-yet-quantized
columns through the upper Cholesky factor ``U`` of ``(A + λI)⁻¹``, ``λ = damp · mean(diag A)``::

      e_j = (w_j − ŵ_j) / U_jj,   W_{:, j+1:} −= e_j U_{j, j+1:}

lazily in blocks of ``block_size`` columns. Columns are rounded with the RTN formulas above (so
``H = I`` reproduces :func:`rtn` exactly; the reference uses ``torch.round``). A group's scale is
taken when the group starts, from its fully error-updated weights: the reference reads the lazily
updated matrix, which misses the updates from earlier columns of the same block when a group starts
inside a block; here blocks are whole groups and the group is read from the block's working copy.
With ``act_order`` the columns are processed in order of decreasing ``diag A``; with groups this is
only offered together with ``static_groups`` (scales fixed from the original weights, groups
contiguous in the original column order), which keeps the result a plain per-group
``MatMulNBits`` weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["QuantizedWeight", "gptq", "rtn"]


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Integer codes with per-group scales (and zero points) for an (out, in) weight.

    Attributes:
        codes: (out, in) codes; ``uint8`` in ``[0, 2^b − 1]`` when asymmetric, ``int8`` in
            ``[−2^{b−1}, 2^{b−1} − 1]`` when symmetric.
        scales: (out, n_groups) float32 scales.
        zero_points: (out, n_groups) uint8 zero points, or None when symmetric.
        bits: bits per code.
        group_size: input columns per group; 0 means one group per output row.
        symmetric: signed codes without zero points.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        out, n_in = self.codes.shape
        if self.scales.shape != (out, self.n_groups):
            raise ValueError(
                f"scales have shape {self.scales.shape}, expected {(out, self.n_groups)}"
            )
        if self.symmetric != (self.zero_points is None):
            raise ValueError("zero points must be given exactly when the quantizer is asymmetric")
        if self.zero_points is not None and self.zero_points.shape != self.scales.shape:
            raise ValueError(
                f"zero points have shape {self.zero_points.shape}, expected {self.scales.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def block(self) -> int:
        """Input columns per group, with per-channel resolved to ``in``."""
        return self.group_size or self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        """Groups per output row."""
        return self.codes.shape[1] // self.block

    def dequantize(self) -> np.ndarray:
        """The float32 (out, in) weight the codes stand for, ``(q − z)·s`` as ORT computes it."""
        q = self.codes.astype(np.int32)
        if self.zero_points is not None:
            q = q - np.repeat(self.zero_points.astype(np.int32), self.block, axis=1)
        return q.astype(np.float32) * np.repeat(self.scales.astype(np.float32), self.block, axis=1)

    def stored_bytes(self, container_bits: int | None = None, scale_bytes: int = 4) -> int:
        """Bytes needed to store the quantized weight.

        Args:
            container_bits: width each code (and zero point) occupies when stored, e.g. 4 for
                3-bit codes in a 4-bit container; None means exactly ``bits``.
            scale_bytes: bytes per scale (4 for fp32, 2 for fp16).

        Returns:
            Code bytes + scale bytes + zero-point bytes, each rounded up to whole bytes.
        """
        width = container_bits or self.bits
        if width < self.bits:
            raise ValueError(f"container of {width} bits cannot hold {self.bits}-bit codes")
        total = math.ceil(self.codes.size * width / 8) + self.scales.size * scale_bytes
        if self.zero_points is not None:
            total += math.ceil(self.zero_points.size * width / 8)
        return total


def _check(w_shape: tuple[int, ...], bits: int, group_size: int) -> int:
    """Validate arguments; return the effective group size."""
    if len(w_shape) != 2:
        raise ValueError(f"expected an (out, in) weight matrix, got shape {tuple(w_shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    n_in = w_shape[1]
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = per channel), got {group_size}")
    if group_size and n_in % group_size:
        raise ValueError(
            f"input size {n_in} is not divisible by group_size {group_size}; "
            "choose a divisor of the input size or 0 for per-channel"
        )
    return group_size or n_in


def _as_f32(w: np.ndarray | torch.Tensor) -> torch.Tensor:
    # A copy: weights may be read-only memory-mapped arrays, which torch cannot wrap.
    t = w.detach() if isinstance(w, torch.Tensor) else torch.from_numpy(np.array(w, dtype=np.float32))
    return t.to(device="cpu", dtype=torch.float32)


def _roundf(t: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exact for float32 (``floor(|t| + 0.5)`` is not)."""
    a = t.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).to(t.dtype), t)


def _params(wg: torch.Tensor, bits: int, symmetric: bool, narrow: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float) zero point per row of ``wg`` (rows, g), as ORT's range2scale[zp]."""
    qmax = float(2**bits - 1)
    if narrow:
        scale = wg.abs().amax(dim=1) / torch.tensor(float(narrow), dtype=wg.dtype)
        zp = torch.full_like(scale, float(2 ** (bits - 1)))
    elif symmetric:
        mx, mn = wg.amax(dim=1), wg.amin(dim=1)
        m = torch.where(mx.abs() > mn.abs(), mx, mn)
        scale = m / torch.tensor(-float(2 ** (bits - 1)), dtype=wg.dtype)
        zp = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        vmin = wg.amin(dim=1).clamp(max=0.0)
        vmax = wg.amax(dim=1).clamp(min=0.0)
        scale = (vmax - vmin) / torch.tensor(qmax, dtype=wg.dtype)
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        zp = torch.where(scale != 0, _roundf(0.0 - vmin / safe), torch.zeros_like(scale))
        zp = zp.clamp(0.0, qmax)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    return scale, zp


def _position(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``w·(1/s) + z``, broadcasting scale/zp: where a weight falls on the code grid."""
    return w * (torch.tensor(1.0, dtype=w.dtype) / scale) + zp


def _code_range(bits: int, narrow: int) -> tuple[float, float]:
    """The unsigned codes' range: ``[0, 2^b − 1]``, or ``2^{b−1} ± n`` on the narrow grid."""
    if narrow:
        if not 0 < narrow < 2 ** (bits - 1):
            raise ValueError(f"a narrow {bits}-bit grid's code limit must be in [1, {2 ** (bits - 1) - 1}], got {narrow}")
        return float(2 ** (bits - 1) - narrow), float(2 ** (bits - 1) + narrow)
    return 0.0, float(2**bits - 1)


def _codes(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, narrow: int = 0) -> torch.Tensor:
    """Unsigned codes ``clip(roundf(w·(1/s) + z), 0, qmax)`` (within ``z ± n`` on the narrow
    grid), broadcasting scale/zp."""
    return _roundf(_position(w, scale, zp)).clamp_(*_code_range(bits, narrow))


def _pack(
    codes_u: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
) -> QuantizedWeight:
    if symmetric:
        codes = (codes_u - 2 ** (bits - 1)).to(torch.int8).numpy()
        zero_points = None
    else:
        codes = codes_u.to(torch.uint8).numpy()
        zero_points = zps.to(torch.uint8).numpy()
    return QuantizedWeight(
        codes=codes,
        scales=scales.to(torch.float32).numpy(),
        zero_points=zero_points,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


RTN_CHUNK = 1 << 22
"""Weights of more elements than this are rounded a block of rows at a time (each group lies in
one row, so the codes are the same): the temporaries stay a few times this size, not a few times
the weight's (a 16384 × 16384 weight: 1 GiB in float32)."""


def rtn(
    W: np.ndarray | torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    gradient: np.ndarray | None = None,
    margin: float = 0.0,
    narrow: int = 0,
) -> QuantizedWeight:
    """Round-to-nearest quantization, bit-identical to ORT's MatMulNBits blockwise quantizer.

    With a ``gradient``, weights whose scaled position ``w·(1/s) + z`` lies within ``margin`` of
    a rounding boundary (fractional part in ``(0.5 − margin, 0.5 + margin)``) take the neighbouring
    code that lowers the loss to first order, ``∂L/∂w · δw < 0`` (ALGORITHMS.md §3(c),
    rounding-direction extension, restricted to a band: directing every weight moves them together
    in the gradient's sign pattern, and that correlated error outgrows the gain). Scales and zero
    points are RTN's, so the stored form and its cost are unchanged.

    Args:
        W: (out, in) weight; cast to float32 first (as ORT quantizes fp32 initializers).
        bits: bits per code, 2..8.
        group_size: consecutive input columns per scale; 0 = per output channel.
        symmetric: signed codes, no zero point.
        gradient: ``∂L/∂W`` (out, in) that directs rounding near the boundary; None: nearest.
        margin: half-width of the band around the boundary, in ``[0, 0.5]``.
        narrow: the code limit ``n`` of the symmetric narrow grid (implies ``symmetric``); 0: off.

    Returns:
        The quantized weight.

    Raises:
        ValueError: ``in`` is not divisible by ``group_size``, or bad bits / shape / margin.
    """
    g = _check(tuple(W.shape), bits, group_size)
    if not 0.0 <= margin <= 0.5:
        raise ValueError(f"margin must be in [0, 0.5], got {margin}")
    rows = max(1, RTN_CHUNK // max(1, W.shape[1]))
    if W.shape[0] > rows:
        parts = [rtn(W[i:i + rows], bits, group_size, symmetric, None if gradient is None else gradient[i:i + rows],
                     margin, narrow) for i in range(0, W.shape[0], rows)]
        zps = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
        return QuantizedWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                               zps, parts[0].bits, group_size, parts[0].symmetric)
    w = _as_f32(W)
    out, n_in = w.shape
    wg = w.reshape(out * (n_in // g), g)
    symmetric = symmetric or bool(narrow)
    scale, zp = _params(wg, bits, symmetric, narrow)
    x = _position(wg, scale[:, None], zp[:, None])
    codes_u = _roundf(x).clamp_(*_code_range(bits, narrow))
    if gradient is not None and margin > 0:
        near = ((x - x.floor()) - 0.5).abs() < margin
        codes_u = torch.where(near, _directed(x, scale, bits, gradient), codes_u)
    return _pack(
        codes_u.reshape(out, n_in), scale.reshape(out, -1), zp.reshape(out, -1), bits, group_size, symmetric
    )


def _directed(x: torch.Tensor, scale: torch.Tensor, bits: int, gradient: np.ndarray) -> torch.Tensor:
    """Codes of grid positions ``x`` rounded against the gradient: a code step moves ``w`` by
    ``s``, so ``floor`` where ``s · ∂L/∂w > 0``, else ``ceil`` (the symmetric scale can be negative)."""
    grad = torch.from_numpy(np.asarray(gradient, dtype=np.float32)).reshape(x.shape)
    return torch.where(grad * scale[:, None] > 0, x.floor(), x.ceil()).clamp_(0.0, float(2**bits - 1))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: the column sweep is thousands of tiny ops, for which intra-op
    threading only adds synchronisation (tenfold slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), in float64.

    With ``J`` the reversal permutation and ``J(H + λI)J = L Lᵀ``, ``U = J L⁻¹ J``: one Cholesky
    and one triangular inverse instead of the reference's Cholesky, inverse, Cholesky. The damping
    is raised tenfold (at most five times) if the factorisation fails.
    """
    n = H.shape[0]
    lam = damp * float(H.diagonal().mean())
    eye = torch.eye(n, dtype=H.dtype)
    flipped = H.flip(0, 1)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(flipped + lam * eye)
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            return Linv.flip(0, 1)
        logger.debug("GPTQ: Cholesky failed with damping %g (attempt %d); raising it", lam, attempt)
        lam = max(lam * 10.0, 1e-8 * float(H.diagonal().abs().max()) + 1e-12)
    raise ValueError(
        "GPTQ: the input covariance is not positive definite even after raising the damping; "
        "check the calibration statistics for NaNs or a non-symmetric matrix"
    )


def gptq(
    W: np.ndarray | torch.Tensor,
    H: np.ndarray | torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    narrow: int = 0,
) -> QuantizedWeight:
    """GPTQ quantization with inverse-Hessian error feedback (IST-DASLab ``fasterquant``).

    Args:
        W: (out, in) weight; processed in float32.
        H: (in, in) input second moment, e.g. ``A = E[x xᵀ]``; only its shape, not its scale,
            matters. Columns with ``H_jj = 0`` (dead inputs) are quantized as zero.
        bits: bits per code, 2..8.
        group_size: consecutive input columns per scale; 0 = per output channel.
        symmetric: signed codes, no zero point.
        damp: relative damping, ``λ = damp · mean(diag H)``.
        block_size: columns per lazy-update block (rounded to whole groups).
        act_order: quantize columns in order of decreasing ``diag H``.
        static_groups: fix every group's scale from the original (not error-updated) weights.
        narrow: the code limit ``n`` of the symmetric narrow grid (implies ``symmetric``); 0: off.

    Returns:
        The quantized weight, with scales in the original column order.

    Raises:
        ValueError: bad sizes, ``act_order`` with groups but without ``static_groups``, or an
            ``H`` that cannot be made positive definite.
    """
    g = _check(tuple(W.shape), bits, group_size)
    symmetric = symmetric or bool(narrow)
    w = _as_f32(W).clone()
    out, n_in = w.shape
    h = (H.detach() if isinstance(H, torch.Tensor) else torch.from_numpy(np.asarray(H)))
    h = h.to(device="cpu", dtype=torch.float64).clone()
    if tuple(h.shape) != (n_in, n_in):
        raise ValueError(
            f"H has shape {tuple(h.shape)}, expected ({n_in}, {n_in}) for W {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(h).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError(
            "GPTQ: W or H has NaN or infinite entries; check the calibration statistics"
        )
    if act_order and group_size and not static_groups:
        raise ValueError(
            "act_order with group_size > 0 needs static_groups=True: otherwise the groups follow "
            "the permuted order and cannot be stored as contiguous per-group scales"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_groups = n_in // g

    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Rows of the transposed weight are columns of W: the hot loop then updates contiguous memory.
    scales_t = torch.empty(n_groups, out, dtype=torch.float32)
    zps_t = torch.empty(n_groups, out, dtype=torch.float32)
    fixed = static_groups or not group_size
    if fixed:
        s, z = _params(w.reshape(out * n_groups, g), bits, symmetric, narrow)
        scales_t.copy_(s.reshape(out, n_groups).T)
        zps_t.copy_(z.reshape(out, n_groups).T)

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    U = _inverse_cholesky(h, damp).to(torch.float32)
    col_group = torch.arange(n_in) // g
    if perm is not None:
        col_group = col_group[perm]
    groups = col_group.tolist()

    wt = w.T.contiguous()
    codes_t = torch.empty(n_in, out, dtype=torch.float32)
    # Align blocks to groups so a group never straddles a lazy update.
    bs = block_size if fixed else max(g, (block_size // g) * g)
    with _one_thread():
        for i1 in range(0, n_in, bs):
            i2 = min(i1 + bs, n_in)
            w1 = wt[i1:i2].clone()
            err1 = torch.empty_like(w1)
            u1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if not fixed and j % g == 0:
                    s, z = _params(w1[i : i + g].T, bits, symmetric, narrow)
                    scales_t[j // g] = s
                    zps_t[j // g] = z
                s, z = scales_t[groups[j]], zps_t[groups[j]]
                col = w1[i]
                c = _codes(col, s, z, bits, narrow)
                codes_t[j] = c
                e = (col - (c - z) * s) / u1[i, i]
                w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
                err1[i] = e
            if i2 < n_in:
                wt[i2:].addmm_(U[i1:i2, i2:].T, err1, alpha=-1.0)

    codes_u = codes_t.T
    if perm is not None:
        codes_u = codes_u[:, torch.argsort(perm)]
    return _pack(codes_u, scales_t.T, zps_t.T, bits, group_size, symmetric)
