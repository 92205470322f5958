"""One commit point for all run state (host-free).

The run checkpoint (``RunState.save``: one file, one ``os.replace``) is the only commit point of a
run.  What else an iteration produces is either inside it or derived from it:

* the Reward Guard's state (learning-rate scale, best score and iteration, rollback log) is the
  checkpoint's ``guard`` companion; ``guard.json`` is a copy written after each commit;
* the iteration's ``metrics.jsonl`` record is its ``metrics`` companion (with any earlier record
  whose line could not be written, e.g. on a full disk), so a line is never lost for good: it is
  written before the checkpoint, written again by the next flush when that failed, and put back
  from the checkpoint on resume;
* the ids of the rating requests the iteration trained on are its ``ratings`` companion; after the
  commit a trained mark naming them is appended to ``ratings.jsonl``;
* ``best.safetensors`` is written before the checkpoint that refers to it (by iteration).

:func:`flush_metrics` and :func:`write_derived` write the derived files after a commit;
:func:`repair` makes them agree with a checkpoint that was just loaded (after a kill between the
commit and a derived write, or between a derived write and the next commit).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from . import ratings as H
from .guard import GUARD_FILE, GuardState, guard_of, keep_guard
from .atomic import strict_json
from .metrics import MetricsLog, repair_metrics
from .run_state import RunState

log = logging.getLogger("comfyui-pcpo")
RATINGS_FILE = "ratings.jsonl"


def note_metrics(state: RunState, record: dict) -> dict:
    """Make ``record`` (one iteration's metrics) part of what the next checkpoint commits; records of
    earlier iterations not yet written stay, later ones (an iteration undone) go."""
    rec = strict_json(dict(record))
    it = int(rec["iteration"])
    if state.companions is None:
        state.companions = {}
    kept = [r for r in state.companions.get("metrics") or [] if int(r["iteration"]) < it]
    state.companions["metrics"] = kept + [rec]
    return rec


def current_metrics(state: RunState) -> Optional[dict]:
    recs = (state.companions or {}).get("metrics") or []
    return dict(recs[-1]) if recs and int(recs[-1]["iteration"]) == state.iteration else None


def flush_metrics(state: RunState, mlog: MetricsLog, run_name: str = "") -> bool:
    """Write the noted metrics records that the file does not hold yet.  On success only the current
    iteration's record stays noted; on an OSError (a full disk) every record stays noted (committed
    with the next checkpoint and written at the next flush) and a warning names the file."""
    recs = (state.companions or {}).get("metrics") or []
    if not recs:
        return True
    try:
        have = {int(r["iteration"]): r for r in mlog.records()}
        for rec in recs:
            if have.get(int(rec["iteration"])) != rec:
                mlog.write(int(rec["iteration"]), rec)
                have = {int(r["iteration"]): r for r in mlog.records()}
    except OSError as e:
        log.warning("PCPO %s: could not write %s (%s); its lines are kept with the run and written at the next "
                    "iteration", run_name, mlog.path, e)
        return False
    state.companions["metrics"] = recs[-1:]
    return True


def write_derived(state: RunState, run_dir: str, run_name: str, memo: dict) -> None:
    """After a commit: ``guard.json`` from the guard companion and the trained mark of the ratings the
    committed iteration trained on (once per process and iteration; :func:`repair` checks the file)."""
    comp = state.companions or {}
    if isinstance(comp.get("guard"), dict):
        GuardState.from_dict(comp["guard"]).save(os.path.join(run_dir, GUARD_FILE))
    rated = comp.get("ratings")
    if isinstance(rated, dict) and rated.get("request_ids"):
        key = (state.lineage, int(rated["iteration"]), tuple(sorted(rated["request_ids"])))
        if memo.get("marked") != key:
            H.ensure_mark(os.path.join(run_dir, RATINGS_FILE),
                          H.trained_mark(run_name, state.lineage, rated["iteration"], rated["request_ids"]))
            memo["marked"] = key


def repair(state: RunState, run_dir: str, run_name: str, mlog: MetricsLog, memo: dict) -> None:
    """Right after ``state`` was loaded from its checkpoint: the derived files follow it.  A checkpoint
    written before companions existed takes its guard state from ``guard.json`` (a damaged file is
    refused naming it) and is converted."""
    if state.companions is None:
        legacy = os.path.join(run_dir, GUARD_FILE)
        gs = guard_of(state, legacy)
        state.companions = {}
        if os.path.exists(legacy) and gs != GuardState():
            keep_guard(state, gs)
    try:
        n = repair_metrics(mlog, state.iteration, state.companions.get("metrics") or [])
    except OSError as e:
        log.warning("PCPO %s: could not repair %s (%s)", run_name, mlog.path, e)
    else:
        if n:
            log.info("PCPO %s: metrics.jsonl follows the checkpoint at iteration %d (%d lines)", run_name,
                     state.iteration, n)
    memo.pop("marked", None)
    write_derived(state, run_dir, run_name, memo)
