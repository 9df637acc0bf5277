"""Matplotlib on the Agg backend (no display needed) and PNG output, for every figure dpgen draws."""

from __future__ import annotations

import io
from pathlib import Path

from dpgen.rundir import atomic_path

DPI = 110


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


def png_bytes(fig) -> bytes:
    """`fig` as PNG bytes (for embedding in HTML), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()
