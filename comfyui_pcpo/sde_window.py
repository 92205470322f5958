"""SDE windows: stochastic, recorded and trained steps only inside a window of the sampling grid, a
deterministic ODE solver everywhere else (MixGRPO, Li et al. 2025: an SDE window that slides with
the iteration count; Flow-GRPO-Fast: one or two stochastic steps of a deterministic trajectory).

Steps are grid intervals, as in KSampler: ``steps`` = N intervals of the sigma / t grid.  A window
of W steps starting at step ``start`` covers intervals start .. start + W - 1; the steps before it
and after it are integrated by the ODE solver on the same grid points (a second-order solver such
as heun costs two model calls per interval, except into sigma 0; dpmpp_2m and euler one).  Only
the window's W steps carry a policy, so only they are recorded and trained: the recorded rollout
and the gradient pass shrink from N - 1 trained steps to W.

A window never contains the grid's last step (into sigma / t = 0): that step is never trained (the
reference default, see ``trainer.candidate_steps``), so it is always left to the ODE solver and
all W window steps are trained.  Admissible starts: 0 .. N - 1 - W.  A window of 0 steps, or of
N - 1 or more, means every step is stochastic (the full SDE rollout).

Schedules (all a pure function of the run's seed and iteration count, both part of the run state,
so a resumed run places every window exactly where the uninterrupted one did):

* ``fixed``:   start = ``window_start`` every iteration.
* ``sliding``: MixGRPO's window, moving one step towards the end every ``slide_every`` iterations
               from ``window_start`` and wrapping around: start = (window_start + floor(k /
               slide_every)) mod (N - W).
* ``random``:  a uniform start in 0 .. N - 1 - W, redrawn every iteration from (seed, iteration);
               every group of the iteration shares it (``window_start`` is unused).

PCPO's proportionate weights are computed over the window's steps (see ``step_plan``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

WINDOW_SCHEDULES = ("fixed", "sliding", "random")
_WINDOW_GROUP = -1000  # the rollout-seed slot of the random window's draw (no group index is negative)


@dataclass(frozen=True)
class Window:
    """Steps start .. start + size - 1 of a grid of ``grid_steps`` intervals are stochastic."""
    start: int
    size: int
    grid_steps: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def to_dict(self) -> dict:
        return {"start": self.start, "size": self.size, "grid_steps": self.grid_steps}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["Window"]:
        return None if not d else cls(int(d["start"]), int(d["size"]), int(d["grid_steps"]))


def is_full(size: int, grid_steps: int) -> bool:
    """Whether a window of ``size`` steps on ``grid_steps`` intervals is the full SDE rollout."""
    return int(size) == 0 or int(size) >= int(grid_steps) - 1


def window_seed(seed: int, iteration: int) -> int:
    """Seed of the random window's start at ``iteration`` (a slot no group's noise uses)."""
    from .run_state import rollout_seed
    return rollout_seed(seed, iteration, _WINDOW_GROUP)


def place_window(size: int, grid_steps: int, schedule: str = "fixed", iteration: int = 0, seed: int = 0,
                 start: int = 0, slide_every: int = 1) -> Optional[Window]:
    """The window of iteration ``iteration``, or None for the full SDE rollout (see the module doc).
    Bad input raises a ValueError naming the input and the fix."""
    if schedule not in WINDOW_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; choose one of {', '.join(WINDOW_SCHEDULES)}")
    size, grid_steps, start = int(size), int(grid_steps), int(start)
    if size < 0:
        raise ValueError(f"window_steps must be >= 0 (0 = every step stochastic), got {size}")
    if start < 0:
        raise ValueError(f"window_start must be >= 0, got {start}")
    if int(slide_every) < 1:
        raise ValueError(f"slide_every must be >= 1 iteration, got {slide_every}")
    if is_full(size, grid_steps):
        return None
    positions = grid_steps - size  # starts 0 .. grid_steps - 1 - size
    if schedule == "fixed":
        if start > positions - 1:
            raise ValueError(f"window_start {start} with window_steps {size} runs past step {grid_steps - 2}, the "
                             f"last trainable step of {grid_steps} steps (the step into 0 is never trained): use "
                             f"window_start 0 .. {positions - 1}, fewer window_steps, or more steps")
        s = start
    elif schedule == "sliding":
        s = (start + int(iteration) // int(slide_every)) % positions
    else:
        g = torch.Generator().manual_seed(window_seed(seed, iteration))
        s = int(torch.randint(positions, (1,), generator=g))
    return Window(s, size, grid_steps)
