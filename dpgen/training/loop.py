"""The one step loop both stages use: progress bar, EMA, logging, periodic checkpoints."""

from __future__ import annotations

import math
from typing import Callable

from tqdm.auto import tqdm


def run_steps(
    *,
    start: int,
    total: int,
    step_fn: Callable[[int], float],
    checkpoint_fn: Callable[[int], None],
    checkpoint_every: int,
    desc: str,
    log_fn: Callable[[str, float, int], None] | None = None,
    progress: bool = True,
) -> float:
    """Run steps start..total-1; checkpoint every `checkpoint_every` steps and at the end."""
    last_loss = math.nan
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, leave=True)
    for step in range(start, total):
        loss = step_fn(step)
        if loss == loss:
            last_loss = loss
        if log_fn:
            log_fn(f"{desc}/loss", loss, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == total:
            checkpoint_fn(done)
    bar.close()
    return last_loss
