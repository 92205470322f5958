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
  either the previous or the new state, never a mix.
* :class:`RunRegistry` -- live runs kept in memory between queued prompts, least recently used
  ones evicted (after their state is on disk) beyond a bound.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch

from .lora import LoRAWeightDelta, TARGET_PRESETS
from .trajectory import atomic_save_safetensors

OPTIMIZERS = ("AdamW", "Adam", "SGD")
FIXED_SETTINGS = ("rank", "alpha", "target_layers", "optimizer", "seed")
CHECKPOINT_FORMAT = "pcpo-run-2"
HISTORY_KEPT = 2000


class CheckpointError(ValueError):
    """A run checkpoint that cannot be used as it is (the message names the file and the fix)."""


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
            "stalled_iterations": str(self.stalled_iterations),
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
        """Write the checkpoint atomically (one file; the rename is the commit point)."""
        tensors, md = self.state_tensors()
        atomic_save_safetensors(tensors, path, md)
        self.saved_iteration = self.iteration

    def load(self, path: str) -> None:
        """Restore the whole state from ``path``; raises :class:`CheckpointError` naming the file and
        the fix for unreadable, mismatched or non-finite checkpoints.  Nothing changes on error."""
        tensors, md = read_checkpoint(path)
        self.load_tensors(tensors, md, path)

    def load_tensors(self, tensors: dict, md: dict, path: str) -> None:
        """:meth:`load` from the (tensors, metadata) of a checkpoint already read (``path`` names it
        in errors)."""
        saved = RunSettings.from_dict(json.loads(md.get("settings", "{}")))
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
                t = tensors[f"lora.{n}.{part}"]
                if tuple(t.shape) != tuple(getattr(a, part).shape):
                    raise CheckpointError(f"the run checkpoint {path} has {n}.{part} of shape {tuple(t.shape)}, the "
                                          f"model needs {tuple(getattr(a, part).shape)}: use a new run_name")
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"the run checkpoint {path} holds NaN or infinite values ({len(bad)} tensors, e.g. "
                                  f"{bad[0]!r}): the run diverged before it was saved. Delete the file (or move it "
                                  "away) to start the run over, lower the learning rate, or set resume to false.")
        opt_class = md.get("optimizer_class")
        if opt_class and opt_class != type(self.optimizer).__name__:
            raise CheckpointError(f"the run checkpoint {path} holds {opt_class} state, not {type(self.optimizer).__name__}: "
                                  "set optimizer back, or use a new run_name")
        groups = json.loads(md["optimizer_param_groups"])
        scalars = json.loads(md.get("optimizer_scalars", "{}"))
        state: dict = {}
        for k, t in tensors.items():
            if k.startswith("optimizer."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = t
        for idx, d in scalars.items():
            state.setdefault(int(idx), {}).update(d)
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        n_params = sum(len(g["params"]) for g in groups)
        if n_params != len(self.params()):
            raise CheckpointError(f"the run checkpoint {path} has optimizer state for {n_params} tensors, this LoRA "
                                  f"has {len(self.params())}: use a new run_name")
        with torch.inference_mode(False), torch.no_grad():
            for n, a in self.adapters.items():
                a.down.copy_(tensors[f"lora.{n}.down"])
                a.up.copy_(tensors[f"lora.{n}.up"])
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
            # the learning rate / weight decay of the node win over the saved ones
            self._set_group_hyperparameters(float(self.settings.learning_rate), float(self.settings.weight_decay))
        self.generator.set_state(tensors["generator"].clone())
        self.iteration = int(md.get("iteration", 0))
        self.optimizer_steps = int(md.get("optimizer_steps", 0))
        self.history = json.loads(md.get("history", "[]"))
        self.last_reward = md.get("last_reward") or None
        self.last_objective = md.get("last_objective") or None
        self.stalled_iterations = int(md.get("stalled_iterations") or 0)
        self._grad_scaler_state = json.loads(md["grad_scaler"]) if md.get("grad_scaler") else None
        if self.grad_scaler is not None and self._grad_scaler_state:
            self.grad_scaler.load_state_dict(self._grad_scaler_state)
        self.saved_iteration = self.iteration


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a run checkpoint, read outside inference mode (tensors are ordinary,
    so the optimizer can update them in place); unreadable files raise :class:`CheckpointError`."""
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
    for key in ("generator", ):
        if key not in tensors:
            raise CheckpointError(f"the run checkpoint {path} has no {key!r} entry; it is incomplete. Move it away "
                                  "to start the run over.")
    if "optimizer_param_groups" not in md:
        raise CheckpointError(f"the run checkpoint {path} has no optimizer state; it is incomplete. Move it away "
                              "to start the run over.")
    return tensors, md


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


if __name__ == "__main__":  # python -m comfyui_pcpo.run <workflow_api.json> --comfyui DIR --iterations N
    import sys as _sys
    from comfyui_pcpo.runner import main as _main
    _sys.exit(_main())
