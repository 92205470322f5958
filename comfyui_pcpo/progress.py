"""How far a press of Run has got, in words for the PCPO LoRA Update node (no ComfyUI imports).

One press of Run (Queue) runs ``iterations_per_queue`` iterations: the Update node re-queues the
workflow until the run reaches the press's target iteration (``nodes/requeue.py``).  ComfyUI's queue
indicator sees one job per iteration, so the node itself says where the press stands: "iteration k
of N done", the time per iteration and the time left, and, after Cancel, at which iteration the
press stopped and that Run continues the run from there.

A :class:`Press` is what the server remembers of the press for its re-queued prompts (with its loop,
``comfyui_pcpo.lineage.Loop``): the run's iteration when the press began, its target, and the
wall-clock time its first iteration began.  Everything here is plain arithmetic on those numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Press:
    first: int      # iterations the run had finished when the press began
    target: int     # the run's iteration at which the press ends
    started: float  # wall-clock seconds (time.time()) when its first iteration began

    @property
    def total(self) -> int:
        return max(1, self.target - self.first)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def new_press(iteration_before: int, iterations_per_queue: int, started: float) -> Press:
    """The press the user's prompt begins: ``iterations_per_queue`` iterations from
    ``iteration_before``, its first iteration begun at ``started``."""
    before = int(iteration_before)
    return Press(before, before + int(iterations_per_queue), float(started))


@dataclass(frozen=True)
class Progress:
    done: int              # iterations of the press finished (1..total)
    total: int             # iterations of the press
    run_iteration: int     # the run's iteration after the latest update
    per_iteration_s: float
    elapsed_s: float

    @property
    def left(self) -> int:
        return self.total - self.done

    @property
    def eta_s(self) -> float:
        return self.per_iteration_s * self.left


def progress(press: Press, run_iteration: int, now: float) -> Progress:
    """Where ``press`` stands once the run has finished ``run_iteration`` iterations, at time ``now``
    (same clock as ``press.started``).  The time per iteration is the mean over the press so far."""
    done = min(press.total, max(1, int(run_iteration) - press.first))
    elapsed = max(0.0, float(now) - press.started)
    return Progress(done, press.total, int(run_iteration), elapsed / done, elapsed)


def format_duration(seconds: float) -> str:
    """``0.8 s``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0.0, float(seconds))
    if s < 9.95:
        return f"{s:.1f} s"
    if s < 59.5:
        return f"{s:.0f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _which(p: Progress, k: int) -> str:
    """``iteration k of N``, with the run's own iteration number when it differs (a continued run)."""
    run_k = p.run_iteration - p.done + k
    return f"iteration {k} of {p.total}" + (f" (run iteration {run_k})" if run_k != k else "")


def progress_text(p: Progress) -> str:
    """The line on the Update node after an update."""
    per = f"{format_duration(p.per_iteration_s)} per iteration"
    if p.left > 0:
        return f"{_which(p, p.done)} done · {per} · ETA {format_duration(p.eta_s)} ({p.left} left)"
    return f"{_which(p, p.done)} done · {per} · press finished in {format_duration(p.elapsed_s)}"


def cancel_text(p: Progress) -> str:
    """The line the page shows on the Update node when the iteration after ``p`` is cancelled: the
    run keeps every finished iteration and the next press of Run continues from there."""
    if p.left > 0:
        where = _which(p, p.done + 1)
    else:  # the press was finished: the cancelled iteration is the first of the next press
        where = f"iteration {p.run_iteration + 1}"
    return (f"stopped at {where} (cancelled): the run keeps its {p.run_iteration} finished iteration(s); "
            f"Run continues from there")


def as_ui(p: Progress) -> dict:
    """The numbers and lines of ``p`` for the page (JSON)."""
    return {"done": p.done, "total": p.total, "run_iteration": p.run_iteration,
            "per_iteration_s": p.per_iteration_s, "eta_s": p.eta_s, "elapsed_s": p.elapsed_s,
            "text": progress_text(p), "cancel_text": cancel_text(p)}
