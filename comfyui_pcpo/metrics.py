"""Per-iteration metrics of a run: ``metrics.jsonl`` and TensorBoard scalars (host-free).

* ``metrics.jsonl`` in the run folder holds one JSON object per completed iteration with every stat
  of that iteration (training reward, clip fraction per timestep, KL, grad norm, ...) and, on the
  iterations that ran one, the held-out evaluation and what the reward-hacking guard did.  Writes are
  idempotent by iteration: writing iteration ``i`` drops every line of iteration ``>= i`` first, so
  after a crash and a resume from an older checkpoint the file follows the run again, and readers
  keep only the lines up to the run's iteration.  A line cut by a crash is skipped when read.  The
  process training the run keeps a :class:`MetricsLog`: it reads the file once, so an iteration
  costs the same at iteration 10 000 as at iteration 1.
* TensorBoard scalars are written only when the ``tensorboard`` package is installed
  (:class:`TensorBoardSink`).  The dashboard image drawn from these records is ``dashboard.py``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional


from .atomic import atomic_write_text, dumps, strict_json

METRICS_FILE = "metrics.jsonl"
RUNNING_MEAN_WINDOW = 10


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS_FILE)


def read_metrics(path: str, up_to: Optional[int] = None) -> list:
    """The records of ``path`` in iteration order (one per iteration, the last written wins), only up
    to iteration ``up_to`` when given; unreadable lines (a write cut by a crash) are skipped."""
    if not os.path.exists(path):
        return []
    out: dict = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                it = int(rec["iteration"])
            except (ValueError, KeyError, TypeError):
                continue
            if up_to is None or it <= up_to:
                out[it] = rec
    return [out[k] for k in sorted(out)]


def _rewrite(path: str, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def write_metrics(path: str, iteration: int, fields: dict, merge: bool = False) -> dict:
    """Write the record of ``iteration`` (idempotent): lines of later iterations are dropped; with
    ``merge`` the fields are added to that iteration's existing record.  Returns the record.  (One
    read of the file per call: a writer that writes every iteration keeps a :class:`MetricsLog`.)"""
    return MetricsLog(path).write(iteration, fields, merge)


class MetricsLog:
    """``metrics.jsonl`` of one run, read once and then kept in memory by its only writer (the
    process training the run): :meth:`records` and :meth:`write` give what :func:`read_metrics` and
    :func:`write_metrics` give, without reading the file again.  A new iteration's line is appended
    and a change to the last iteration's line replaces that line in place (the file is rewritten
    only when later iterations are dropped, after a resume from an older checkpoint)."""

    def __init__(self, path: str):
        self.path = path
        self._records: Optional[dict] = None  # iteration -> record, in iteration order
        self._last_start = 0                  # byte offset of the last readable line (the last iteration's)
        self._stamp = None                    # the file as this log last left it (changed by another: reload)

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self) -> dict:
        if self._records is None or self._stat() != self._stamp:
            self._records, self._last_start = {}, 0
            if os.path.exists(self.path):
                offset = 0
                with open(self.path, "rb") as f:
                    for raw in f:
                        try:
                            rec = json.loads(raw.decode("utf-8"))
                            it = int(rec["iteration"])
                        except (ValueError, KeyError, TypeError):
                            offset += len(raw)
                            continue
                        self._records[it] = rec
                        self._last_start = offset
                        offset += len(raw)
                if list(self._records) != sorted(self._records):  # not written by this class: put in order
                    self._records = {k: self._records[k] for k in sorted(self._records)}
                    self._last_start = None
            self._stamp = self._stat()
        return self._records

    def records(self, up_to: Optional[int] = None) -> list:
        return [r for it, r in self._load().items() if up_to is None or it <= up_to]

    def write(self, iteration: int, fields: dict, merge: bool = False) -> dict:
        records = self._load()
        iteration = int(iteration)
        rec = strict_json({**(records.get(iteration, {}) if merge else {}), **fields, "iteration": iteration})
        later = [it for it in records if it >= iteration]
        line = (dumps(rec) + "\n").encode("utf-8")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if not later and os.path.exists(self.path):
            with open(self.path, "rb+") as f:  # append (after a newline if a write was cut)
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                self._last_start = f.tell()
                f.write(line)
        elif later == [iteration] and self._last_start is not None and os.path.exists(self.path):
            with open(self.path, "rb+") as f:  # the last iteration's line: replace it in place
                f.truncate(self._last_start)
                f.seek(self._last_start)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        else:
            kept = [r for it, r in records.items() if it < iteration]
            _rewrite(self.path, kept + [rec])
            self._last_start = os.path.getsize(self.path) - len(line)  # rec's line is the last one
        for it in later:
            del records[it]
        records[iteration] = rec
        self._stamp = self._stat()
        return rec


def truncate_metrics(path: str, iteration: int) -> int:
    """Drop the lines of iterations after ``iteration`` (a run resumed from an older checkpoint);
    returns how many were dropped."""
    records = read_metrics(path)
    keep = [r for r in records if int(r["iteration"]) <= int(iteration)]
    if len(keep) != len(records):
        _rewrite(path, keep)
    return len(records) - len(keep)


def repair_metrics(log: "MetricsLog", iteration: int, records: Iterable[dict]) -> int:
    """Make ``metrics.jsonl`` agree with a run checkpoint at ``iteration`` whose ``metrics`` companion
    holds ``records`` (the lines it committed that may not be in the file): lines after ``iteration``
    are dropped and each committed record is written where it is missing or differs.  Returns how
    many lines were dropped or written."""
    iteration = int(iteration)
    have = {int(r["iteration"]): r for r in log.records()}
    changed = 0
    later = [it for it in have if it > iteration]
    if later:
        _rewrite(log.path, [r for it, r in have.items() if it <= iteration])
        changed += len(later)
        have = {it: r for it, r in have.items() if it <= iteration}
    for rec in sorted((r for r in records if isinstance(r, dict) and "iteration" in r),
                      key=lambda r: int(r["iteration"])):
        it = int(rec["iteration"])
        if it <= iteration and have.get(it) != rec:
            log.write(it, rec)
            have = {int(r["iteration"]): r for r in log.records()}
            changed += 1
    return changed


def running_mean(values: list, window: int = RUNNING_MEAN_WINDOW) -> float:
    vals = [float(v) for v in values[-window:] if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


TRAIN_KEYS = ("reward_mean", "reward_std", "clip_fraction", "approx_kl", "grad_norm", "loss", "log_approx_error",
              "zero_std_groups", "groups", "skipped_steps", "first_update_log_ratio", "clip_fraction_per_step",
              "grad_scale", "pairs")


def iteration_record(stats: dict, history: list, extra: Optional[dict] = None) -> dict:
    """The metrics of one update: the trainer's stats plus the running mean of the training reward
    over the last ``RUNNING_MEAN_WINDOW`` iterations (``history``: the run's per-iteration stats,
    this iteration last)."""
    rec = {k: stats[k] for k in TRAIN_KEYS if k in stats}
    rec["reward_running_mean"] = running_mean([h.get("reward_mean") for h in history])
    rec["zero_std_fraction"] = (float(stats["zero_std_groups"]) / max(int(stats.get("groups", 1)), 1)
                                if "zero_std_groups" in stats else None)
    rec.update(extra or {})
    return strict_json(rec)


# ------------------------------------------------------------------------------ TensorBoard (optional)

def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        return True
    except Exception:
        return False


class TensorBoardSink:
    """Scalars of every record under ``<run_dir>/tensorboard`` when ``tensorboard`` is installed;
    does nothing otherwise (never required)."""

    _writers: dict = {}

    @classmethod
    def write(cls, run_dir: str, rec: dict) -> bool:
        if not tensorboard_available():
            return False
        try:
            from torch.utils.tensorboard import SummaryWriter
            w = cls._writers.get(run_dir)
            if w is None:
                w = cls._writers[run_dir] = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            step = int(rec["iteration"])
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration" and math.isfinite(v):
                    w.add_scalar(f"pcpo/{k}", v, step)
                elif isinstance(v, dict):
                    for sk, sv in v.items():
                        if isinstance(sv, (int, float)) and not isinstance(sv, bool) and math.isfinite(sv):
                            w.add_scalar(f"pcpo/{k}/{sk}", sv, step)
            w.flush()
            return True
        except Exception:  # a broken optional install must not stop training
            return False
