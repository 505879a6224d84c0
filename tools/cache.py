"""Where hessc keeps what it computed once: exported example models, curvature statistics, kernel
timings. ``$HESSC_CACHE`` if set, else ``$XDG_CACHE_HOME/hessc``, else ``~/.cache/hessc``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str = "", create: bool = True) -> Path:
    """The cache directory (``sub``: a folder inside it), created if missing unless ``create`` is off."""
    env = os.environ.get("HESSC_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "hessc"
    if sub:
        path = path / sub
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
