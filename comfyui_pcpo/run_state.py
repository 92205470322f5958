"""A training run between iterations, and its checkpoint (host-free).

* :class:`RunSettings` -- the validated settings of a run.  ``rank``, ``alpha``, ``target_layers``,
  ``optimizer`` and ``seed`` define what is trained and cannot change once a run exists;
  ``learning_rate`` and ``weight_decay`` may change between iterations and are applied to the
  optimizer.
* :func:`make_optimizer` -- the one optimizer factory (AdamW / Adam: betas 0.9/0.999, eps 1e-8;
  SGD: momentum 0.9).
* :func:`rollout_seed` -- the seeding scheme of rollouts: each (seed, iteration, group) draws its
  own initial and step noise, so a resumed run samples exactly what an uninterrupted one would;
  :func:`step_noise_seed` derives from it the step-noise seed of a sampler handed its initial
  noise (the PCPO Sampler under SamplerCustom).
* :class:`RunState` -- adapters, optimizer, the timestep generator, iteration bookkeeping and the
  stats history.  An iteration is atomic: :meth:`RunState.snapshot` before the update and
  :meth:`RunState.restore` on any failure leave no trace of an interrupted update, and
  :meth:`RunState.commit` is the only place that advances the iteration.
* The checkpoint is ONE safetensors file (LoRA, optimizer state, generator state and metadata),
  written atomically: the rename is the single commit point, so a crash at any moment leaves
  either the previous or the new state, never a mix.  :func:`write_checkpoint` seals it with a
  SHA-256 of every tensor and of the metadata (whatever keys the file holds);
  :func:`read_checkpoint` and :meth:`RunState.load` verify checksums, metadata types, shapes,
  values and optimizer state before anything is used (see :func:`verify_checksums`).  Everything
  else a run writes is committed by it too: the checkpoint's metadata carries the run's
  *companions* (:data:`COMPANIONS`: the Reward Guard's state, the metrics records not yet known to
  be in ``metrics.jsonl``, the ids of the rating requests the iteration trained on) and its
  *lineage* (an id made when the run starts, which tells one run from another that reuses its
  name); ``guard.json``, ``metrics.jsonl`` and the marks in ``ratings.jsonl`` are logs derived
  from it and repaired from it on resume.
* :class:`RunRegistry` -- live runs kept in memory between queued prompts, least recently used
  ones evicted (after their state is on disk) beyond a bound.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch

from .lora import LoRAWeightDelta, TARGET_PRESETS
from .atomic import atomic_save_safetensors, dumps

OPTIMIZERS = ("AdamW", "Adam", "SGD")
FIXED_SETTINGS = ("rank", "alpha", "target_layers", "optimizer", "seed")
CHECKPOINT_FORMAT = "pcpo-run-2"
HISTORY_KEPT = 2000
CHECKSUM_KEY = "pcpo_checksums"  # metadata key: SHA-256 of every tensor and of the other metadata
CHECKSUM_ALGORITHM = "sha256"
# Largest |w| accepted in a LoRA weight.  A LoRA starts at |w| of order 1/sqrt(fan-in) (down) and 0
# (up), and the optimizer moves each weight by about the learning rate (at most 1) per step, so a
# trained LoRA's weights stay far below 1; 1e4 is beyond any healthy run.  At 1e4 one product
# up @ down already reaches 1e8 * alpha / rank, past fp16's largest value (65504) and far past what
# bf16/fp32 models tolerate: such a LoRA produces noise or NaN, never a usable image.
MAX_LORA_WEIGHT = 1e4
_NONNEG_INT = re.compile(r"[0-9]{1,18}")
OPTIMIZER_MOMENTS = {"AdamW": ("step", "exp_avg", "exp_avg_sq"), "Adam": ("step", "exp_avg", "exp_avg_sq"),
                     "SGD": ("momentum_buffer",)}
DAMAGED_FIX = ("It was not used: nothing was sampled, trained or written, and the LoRA exported so far (in "
               "models/loras) is unchanged. To go on, restore the file from a backup and queue again, or resume "
               "from the previous export: load it with a Load LoRA node in front of the PCPO LoRA node and "
               "start a new run_name (a new LoRA trains on top of it).")

log = logging.getLogger("comfyui_pcpo")


COMPANIONS = ("guard", "metrics", "ratings")  # JSON records committed with the checkpoint (see RunState)


class CheckpointError(ValueError):
    """A run checkpoint that cannot be used as it is (the message names the file and the fix)."""


def _damaged(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"the run checkpoint {path} {what}: the file is damaged. {DAMAGED_FIX}")


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (as safetensors stores them)."""
    h = hashlib.sha256()
    h.update(json.dumps([str(t.dtype).replace("torch.", ""), list(t.shape)]).encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def metadata_digest(md: dict) -> str:
    """SHA-256 of every metadata entry except the checksums themselves (canonical JSON)."""
    rest = {k: v for k, v in md.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode()).hexdigest()


def seal(tensors: dict, md: dict) -> dict:
    """``md`` plus :data:`CHECKSUM_KEY`: the digest of every tensor and of all other metadata, so
    keys added later (by any writer of the format) are covered without a change here."""
    md = {k: v for k, v in md.items() if k != CHECKSUM_KEY}
    sums = {"algorithm": CHECKSUM_ALGORITHM, "metadata": metadata_digest(md),
            "tensors": {k: tensor_digest(t) for k, t in sorted(tensors.items())}}
    md[CHECKSUM_KEY] = json.dumps(sums, sort_keys=True)
    return md


def write_checkpoint(path: str, tensors: dict, md: dict) -> None:
    """The one writer of the run-checkpoint format: seal (:func:`seal`) and write atomically."""
    atomic_save_safetensors(tensors, path, seal(tensors, md))


def verify_checksums(path: str, tensors: dict, md: dict) -> Optional[str]:
    """Check the checksums of a checkpoint read from ``path``; raises :class:`CheckpointError` on
    any mismatch, a missing or unlisted tensor.  Returns a note (not an error) for a checkpoint
    written before checksums existed, None when everything matches."""
    raw = md.get(CHECKSUM_KEY)
    if raw is None:
        return (f"the run checkpoint {path} has no checksums (written by an earlier comfyui-pcpo): its "
                "structure and values were checked, but a damaged byte inside a weight cannot be detected. "
                "The next checkpoint of the run carries checksums.")
    try:
        sums = json.loads(raw)
        ok = (isinstance(sums, dict) and sums.get("algorithm") == CHECKSUM_ALGORITHM
              and isinstance(sums.get("metadata"), str) and isinstance(sums.get("tensors"), dict)
              and all(isinstance(v, str) for v in sums["tensors"].values()))
    except ValueError:
        ok = False
    if not ok:
        raise _damaged(path, f"has an unreadable {CHECKSUM_KEY!r} entry")
    if metadata_digest(md) != sums["metadata"]:
        raise _damaged(path, "has metadata (settings, iteration, history, optimizer settings) that does not "
                       "match its checksum")
    listed = sums["tensors"]
    missing = sorted(set(listed) - set(tensors))
    if missing:
        raise _damaged(path, f"lacks {len(missing)} tensor(s) its checksums list (e.g. {missing[0]!r})")
    unlisted = sorted(set(tensors) - set(listed))
    if unlisted:
        raise _damaged(path, f"holds {len(unlisted)} tensor(s) its checksums do not list (e.g. {unlisted[0]!r})")
    bad = [k for k in sorted(tensors) if tensor_digest(tensors[k]) != listed[k]]
    if bad:
        raise _damaged(path, f"holds {len(bad)} tensor(s) whose bytes do not match their checksum (e.g. "
                       f"{bad[0]!r})")
    return None


def _json_field(path: str, md: dict, key: str, kind: type, default=None):
    """Metadata entry ``key`` parsed as JSON of type ``kind`` (``default`` when absent or empty)."""
    raw = md.get(key)
    if raw is None or (raw == "" and default is not None):
        if default is None:
            raise _damaged(path, f"has no {key!r} entry")
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise _damaged(path, f"has a {key!r} entry that is not a JSON {kind.__name__} ({raw[:60]!r})")
    return value


def _int_field(path: str, md: dict, key: str, required: bool = False) -> int:
    """Metadata entry ``key`` as a non-negative integer (0 when absent and not ``required``)."""
    raw = md.get(key)
    if raw is None or (raw == "" and not required):
        if required:
            raise _damaged(path, f"has no {key!r} entry")
        return 0
    if not (isinstance(raw, str) and _NONNEG_INT.fullmatch(raw)):
        raise _damaged(path, f"has {key} {raw[:40]!r}, not a non-negative whole number")
    return int(raw)


def parse_metadata(path: str, md: dict) -> dict:
    """The run metadata of a checkpoint, every entry parsed and type-checked (raises naming the file)."""
    out = {"settings": _json_field(path, md, "settings", dict),
           "iteration": _int_field(path, md, "iteration", required=True),
           "optimizer_steps": _int_field(path, md, "optimizer_steps"),
           "stalled_iterations": _int_field(path, md, "stalled_iterations"),
           "history": _json_field(path, md, "history", list, default=[]),
           "param_groups": _json_field(path, md, "optimizer_param_groups", list),
           "scalars": _json_field(path, md, "optimizer_scalars", dict, default={}),
           "grad_scaler": _json_field(path, md, "grad_scaler", dict, default={}) or None}
    if not all(isinstance(h, dict) for h in out["history"]):
        raise _damaged(path, "has a 'history' entry that is not a list of iteration records")
    groups = out["param_groups"]
    if not groups or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                             and all(isinstance(i, int) and not isinstance(i, bool) for i in g["params"])
                             for g in groups):
        raise _damaged(path, "has 'optimizer_param_groups' without a list of parameter indices per group")
    if not all(isinstance(k, str) and _NONNEG_INT.fullmatch(k) and isinstance(v, dict)
               for k, v in out["scalars"].items()):
        raise _damaged(path, "has an 'optimizer_scalars' entry that is not per-parameter records")
    for key in ("arch", "last_reward", "last_objective", "optimizer_class"):
        if key in md and not isinstance(md[key], str):
            raise _damaged(path, f"has a {key!r} entry that is not text")
    try:
        out["run_settings"] = RunSettings.from_dict(out["settings"])
    except (TypeError, ValueError) as e:
        raise _damaged(path, f"has settings that are not valid ({e})") from e
    return out
class CheckpointWriteError(OSError):
    """The run checkpoint could not be written (a full disk, permissions); the message names the file
    and says that the run is kept in memory."""


def new_lineage() -> str:
    """The id of a run that starts (kept in its checkpoint for the life of the run)."""
    import uuid
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RunSettings:
    rank: int = 16
    alpha: float = 16.0
    target_layers: str = "attention"
    learning_rate: float = 3e-4
    optimizer: str = "AdamW"
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not (float(self.alpha) > 0 and math.isfinite(float(self.alpha))):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if self.target_layers not in TARGET_PRESETS:
            raise ValueError(f"target_layers {self.target_layers!r} is unknown; choose one of {', '.join(TARGET_PRESETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if not (0 <= float(self.learning_rate) < math.inf):
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if not (0 <= float(self.weight_decay) < math.inf):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def fixed_changes(self, other: "RunSettings") -> list:
        """Names of the settings that define the trained state and differ from ``other``."""
        return [k for k in FIXED_SETTINGS if getattr(self, k) != getattr(other, k)]


SEED_HINT = (" A seed that changes on every press of Run comes from the seed's 'control after generate' "
             "widget: set 'control after generate' to fixed.")


def _seed_hint(changed: list) -> str:
    """The fix for a changed seed (the page's randomize control), if the seed is among ``changed``."""
    return SEED_HINT if "seed" in changed else ""


def make_optimizer(params, s: RunSettings) -> torch.optim.Optimizer:
    """The run's optimizer (created outside inference mode so its state can be updated in place)."""
    params = list(params)
    with torch.inference_mode(False):
        if s.optimizer == "AdamW":
            return torch.optim.AdamW(params, lr=s.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=s.weight_decay)
        if s.optimizer == "Adam":
            return torch.optim.Adam(params, lr=s.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        return torch.optim.SGD(params, lr=s.learning_rate, momentum=0.9, weight_decay=s.weight_decay)


def rollout_seed(seed: int, iteration: int, group: int) -> int:
    """Seed of group ``group``'s noise at ``iteration`` (initial noise and every step's noise)."""
    return (int(seed) * 1_000_003 + int(iteration) * 7919 + int(group)) % (2 ** 63)


def rollout_generator(seed: int, iteration: int, group: int) -> torch.Generator:
    return torch.Generator().manual_seed(rollout_seed(seed, iteration, group))


HELDOUT_ITERATION = -1  # the noise stream of the held-out evaluation: no training rollout uses it


def heldout_seed(seed: int, prompt_index: int) -> int:
    """Seed of held-out prompt ``prompt_index``'s noise: :func:`rollout_seed` at iteration -1 (the
    same for every evaluation of the run; for the same node seed never a training rollout's seed,
    whose iterations are >= 0 and groups far fewer than 7919)."""
    return rollout_seed(seed, HELDOUT_ITERATION, prompt_index)


def step_noise_seed(noise_seed: int) -> int:
    """Seed of the step noise of a sampler whose initial noise ComfyUI drew from ``noise_seed``
    (a CPU generator seeded with it): :func:`rollout_seed` of group 1 at iteration 0.  It never
    equals ``noise_seed`` (seed * 1_000_002 is even, -1 is odd modulo 2^63), so the first step's
    noise is never the initial noise."""
    return rollout_seed(noise_seed, 0, 1)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class RunState:
    """Everything of a run that persists between iterations."""

    def __init__(self, adapters: dict, settings: RunSettings, arch: str = ""):
        self.adapters = dict(adapters)
        self.settings = settings
        self.arch = arch
        self.optimizer = make_optimizer(self.params(), settings)
        self.generator = torch.Generator().manual_seed(int(settings.seed))  # draws trained timesteps
        self.iteration = 0           # completed sample -> score -> update rounds
        self.optimizer_steps = 0
        self.history: list = []      # one dict of scalar stats per iteration
        self.last_reward: Optional[str] = None
        self.last_objective: Optional[str] = None
        self.saved_iteration: Optional[int] = None  # iteration of the checkpoint on disk, if any
        self.grad_scaler = None            # torch.amp.GradScaler under fp16 compute
        self._grad_scaler_state: Optional[dict] = None  # loaded before a scaler was asked for
        self.stalled_iterations = 0        # consecutive iterations without a usable gradient
        self.load_notes: list = []         # non-fatal findings of the last load (shown by the next update)
        self.lineage = new_lineage()       # which run this is (a name reused after a restart is another)
        # JSON records committed with the checkpoint, by name (COMPANIONS); None: the checkpoint this
        # state came from was written before companions existed (its guard state is in guard.json)
        self.companions: Optional[dict] = {}

    def params(self) -> list:
        return [p for a in self.adapters.values() for p in a.parameters()]

    @property
    def dirty(self) -> bool:
        """True when the state in memory is ahead of the checkpoint on disk."""
        return self.saved_iteration != self.iteration

    # -- settings ---------------------------------------------------------------------------
    def check_settings(self, new: RunSettings, where: str = "") -> None:
        changed = self.settings.fixed_changes(new)
        if changed:
            detail = ", ".join(f"{k} {getattr(self.settings, k)!r} (got {getattr(new, k)!r})" for k in changed)
            raise ValueError(f"run was trained with {detail}{where}: these settings define the trained LoRA and "
                             "its optimizer state and cannot change within a run. Set them back, or use a new "
                             "run_name to start another run." + _seed_hint(changed))

    def apply_hyperparameters(self, new: RunSettings) -> list:
        """Apply a new learning rate / weight decay to the optimizer; returns what changed."""
        changes = []
        for key, group_key in (("learning_rate", "lr"), ("weight_decay", "weight_decay")):
            old, value = getattr(self.settings, key), float(getattr(new, key))
            if old != value:
                changes.append(f"{key} {old:g} -> {value:g}")
        self._set_group_hyperparameters(float(new.learning_rate), float(new.weight_decay))
        self.settings = RunSettings.from_dict({**self.settings.as_dict(),
                                               "learning_rate": float(new.learning_rate),
                                               "weight_decay": float(new.weight_decay)})
        return changes

    def _set_group_hyperparameters(self, lr: float, weight_decay: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if self.settings.optimizer != "Adam":  # plain Adam runs without weight decay (see make_optimizer)
                g["weight_decay"] = weight_decay

    def use_grad_scaling(self, enabled: bool, device="cpu") -> None:
        """Scale gradients (fp16 compute) or not; a scaler's state is kept in the checkpoint."""
        if not enabled:
            if self.grad_scaler is not None:
                self._grad_scaler_state = None
            self.grad_scaler = None
            return
        if self.grad_scaler is None:
            from .precision import new_grad_scaler
            self.grad_scaler = new_grad_scaler(device)
            if self._grad_scaler_state:
                self.grad_scaler.load_state_dict(self._grad_scaler_state)

    # -- iterations ---------------------------------------------------------------------------
    def commit(self, stats: dict, optimizer_steps: int, reward: str, objective: str) -> None:
        """Record a completed iteration (the only place the iteration advances)."""
        self.iteration += 1
        self.optimizer_steps += int(optimizer_steps)
        self.last_reward, self.last_objective = reward, objective
        self.history.append(dict(stats, iteration=self.iteration))

    def snapshot(self) -> dict:
        """CPU copy of the state an update changes (adapters, optimizer, generator)."""
        with torch.inference_mode(False), torch.no_grad():
            opt = self.optimizer.state_dict()
            return {
                "adapters": {n: (_cpu_copy(a.down), _cpu_copy(a.up)) for n, a in self.adapters.items()},
                "optimizer": {"state": {i: {k: (_cpu_copy(v) if torch.is_tensor(v) else copy.deepcopy(v))
                                            for k, v in s.items()} for i, s in opt["state"].items()},
                              "param_groups": copy.deepcopy(opt["param_groups"])},
                "generator": self.generator.get_state(),
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            }

    def restore(self, snap: dict) -> None:
        """Undo everything since :meth:`snapshot` (an interrupted or failed update)."""
        with torch.inference_mode(False), torch.no_grad():
            for n, a in self.adapters.items():
                down, up = snap["adapters"][n]
                a.down.copy_(down)
                a.up.copy_(up)
                a.down.grad = a.up.grad = None
            self.optimizer.load_state_dict(snap["optimizer"])
        self.generator.set_state(snap["generator"])
        if self.grad_scaler is not None and snap.get("grad_scaler"):
            self.grad_scaler.load_state_dict(snap["grad_scaler"])

    # -- checkpoint -----------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "settings": json.dumps(self.settings.as_dict(), sort_keys=True),
            "arch": self.arch, "iteration": str(self.iteration), "optimizer_steps": str(self.optimizer_steps),
            "history": json.dumps(self.history[-HISTORY_KEPT:]), "last_reward": self.last_reward or "",
            "last_objective": self.last_objective or "", "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "grad_scaler": json.dumps(self.grad_scaler.state_dict()) if self.grad_scaler is not None else "",
            "stalled_iterations": str(self.stalled_iterations), "lineage": self.lineage,
            **{f"companion_{k}": dumps(v, sort_keys=True)
               for k, v in (self.companions or {}).items() if k in COMPANIONS and v is not None},
        }

    def state_tensors(self) -> tuple[dict, dict]:
        """(tensors, metadata) of the whole run state, as written to the checkpoint."""
        tensors = {}
        for name, a in self.adapters.items():
            tensors[f"lora.{name}.down"] = _cpu_copy(a.down).contiguous()
            tensors[f"lora.{name}.up"] = _cpu_copy(a.up).contiguous()
        sd = self.optimizer.state_dict()
        scalars = {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optimizer.{idx}.{k}"] = _cpu_copy(v).contiguous()
                else:
                    scalars.setdefault(str(idx), {})[k] = v
        tensors["generator"] = self.generator.get_state().clone()
        md = self.metadata()
        md["optimizer_param_groups"] = json.dumps(sd["param_groups"])
        md["optimizer_scalars"] = json.dumps(scalars)
        md["optimizer_class"] = type(self.optimizer).__name__
        return tensors, md

    def save(self, path: str) -> None:
        """Write the checkpoint atomically (one file; the rename is the commit point), sealed with
        the checksums of all it holds (:func:`write_checkpoint`).  A failed write (a full disk)
        raises :class:`CheckpointWriteError` naming the file; the previous checkpoint stays and this
        state stays unsaved (written at the next save)."""
        tensors, md = self.state_tensors()
        try:
            write_checkpoint(path, tensors, md)
        except Exception as e:
            # safetensors reports a failed write (a full disk) as its own SafetensorError, not OSError
            if not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
                raise
            err = CheckpointWriteError(
                f"could not write the run checkpoint {path} ({getattr(e, 'strerror', None) or e}). Free space on "
                f"that disk (or fix its permissions) and queue again: the run is kept in memory at iteration "
                f"{self.iteration} with its metrics, and the checkpoint on disk still holds the last one written")
            err.errno = getattr(e, "errno", None)
            raise err from e
        self.saved_iteration = self.iteration

    def load(self, path: str) -> None:
        """Restore the whole state from ``path``; raises :class:`CheckpointError` naming the file and
        the fix for unreadable, damaged, mismatched or non-finite checkpoints.  Everything is checked
        before anything changes (nothing changes on error).  A checkpoint without checksums (written
        before they existed) loads, with a note in :attr:`load_notes` and the log."""
        notes: list = []
        tensors, md = read_checkpoint(path, notes)
        self.load_tensors(tensors, md, path, notes)

    def load_tensors(self, tensors: dict, md: dict, path: str, notes: Optional[list] = None) -> None:
        """:meth:`load` from the (tensors, metadata) of a checkpoint already read and verified by
        :func:`read_checkpoint` (``path`` names it in errors; ``notes`` are its load notes)."""
        notes = [] if notes is None else notes
        meta = parse_metadata(path, md)
        companions = read_companions(path, md)
        saved = meta["run_settings"]
        changed = saved.fixed_changes(self.settings)
        if changed:
            detail = ", ".join(f"{k}={getattr(saved, k)!r}" for k in changed)
            now = ", ".join(f"{k}={getattr(self.settings, k)!r}" for k in changed)
            raise CheckpointError(
                f"the run checkpoint {path} was trained with {detail}, but the node now says {now}: these "
                "settings define the trained LoRA and cannot change when resuming. Set them back, or use a new "
                "run_name (or set resume to false) to start another run." + _seed_hint(changed))
        if md.get("arch") and self.arch and md["arch"] != self.arch:
            raise CheckpointError(f"the run checkpoint {path} trains a {md['arch']} model, not this {self.arch} "
                                  "model: use a new run_name for another model")
        missing = [n for n in self.adapters if f"lora.{n}.up" not in tensors or f"lora.{n}.down" not in tensors]
        extra = [k for k in tensors if k.startswith("lora.") and k[5:].rsplit(".", 1)[0] not in self.adapters]
        if missing or extra:
            ex = (missing or extra)[0]
            raise CheckpointError(f"the run checkpoint {path} does not match this model ({len(missing)} LoRA layers "
                                  f"missing, {len(extra)} unknown, e.g. {ex!r}): use a new run_name for this model")
        for n, a in self.adapters.items():
            for part in ("down", "up"):
                t, want = tensors[f"lora.{n}.{part}"], getattr(a, part)
                if tuple(t.shape) != tuple(want.shape):
                    raise CheckpointError(f"the run checkpoint {path} has {n}.{part} of shape {tuple(t.shape)}, the "
                                          f"model needs {tuple(want.shape)}: use a new run_name")
                if t.dtype != want.dtype:
                    raise _damaged(path, f"has {n}.{part} stored as {t.dtype}, the run trains {want.dtype}")
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"the run checkpoint {path} holds NaN or infinite values ({len(bad)} tensors, e.g. "
                                  f"{bad[0]!r}): the run diverged before it was saved. Delete the file (or move it "
                                  "away) to start the run over, lower the learning rate, or set resume to false.")
        huge = [(k, float(t.abs().max())) for k, t in tensors.items()
                if k.startswith("lora.") and t.numel() and float(t.abs().max()) > MAX_LORA_WEIGHT]
        if huge:
            k, v = max(huge, key=lambda kv: kv[1])
            raise CheckpointError(
                f"the run checkpoint {path} holds LoRA weights of magnitude {v:.3g} ({len(huge)} tensors beyond "
                f"{MAX_LORA_WEIGHT:g}, e.g. {k!r}): no usable LoRA has weights that large, so the file is damaged "
                f"or the run diverged before it was saved. {DAMAGED_FIX} If the run diverged, also lower the "
                "learning rate.")
        gen = tensors["generator"]
        reference = torch.Generator().get_state()
        if gen.dtype != reference.dtype or tuple(gen.shape) != tuple(reference.shape):
            raise _damaged(path, f"has a generator state of {gen.dtype} {tuple(gen.shape)}, not "
                           f"{reference.dtype} {tuple(reference.shape)}")
        try:
            torch.Generator().set_state(gen.clone())
        except (RuntimeError, ValueError) as e:
            raise _damaged(path, f"has a generator state torch refuses ({e})") from e
        opt_class = md.get("optimizer_class")
        if opt_class and opt_class != type(self.optimizer).__name__:
            raise CheckpointError(f"the run checkpoint {path} holds {opt_class} state, not {type(self.optimizer).__name__}: "
                                  "set optimizer back, or use a new run_name")
        groups = meta["param_groups"]
        state = self._check_optimizer_state(path, tensors, meta["scalars"], groups)
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        scaler_state = meta["grad_scaler"]
        # -- everything is checked: apply
        with torch.inference_mode(False), torch.no_grad():
            for n, a in self.adapters.items():
                a.down.copy_(tensors[f"lora.{n}.down"])
                a.up.copy_(tensors[f"lora.{n}.up"])
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
            # the learning rate / weight decay of the node win over the saved ones
            self._set_group_hyperparameters(float(self.settings.learning_rate), float(self.settings.weight_decay))
        self.generator.set_state(gen.clone())
        self.iteration = meta["iteration"]
        self.optimizer_steps = meta["optimizer_steps"]
        self.history = meta["history"]
        self.last_reward = md.get("last_reward") or None
        self.last_objective = md.get("last_objective") or None
        self.stalled_iterations = meta["stalled_iterations"]
        self._grad_scaler_state = scaler_state
        if self.grad_scaler is not None and self._grad_scaler_state:
            self.grad_scaler.load_state_dict(self._grad_scaler_state)
        self.lineage = md.get("lineage") or new_lineage()  # an older checkpoint: its lineage starts here
        self.companions = companions
        self.saved_iteration = self.iteration
        self.load_notes = notes

    def _check_optimizer_state(self, path: str, tensors: dict, scalars: dict, groups: list) -> dict:
        """The optimizer state of a checkpoint as ``load_state_dict`` takes it, after checking that it
        covers exactly this LoRA's parameters, every parameter with state has all its moments, and
        every moment has its parameter's shape and finite values."""
        params = self.params()
        indices = [i for g in groups for i in g["params"]]
        if len(indices) != len(params):
            raise CheckpointError(f"the run checkpoint {path} has optimizer state for {len(indices)} tensors, this "
                                  f"LoRA has {len(params)}: use a new run_name")
        if sorted(indices) != list(range(len(params))):
            raise _damaged(path, f"has optimizer parameter indices {sorted(indices)[:8]} that are not 0..{len(params) - 1}")
        state: dict = {}
        for k, t in tensors.items():
            if k.startswith("optimizer."):
                parts = k.split(".", 2)
                if len(parts) != 3 or not _NONNEG_INT.fullmatch(parts[1]):
                    raise _damaged(path, f"has an optimizer entry {k!r} that names no parameter")
                state.setdefault(int(parts[1]), {})[parts[2]] = t
        for idx, d in scalars.items():
            state.setdefault(int(idx), {}).update(d)
        required = OPTIMIZER_MOMENTS.get(type(self.optimizer).__name__, ())
        for idx in sorted(state):
            if idx >= len(params):
                raise _damaged(path, f"has optimizer state for parameter {idx}, the LoRA has {len(params)}")
            st, p = state[idx], params[indices.index(idx)]
            lacking = [k for k in required if k not in st]
            if lacking:
                raise _damaged(path, f"lacks the optimizer moment(s) {', '.join(lacking)} of parameter {idx} "
                               f"(optimizer.{idx}.{lacking[0]})")
            for key, v in st.items():
                if key == "step":
                    step = float(v) if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, (int, float)) else None
                    if step is None or not (0 <= step < math.inf) or step != int(step):
                        raise _damaged(path, f"has optimizer.{idx}.step {v!r}, not a whole number of steps")
                elif torch.is_tensor(v):
                    if tuple(v.shape) != tuple(p.shape):
                        raise _damaged(path, f"has optimizer.{idx}.{key} of shape {tuple(v.shape)}, its parameter "
                                       f"has shape {tuple(p.shape)}")
                    if v.dtype != p.dtype:
                        raise _damaged(path, f"has optimizer.{idx}.{key} stored as {v.dtype}, its parameter is {p.dtype}")
                elif v is not None:
                    raise _damaged(path, f"has optimizer.{idx}.{key} = {v!r}, not a tensor")
        return state


def read_checkpoint(path: str, notes: Optional[list] = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a run checkpoint, read outside inference mode (tensors are ordinary,
    so the optimizer can update them in place) and verified against its checksums
    (:func:`verify_checksums`); unreadable or damaged files raise :class:`CheckpointError`.  A
    checkpoint without checksums is logged and its note appended to ``notes``."""
    from safetensors import safe_open
    try:
        with torch.inference_mode(False), safe_open(path, framework="pt", device="cpu") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(
            f"the run checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Move it away (or delete it) to start the run over, or set resume to false.") from e
    if md.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a {CHECKPOINT_FORMAT} run checkpoint (format {md.get('format')!r}; checkpoints of "
            "comfyui-pcpo 0.1 kept the optimizer in a separate file): use a new run_name, or move the old "
            "run folder away.")
    note = verify_checksums(path, tensors, md)
    if note:
        log.warning("PCPO: %s", note)
        if notes is not None:
            notes.append(note)
    for key in ("generator", ):
        if key not in tensors:
            raise CheckpointError(f"the run checkpoint {path} has no {key!r} entry; it is incomplete. Move it away "
                                  "to start the run over.")
    if "optimizer_param_groups" not in md:
        raise CheckpointError(f"the run checkpoint {path} has no optimizer state; it is incomplete. Move it away "
                              "to start the run over.")
    return tensors, md


def read_companions(path: str, md: dict) -> Optional[dict]:
    """The companion records of a checkpoint's metadata; None for a checkpoint written before they
    existed (no ``lineage`` key).  Unreadable records raise :class:`CheckpointError`."""
    if "lineage" not in md:
        return None
    out = {}
    for k in COMPANIONS:
        raw = md.get(f"companion_{k}")
        if raw is None:
            continue
        try:
            out[k] = json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"the run checkpoint {path} holds an unreadable {k} record ({e}); it is corrupt. "
                                  "Resume from an earlier copy of the run folder, or use a new run_name.") from e
    return out


def checkpoint_lineage(path: str) -> Optional[str]:
    """The lineage stored in a run checkpoint (None: no file, unreadable, or written before lineages)."""
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("lineage") or None
    except Exception:
        return None


class RunRegistry:
    """Live runs by name, least recently used first.  ``max_live`` bounds how many stay in memory:
    when a run is added beyond it, the least recently used others are handed to ``evict`` (which
    writes their checkpoint) and dropped."""

    def __init__(self, max_live: int = 2):
        self.max_live = int(max_live)
        self._runs: "OrderedDict[str, object]" = OrderedDict()

    def get(self, name: str):
        run = self._runs.get(name)
        if run is not None:
            self._runs.move_to_end(name)
        return run

    def put(self, name: str, run, evict: Optional[Callable[[object], None]] = None) -> list:
        """Add (or replace) ``name``; returns the names evicted to stay within ``max_live``."""
        self._runs[name] = run
        self._runs.move_to_end(name)
        evicted = []
        while len(self._runs) > max(1, self.max_live):
            old_name, old = next(iter(self._runs.items()))
            if evict is not None:
                evict(old)
            del self._runs[old_name]
            evicted.append(old_name)
        return evicted

    def pop(self, name: str, default=None):
        return self._runs.pop(name, default)

    def __contains__(self, name) -> bool:
        return name in self._runs

    def __getitem__(self, name):
        return self._runs[name]

    def __len__(self) -> int:
        return len(self._runs)

    def names(self) -> list:
        return list(self._runs)


def new_adapters(shapes: dict, targets: list, rank: int, alpha: float, seed: int, device=None,
                 dtype=torch.float32) -> dict:
    """LoRA adapters for ``targets`` (module names with weight shapes in ``shapes``), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(False):
        return {n: LoRAWeightDelta(shapes[n], rank, alpha, dtype=dtype, device=device, generator=g) for n in targets}

