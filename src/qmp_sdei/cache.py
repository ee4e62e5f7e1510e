"""Where qmp-sdei keeps things that are slow to make and safe to reuse (kernels, symbol tables, DTBs).

One root for all of them, so a CI job can cache or wipe a single directory: ``$QMP_SDEI_CACHE`` if
set, else ``$XDG_CACHE_HOME/qmp-sdei``, else ``~/.cache/qmp-sdei``. Entries are keyed by their inputs
(a package version, an image hash, a QEMU command line), so a stale entry is never reused for
different inputs and nothing needs expiring.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "QMP_SDEI_CACHE"


def cache_root() -> Path:
    """The cache directory root (not created here; each user creates its own subdirectory)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qmp-sdei"


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock file: one builder or fetcher per cache entry across processes."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
