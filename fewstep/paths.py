"""Where fewstep writes things that are not part of a run: the user cache.

Caches (FID reference features, teacher rows, VAE latents) are written here or into the run folder,
never next to the data or the teacher: those are inputs, possibly read-only or inside an installed package.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache folder: ``$FEWSTEP_CACHE``, else ``$XDG_CACHE_HOME/fewstep``, else ``~/.cache/fewstep``
    (the XDG base-directory default). Not created here; writers create what they need."""
    if explicit := os.environ.get("FEWSTEP_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fewstep"


def cache_key(text: str) -> str:
    """A short stable folder name for a cache entry described by ``text`` (a fingerprint)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
