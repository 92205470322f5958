"""Who may continue a run (host-free rules).

* A run has a *lineage*: an id made when the run starts and kept in its checkpoint
  (``RunState.lineage``).  Every copy of a workflow shares its node ids, so node ids cannot tell two
  users' runs apart; the lineage can.
* A *press* is a prompt a user queued.  A press with ``resume`` on continues the run of that name
  (whoever started it); with ``resume`` off it starts a new run, and a run that exists -- a
  checkpoint on disk, or a live run that has trained -- is never overwritten: the press is refused
  (:func:`refuse_restart`).  To start a run over deliberately, use a new run name, or delete (move
  away) the run folder.
* A *loop* continues a press: the server remembers it (:class:`LoopRegistry`: run, lineage, target
  iteration, and where and when the press began, for its progress line) when the press's update asks for more iterations, and the prompts it re-queues carry
  only its id.  A prompt carrying an id the server does not know, one of another run or of an
  earlier lineage of the run (it was started over), is a press: whatever else it carries (a target,
  a token) is never read.
"""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

LOOPS_KEPT = 1024  # loops remembered (the oldest are forgotten: their next prompt counts as a press)


@dataclass
class Loop:
    id: str
    run: str
    lineage: Optional[str]  # None: bound to the run's lineage by the first prompt that trains it
    target: int
    first: int = 0        # the run's iteration when the press began (its progress counts from here)
    started: float = 0.0  # wall-clock seconds (time.time()) when the press's first iteration began


class LoopRegistry:
    """The loops this server (or headless runner) started, by id."""

    def __init__(self, kept: int = LOOPS_KEPT):
        self._lock = threading.Lock()
        self._loops: "OrderedDict[str, Loop]" = OrderedDict()
        self.kept = int(kept)

    def start(self, run: str, lineage: Optional[str], target: int, first: int = 0, started: float = 0.0) -> Loop:
        loop = Loop(uuid.uuid4().hex, str(run), lineage, int(target), int(first), float(started))
        with self._lock:
            self._loops[loop.id] = loop
            while len(self._loops) > self.kept:
                self._loops.popitem(last=False)
        return loop

    def find(self, marker, run: str) -> Optional[Loop]:
        """The loop of ``run`` named by a prompt's loop marker, or None (no marker, an unknown or
        forged id, another run's loop)."""
        lid = marker.get("loop") if isinstance(marker, dict) else None
        if not isinstance(lid, str):
            return None
        with self._lock:
            loop = self._loops.get(lid)
        return loop if loop is not None and loop.run == run else None

    def lookup(self, marker, run: str, lineage: Optional[str]) -> Optional[Loop]:
        """:meth:`find`, only when the loop belongs to ``lineage`` (a loop started without one, by the
        headless runner, is bound to it here)."""
        loop = self.find(marker, run)
        if loop is None or lineage is None:
            return None
        with self._lock:
            if loop.lineage is None:
                loop.lineage = lineage
            return loop if loop.lineage == lineage else None

    def end(self, loop: Optional[Loop]) -> None:
        if loop is not None:
            with self._lock:
                self._loops.pop(loop.id, None)


# what a prompt's PCPO LoRA node does with the run of its name (see :func:`session_action`)
CONTINUE_LIVE = "continue-live"   # the live run in memory goes on
START_OVER = "start-over"         # a live run that never trained (nothing on disk) is replaced by a new one
RESUME_DISK = "resume-disk"       # the run's checkpoint is loaded
NEW_RUN = "new-run"               # nothing exists: a new run starts
REFUSE = "refuse"                 # resume off on a run that exists: refused, never overwritten


def session_action(resume: bool, live_in_loop: bool, live_trained: Optional[bool], disk_in_loop: bool,
                   on_disk: bool) -> str:
    """The one rule of who may continue a run.  ``live_trained``: None when no run of the name is live,
    else whether it has trained or has a checkpoint; ``live_in_loop`` / ``disk_in_loop``: the prompt
    carries a loop id this server issued for the live run's / the checkpoint's lineage; ``on_disk``: a
    checkpoint exists.  A press with resume on continues (the live run, else the checkpoint); with
    resume off it starts a new run only where nothing would be lost, else it is refused; a loop's own
    prompts always continue their run."""
    if live_trained is not None:
        if resume or live_in_loop:
            return CONTINUE_LIVE
        if live_trained:
            return REFUSE
        # the live run had not trained: it is replaced, then the disk decides as for a cold start
    if on_disk:
        return RESUME_DISK if (resume or disk_in_loop) else REFUSE
    return START_OVER if live_trained is not None else NEW_RUN


class RunExists(ValueError):
    """A press with resume off for a run that exists (the message names the run and the fixes)."""


def refuse_restart(run: str, run_dir: str, where: str) -> RunExists:
    """The error for a press with resume off on an existing run; ``where`` says what exists."""
    return RunExists(
        f"run {run!r} already exists ({where}) and resume is off: a run is never overwritten. Turn resume on "
        f"to continue it, use a new run_name to start another run, or delete (or move away) its folder "
        f"{run_dir} to start this run over.")
