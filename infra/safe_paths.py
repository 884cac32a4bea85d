"""Keys from a store are untrusted: each must name a file inside the folder it is written to.

A manifest entry or a listed S3 key becomes a local path only through `path_inside`, which refuses
`..`, absolute paths, backslashes, empty segments and symbolic links on the way (one line naming the
key), so a hostile or corrupted store cannot write outside the destination.
"""

from __future__ import annotations

import re
from pathlib import Path

_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeKey(ValueError):
    """A key that would leave its destination folder (permanent: retrying gives the same key)."""


def checked_key(key: str) -> str:
    """`key` when it is a plain relative POSIX path (no '..', '.', empty segment, backslash or NUL)."""
    if not key or key.startswith("/") or _DRIVE.match(key) or "\\" in key or "\x00" in key:
        raise UnsafeKey(f"refused store key {key!r}: not a relative path inside the destination")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsafeKey(f"refused store key {key!r}: '..', '.' or empty path segments")
    return key


def path_inside(root: str | Path, key: str) -> Path:
    """root/key for a checked key, refusing a symbolic link anywhere below root on the way to it."""
    root = Path(root)
    current = root
    for part in checked_key(key).split("/"):
        current = current / part
        if current.is_symlink():
            raise UnsafeKey(f"refused store key {key!r}: {current} is a symbolic link")
    if root.exists() and not current.resolve().is_relative_to(root.resolve()):
        raise UnsafeKey(f"refused store key {key!r}: resolves outside {root}")
    return current
