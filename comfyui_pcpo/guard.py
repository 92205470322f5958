"""Reward-hacking guard (host-free): keep the best state by held-out reward, and roll back to it
exactly when the held-out evaluation says the run went wrong.

After each held-out evaluation (:func:`judge`):

* the run *trips* when the held-out training reward is more than ``heldout_margin`` below its best,
  when a guard reward is more than ``guard_margin`` below the highest value it had at an admissible
  evaluation, or when the KL to the base model passes ``kl_bound`` (0 = no bound);
* an evaluation that does not trip is *admissible*; the best state is the admissible one with the
  highest held-out training reward (so a state that bought its reward with a falling guard reward
  is never the best one);
* on a trip the run is rolled back to the best state -- LoRA, optimizer state, timestep generator
  and gradient scaler, bit for bit (:func:`rollback`) -- while its iteration count and history go on
  (the next rollouts draw new noise), and then the chosen action happens: ``stop`` the loop,
  ``lower_lr`` (multiply the learning rate by ``lr_factor`` from then on, down to
  ``MIN_LR_SCALE`` = 1/64 of the node's value), or ``continue``.

The best state is one run-checkpoint file (``best.safetensors`` beside the run checkpoint, the same
format), written before the run checkpoint that refers to it (by its iteration).  The guard's own
state (best score and iteration, the guard rewards' references, the learning-rate scale and the log
of every rollback with its reason) is committed inside the run checkpoint (its ``guard`` companion,
:func:`guard_of`), so a kill at any moment resumes with the learning rate and best state that go with
the LoRA; ``guard.json`` is a readable copy written after each commit (and rebuilt on resume).

Several processes (torchrun): the run has ONE verdict per evaluation (:func:`decide`).  Rank 0
judges its own held-out scores and broadcasts the verdict with the guard state it leads to, and
every rank takes both over, so all ranks keep, accept a new best or roll back together and hold
the same learning-rate scale, best score and rollback log.  Rank 0's scores (not a mean over the
ranks) because the held-out evaluation is not split across ranks: every rank samples the same
prompts with the same noise and the same LoRA, so the ranks' scores differ only by floating-point
non-determinism, and rank 0's are the ones the run logs (``metrics.jsonl``, the node's text): the
verdict follows the number the user sees.  Rank 0 alone writes ``best.safetensors`` and
``guard.json``; a rollback loads rank 0's best state on rank 0 and broadcasts its tensors
(:func:`rollback`), so every rank continues from the same bits, whatever file the other ranks
could see.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from . import distributed
from .atomic import atomic_write_json
from .distributed import is_writer
from .run_state import CheckpointError, RunState, read_checkpoint, write_checkpoint

ACTIONS = ("stop", "lower_lr", "continue")
BEST_FILE = "best.safetensors"
GUARD_FILE = "guard.json"
MIN_LR_SCALE = 1 / 64  # lower_lr never takes the learning rate below this share of the node's value


@dataclass(frozen=True)
class GuardConfig:
    heldout_margin: float = 0.05    # held-out reward this far below its best: roll back
    guard_margin: float = 0.05      # a guard reward this far below its reference: roll back
    kl_bound: float = 0.0           # KL to the base model above this: roll back (0 = no bound)
    action: str = "lower_lr"
    lr_factor: float = 0.5

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"guard action {self.action!r} is unknown; choose one of {', '.join(ACTIONS)}")
        for k in ("heldout_margin", "guard_margin", "kl_bound"):
            v = float(getattr(self, k))
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{k} must be a number >= 0, got {v}")
        if not (0 < float(self.lr_factor) <= 1):
            raise ValueError(f"lr_factor must be in (0, 1], got {self.lr_factor}")


@dataclass
class GuardState:
    best_score: Optional[float] = None
    best_iteration: Optional[int] = None
    guard_ref: dict = field(default_factory=dict)   # guard reward -> its highest admissible value
    lr_scale: float = 1.0
    rollbacks: list = field(default_factory=list)   # {"iteration", "to_iteration", "reason", "action"}
    evaluations: int = 0
    stopped_at: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GuardState":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str) -> None:
        if not is_writer():  # several processes: rank 0 writes, every rank holds the same state
            return
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "GuardState":
        """``guard.json`` (of a run checkpointed before the guard state moved into the checkpoint); a
        damaged file raises :class:`CheckpointError` naming it and the fix."""
        if not os.path.exists(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            gs = cls.from_dict(d)
            gs.lr_scale = float(gs.lr_scale)
            if not (0 < gs.lr_scale <= 1) or not isinstance(gs.rollbacks, list) or not isinstance(gs.guard_ref, dict):
                raise ValueError(f"lr_scale {gs.lr_scale!r} or the rollback log is not valid")
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"the Reward Guard state {path} is damaged ({e}), and this run's checkpoint (written by an earlier "
                "version) holds no copy of it. Restore the file from a backup, or delete it to let the guard "
                "start afresh (best state, learning-rate scale and rollback log are forgotten; the LoRA is kept)."
            ) from e
        return gs


def guard_of(state: RunState, legacy_path: Optional[str] = None) -> GuardState:
    """The guard state committed with ``state`` (its checkpoint's ``guard`` companion); a state loaded
    from a checkpoint written before companions existed reads ``legacy_path`` (``guard.json``) once."""
    if state.companions is None:  # an older checkpoint: guard.json is the only record
        gs = GuardState.load(legacy_path) if legacy_path else GuardState()
        if gs.best_iteration is not None and gs.best_iteration > state.iteration:
            gs = GuardState()  # a file from a later point of the run than its state: a run started over
        return gs
    rec = state.companions.get("guard")
    return GuardState.from_dict(rec) if isinstance(rec, dict) else GuardState()


def keep_guard(state: RunState, gs: GuardState) -> None:
    """Make ``gs`` part of what the next checkpoint of ``state`` commits."""
    if state.companions is None:
        state.companions = {}
    state.companions["guard"] = gs.to_dict()


@dataclass
class Verdict:
    reasons: list           # why the run trips (empty: admissible)
    new_best: bool          # this evaluation is the best admissible one so far
    rollback_to: Optional[int] = None  # tripped with a best state saved (:func:`decide`): its iteration
    best_file_iteration: Optional[int] = None  # the iteration the best-state file holds (:func:`decide`)

    @property
    def tripped(self) -> bool:
        return bool(self.reasons)


def judge(cfg: GuardConfig, gs: GuardState, iteration: int, heldout: float, guards: dict,
          kl: Optional[float]) -> Verdict:
    """Decide on one held-out evaluation and update ``gs``'s references (not the best: the caller
    records a new best with :meth:`accept_best` once its state is saved)."""
    reasons = []
    if gs.best_score is not None and heldout < gs.best_score - cfg.heldout_margin:
        reasons.append(f"held-out reward {heldout:.4g} fell {gs.best_score - heldout:.3g} below its best "
                       f"{gs.best_score:.4g} (iteration {gs.best_iteration}; margin {cfg.heldout_margin:g})")
    for name, v in sorted(guards.items()):
        ref = gs.guard_ref.get(name)
        if ref is not None and v < ref - cfg.guard_margin:
            reasons.append(f"guard reward {name} {v:.4g} fell {ref - v:.3g} below {ref:.4g} "
                           f"(margin {cfg.guard_margin:g})")
    if cfg.kl_bound > 0 and kl is not None and kl > cfg.kl_bound:
        reasons.append(f"KL to the base model {kl:.4g} passed the bound {cfg.kl_bound:g}")
    gs.evaluations += 1
    if reasons:
        return Verdict(reasons, False)
    for name, v in guards.items():
        gs.guard_ref[name] = max(v, gs.guard_ref.get(name, -math.inf))
    return Verdict([], gs.best_score is None or heldout > gs.best_score)


def decide(cfg: GuardConfig, gs: GuardState, iteration: int, heldout: float, guards: dict,
           kl: Optional[float], best_path: str) -> Verdict:
    """The run's verdict on one held-out evaluation (:func:`judge`), with ``rollback_to`` set when it
    trips and a best state is saved at ``best_path``.  One process: :func:`judge` itself.  Several
    processes: rank 0 judges its own scores (the other ranks' arguments are not used), then the
    verdict and rank 0's updated guard state are broadcast and ``gs`` takes that state over on every
    rank: every rank gets the same verdict and holds the same guard state afterwards."""
    verdict = None
    if distributed.is_writer():
        verdict = judge(cfg, gs, iteration, heldout, guards, kl)
        if verdict.tripped and gs.best_iteration is not None and os.path.exists(best_path):
            verdict.rollback_to = int(gs.best_iteration)
            verdict.best_file_iteration = best_iteration_of(best_path)
    if not distributed.active():
        return verdict
    verdict, decided = distributed.broadcast_object(
        (verdict, gs.to_dict()) if distributed.is_writer() else None)
    for k, v in GuardState.from_dict(decided).to_dict().items():
        setattr(gs, k, v)
    return verdict


def accept_best(gs: GuardState, iteration: int, score: float) -> None:
    gs.best_score, gs.best_iteration = float(score), int(iteration)


def save_best(state: RunState, path: str) -> None:
    """Write ``state`` as the best state (the run-checkpoint format; atomic).  Unlike
    :meth:`RunState.save` it does not mark the run as checkpointed.  Several processes: rank 0 writes."""
    if not is_writer():
        return
    tensors, md = state.state_tensors()
    write_checkpoint(path, tensors, md)


_KEPT = ("iteration", "optimizer_steps", "history", "last_reward", "last_objective", "stalled_iterations",
         "lineage", "companions")


def best_iteration_of(path: str) -> Optional[int]:
    """The iteration of the state in a best-state file (None: no file, or unreadable)."""
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            return int((f.metadata() or {}).get("iteration", ""))
    except Exception:
        return None


def rollback(state: RunState, path: str) -> None:
    """Restore LoRA, optimizer state, timestep generator and gradient scaler exactly as saved in
    ``path`` by :func:`save_best`; the iteration count, optimizer step count and history go on.  The
    run is left marked as not checkpointed (save it next).  Several processes (every rank calls it):
    rank 0 reads ``path`` and broadcasts what it read, so every rank loads the same bits and only
    rank 0 needs the file."""
    kept = {k: getattr(state, k) for k in _KEPT}
    kept["history"] = list(kept["history"])
    kept["companions"] = copy.deepcopy(kept["companions"])
    if distributed.active():
        tensors, md = distributed.broadcast_object(read_checkpoint(path) if distributed.is_writer() else None)
        state.load_tensors(tensors, md, path)
    else:
        state.load(path)
    for k, v in kept.items():
        setattr(state, k, v)
    state.saved_iteration = None


def lower_lr(gs: GuardState, factor: float) -> bool:
    """``lower_lr`` after a rollback: multiply the learning-rate scale by ``factor``, never below
    :data:`MIN_LR_SCALE`.  False when the scale was already at that floor (nothing changed)."""
    if gs.lr_scale <= MIN_LR_SCALE:
        return False
    gs.lr_scale = max(gs.lr_scale * float(factor), MIN_LR_SCALE)
    return True


def scaled_lr(base_lr: float, gs: Optional[GuardState]) -> float:
    return float(base_lr) * (gs.lr_scale if gs is not None else 1.0)


@dataclass
class Outcome:
    """What one held-out evaluation did to the run (:func:`apply_verdict`)."""
    lines: list             # what to tell the user (empty: nothing happened worth a line)
    event: Optional[dict]   # the rollback log entry of a trip (also appended to ``gs.rollbacks``)
    fields: dict            # this iteration's metrics fields (``guard_*``, ``rollback``)


def apply_verdict(state: RunState, gs: GuardState, cfg: GuardConfig, verdict: Verdict, heldout: float,
                  best_path: str, run_name: str, export_best: Optional[Callable[[], Optional[str]]] = None,
                  stop_loop: Optional[Callable[[], bool]] = None) -> Outcome:
    """Carry out the run's ``verdict`` (from :func:`decide`) on ``state`` and ``gs``: a new best is
    saved to ``best_path`` and accepted (then ``export_best()`` may export it; its return value is the
    exported path); a trip with a best state rolls LoRA and optimizer state back to it (refusing a
    best-state file that holds another iteration than the run's best), then ``lower_lr`` scales the
    learning rate (applied to the optimizer here) and ``stop`` records where the run stopped and calls
    ``stop_loop()`` (True: a pending re-queue was dropped).  The caller commits ``gs`` with the state
    (:func:`keep_guard`) afterwards.  Every rank calls it with the same verdict (:func:`decide`)."""
    it = state.iteration
    lines, fields, event = [], {}, None
    if verdict.new_best:
        save_best(state, best_path)
        accept_best(gs, it, heldout)
        lines.append(f"new best held-out reward {heldout:.4f} at iteration {it}")
        if export_best is not None:
            out = export_best()
            if out:
                fields["guard_best_path"] = out
    elif verdict.tripped:
        reason = "; ".join(verdict.reasons)
        event = {"iteration": it, "reason": reason, "action": cfg.action, "to_iteration": None}
        if verdict.rollback_to is not None:
            if verdict.best_file_iteration != verdict.rollback_to:  # rank 0 read it; every rank refuses
                raise CheckpointError(
                    f"PCPO Reward Guard: {best_path} holds iteration {verdict.best_file_iteration}, but the run's "
                    f"best state is iteration {verdict.rollback_to}: the file does not belong to this point of run "
                    f"{run_name!r} (copied in, or the run was started over by hand). Queue again with "
                    "the file moved away to continue without that rollback target, or use a new run_name.")
            rollback(state, best_path)  # several processes: every rank loads rank 0's best state
            event["to_iteration"] = gs.best_iteration
            if cfg.action == "lower_lr":
                if not lower_lr(gs, cfg.lr_factor):
                    event["lr_at_floor"] = True
                apply_lr(state, gs)
                event["lr"] = scaled_lr(state.settings.learning_rate, gs)
            lines.append(f"ROLLBACK at iteration {it} to iteration {gs.best_iteration}: {reason}")
            if event.get("lr_at_floor"):
                lines.append(f"the learning rate stays at {event['lr']:.3g}, its floor (1/{1 / MIN_LR_SCALE:g} of the "
                             "node's value): lower_lr lowers it no further")
        else:
            lines.append(f"guard tripped at iteration {it} with no best state yet: {reason}")
        if cfg.action == "stop":
            gs.stopped_at = it
            event["loop_cancelled"] = bool(stop_loop()) if stop_loop is not None else False
            lines.append("the loop stops here (queue again to continue from the restored state)")
        gs.rollbacks.append(event)
        fields["rollback"] = event
    fields.update(guard_best_iteration=gs.best_iteration, guard_best=gs.best_score, guard_lr_scale=gs.lr_scale,
                  guard_rollbacks=len(gs.rollbacks))
    return Outcome(lines, event, fields)


def apply_lr(state: RunState, gs: GuardState) -> None:
    """Set the optimizer's learning rate to the one the guard chose (``lower_lr`` scales the node's)."""
    if gs.lr_scale == 1.0:
        return
    lr = scaled_lr(state.settings.learning_rate, gs)
    for g in state.optimizer.param_groups:
        g["lr"] = lr
