"""The memory bound: what this process holds, what the machine has free, and whether a whole-model
ONNX Runtime session fits.

Compression itself streams (a weight at a time, see ``frontend.release``); only the end-to-end
checks hold a whole model in a session: the float reference (verification and the latency check)
and the optimized model beside it. :func:`whole_model_fits` decides whether they may run, against
``max_memory`` when the user gave one (``--max-memory``), else against the memory the machine has
free; when they may not, verification goes weight by weight and says so.
"""

from __future__ import annotations

import os
import re

GIB = 1 << 30

FREE_SHARE = 0.7
"""Without ``max_memory``, the share of the machine's available memory the sessions may take."""


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int | None:
    """The memory the machine can give without swapping (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def parse_size(text: str) -> int:
    """``"2.5G"``, ``"800M"``, ``"1T"`` or plain bytes → bytes.

    Raises:
        ValueError: not a size (the CLI turns it into a usage error).
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"{text!r} is not a size; write it like 2.5G, 800M or 1073741824")
    unit = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[found.group(2).upper()]
    return int(float(found.group(1)) * unit)


def whole_model_fits(session_bytes: int, max_memory: int | None) -> str | None:
    """None when sessions holding ``session_bytes`` of weights fit; else why not, with the fix.

    With ``max_memory``, the process's resident memory now plus the sessions must stay within
    it; without, the sessions must fit in ``FREE_SHARE`` of the machine's available memory.
    """
    need = session_bytes
    if max_memory is not None:
        held = rss_bytes()
        if held + need <= max_memory:
            return None
        return (f"the whole-model sessions need about {need / GIB:.2f} GiB beside the {held / GIB:.2f} GiB held, "
                f"above --max-memory {max_memory / GIB:.2f} GiB; raise --max-memory for them")
    free = available_bytes()
    if free is None or need <= FREE_SHARE * free:
        return None
    return (f"the whole-model sessions need about {need / GIB:.2f} GiB, more than {FREE_SHARE:.0%} of the "
            f"{free / GIB:.2f} GiB this machine has available")


REFERENCE_BYTES_KEY = "hessc.reference_bytes"
"""``model.meta`` key: the float reference's weight bytes (what its session holds)."""

WHOLE_MODEL_KEY = "hessc.whole_model"
"""``model.meta`` key: the decision of :func:`whole_model_check`, made once per compile: ``""``
when the whole-model sessions run, else why they do not."""


def whole_model_check(model, max_memory: int | None) -> str | None:
    """Whether the end-to-end checks of this compile may hold the float model in a session (None)
    or not (why); decided the first time it is asked (the lowering asks before it keeps a portable
    copy for them) and kept in ``model.meta`` so every later check agrees."""
    decided = model.meta.get(WHOLE_MODEL_KEY)
    if decided is None:
        reference = model.meta.get(REFERENCE_BYTES_KEY)
        decided = "" if reference is None else (whole_model_fits(int(reference * SESSION_FACTOR), max_memory) or "")
        model.meta[WHOLE_MODEL_KEY] = decided
    return decided or None


SESSION_FACTOR = 1.25
"""A session's resident memory over its weights' bytes (ORT's copies of small tensors, its arena)."""


def session_fits(model, max_memory: int | None) -> str | None:
    """:func:`whole_model_fits` for a session on ``model`` itself (an ``onnx_ir.Model``, its
    weights as they are now)."""
    from hessc.ir import frontend

    held = sum(v.const_value.nbytes for g in frontend.graphs(model) for v in g.initializers.values()
               if v.const_value is not None)
    return whole_model_fits(int(held * SESSION_FACTOR), max_memory)
