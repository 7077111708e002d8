"""What the hub process shares: the platform, its catalog, and secrets kept in the state folder."""

import os
import secrets
from functools import lru_cache
from pathlib import Path

from ..platform import Platform


def secret_file(path: Path, nbytes: int = 32) -> str:
    """Read a hex secret from ``path``, creating it (mode 0600) on first use."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(nbytes))
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path.read_text().strip()


@lru_cache(maxsize=1)
def platform() -> Platform:
    return Platform()


@lru_cache(maxsize=1)
def catalog():
    """The hub's one catalog handle (opened on first use)."""
    from ..catalog import Catalog

    return Catalog.open(platform())
