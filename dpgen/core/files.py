"""Digests of files (dataset fingerprints, release checksums, download checks), streamed."""

from __future__ import annotations

import hashlib
from pathlib import Path


def _digest(path: str | Path, algorithm: str, chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return _digest(path, "sha256")


def md5_file(path: str | Path) -> str:
    """MedMNIST publishes md5 sums; dpgen checks downloads against them (not for security)."""
    return _digest(path, "md5")


__all__ = ["sha256_file", "md5_file"]
