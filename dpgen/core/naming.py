"""Names shown to people."""

from __future__ import annotations


def class_name(k: int, class_names: list[str] | None) -> str:
    """The name of class `k` (`data.class_names`), or its index when the config names none."""
    return class_names[k] if class_names and 0 <= k < len(class_names) else str(k)


__all__ = ["class_name"]
