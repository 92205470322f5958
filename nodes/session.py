"""PCPO LoRA: a training session (trainable MODEL + the run's state + run folder).

The run's state and checkpoint format live in the core (``comfyui_pcpo.run_state``); a session adds what
needs ComfyUI: the trainable clone of the MODEL and the run folder inside ComfyUI's output folder.
Sessions live in a bounded registry keyed by run name, so re-queued prompts continue the same run
with the LoRA and optimizer resident on the load device; least recently used runs are checkpointed
and leave memory when more than ``PCPO_MAX_LIVE_RUNS`` (default 2) are live, and come back from
their checkpoint when used again.

Who may continue a run follows ``comfyui_pcpo.lineage``: a press with resume on continues the run of
its name; with resume off it starts a new run and never overwrites one that exists (refused, naming
the run and the fixes); the prompts a loop re-queues continue it when their loop id is one this
server issued for the run's lineage.  Every write of the run state goes through
:meth:`Session.save_checkpoint`, the run's one commit point (``comfyui_pcpo.commit``).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass

import folder_paths

from comfyui_pcpo import commit as C
from comfyui_pcpo import distributed
from comfyui_pcpo import __version__
from comfyui_pcpo import lineage as L
from comfyui_pcpo.lora import TARGET_PRESETS
from comfyui_pcpo.metrics import MetricsLog, metrics_path
from comfyui_pcpo.precision import PRECISIONS, Precision, resolve_precision
from comfyui_pcpo.run_state import (OPTIMIZERS, CheckpointError, RunRegistry, RunSettings, RunState, checkpoint_lineage)

from comfyui_pcpo.validate import name_error

from .model_hooks import attach_lora, model_family
from .requeue import LOOPS, find_loop  # noqa: F401  (LOOPS: the headless runner starts its loop there)
from .validation import check_prompt, verdict

log = logging.getLogger("comfyui-pcpo")

SESSIONS = RunRegistry(max_live=int(os.environ.get("PCPO_MAX_LIVE_RUNS", "2") or 2))
CHECKPOINTING = ("auto", "on", "off")
# architectures whose activations make gradient checkpointing worth its recomputation by default
_LARGE_ARCHS = ("SDXL", "SD3", "Flux")


@dataclass(frozen=True)
class TrainingOptions:
    """How a run computes (not part of its trained state: may change between iterations)."""
    precision: Precision
    checkpointing: bool

    @classmethod
    def resolve(cls, model, precision: str = "auto", checkpointing: str = "auto") -> "TrainingOptions":
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing {checkpointing!r} is unknown; choose one of "
                             f"{', '.join(CHECKPOINTING)}")
        arch = model_family(model).arch
        on = arch.startswith(_LARGE_ARCHS) if checkpointing == "auto" else checkpointing == "on"
        return cls(resolve_precision(precision, model.load_device), on)


def check_run_name(run_name: str) -> str:
    err = name_error("run_name", run_name, kind="run")
    if err:
        raise ValueError(err)
    return run_name


def run_dir_for(run_name: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), "pcpo", check_run_name(run_name))


class Session:
    """One run: the trainable MODEL clone plus the core :class:`RunState`."""

    def __init__(self, run_name: str, base_model, settings: RunSettings, owner=None,
                 options: TrainingOptions | None = None):
        self.run_name = run_name
        self.run_dir = run_dir_for(run_name)
        self.base_model = base_model
        self.family = model_family(base_model)
        self.options = options or TrainingOptions.resolve(base_model)
        self.owner = None if owner is None else str(owner)  # id of the PCPO LoRA node that made it
        self.token = uuid.uuid4().hex  # this session object (a trajectory it sampled carries it)
        self.evicted = False
        self.replaced = False
        # the update committed an iteration in memory and a node after it (Held-out Evaluation or
        # Reward Guard) writes the checkpoint: {"by": node class, "checkpoint": due}
        self.pending_commit = None
        self.memo: dict = {}  # what this process already wrote of the derived logs
        self._build(settings)

    def _build(self, settings: RunSettings) -> None:
        self.model, adapters = self._attach(settings=settings)
        self.state = RunState(adapters, settings, arch=self.family.arch)
        self.state.use_grad_scaling(self.options.precision.grad_scaling, self.base_model.load_device)

    def _attach(self, settings: RunSettings | None = None, adapters: dict | None = None):
        s = settings or RunSettings()
        return attach_lora(self.base_model, s.rank, s.alpha, s.target_layers, seed=s.seed, adapters=adapters,
                           compute_dtype=self.options.precision.dtype, checkpointing=self.options.checkpointing)

    # -- the run state, as the nodes read it ------------------------------------------------
    adapters = property(lambda self: self.live().state.adapters)
    optimizer = property(lambda self: self.live().state.optimizer)
    generator = property(lambda self: self.live().state.generator)
    iteration = property(lambda self: self.live().state.iteration)
    optimizer_steps = property(lambda self: self.live().state.optimizer_steps)
    history = property(lambda self: self.live().state.history)
    settings = property(lambda self: self.live().state.settings.as_dict())

    def params(self) -> list:
        return self.live().state.params()

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.safetensors")

    # -- registry life cycle ------------------------------------------------------------------
    def live(self) -> "Session":
        """This session, brought back from its checkpoint if it was evicted from memory."""
        if self.replaced:
            raise RuntimeError(f"run {self.run_name!r} was started over by another PCPO LoRA node run; queue the "
                               "workflow again")
        if self.evicted:
            settings = RunSettings.from_dict(self._settings_when_evicted)
            self._build(settings)
            self.state.load(self.checkpoint_path)
            self.repair()
            self.evicted = False
            SESSIONS.put(self.run_name, self, evict=_evict)
            log.info("PCPO: run %s back in memory at iteration %d", self.run_name, self.state.iteration)
        return self

    def release(self) -> None:
        """Leave memory (the checkpoint must be current): drop the trainable model and run state."""
        self._settings_when_evicted = self.state.settings.as_dict()
        self.model = None
        self.state = None
        self.evicted = True

    def rebind(self, base_model) -> None:
        """Attach the same adapters to a (new) upstream MODEL object."""
        fam = model_family(base_model)
        if fam.arch != self.family.arch:
            raise ValueError(f"run {self.run_name!r} trains a {self.family.arch} model but got a {fam.arch} "
                             "MODEL; use a new run_name for another model")
        self.base_model = base_model
        self.model, _ = self._attach(adapters=self.state.adapters)

    def set_options(self, options: TrainingOptions) -> None:
        """Compute in another precision / with or without checkpointing from the next iteration."""
        if options != self.options:
            self.options = options
            self.model, _ = self._attach(adapters=self.state.adapters)
            self.state.use_grad_scaling(options.precision.grad_scaling, self.base_model.load_device)
            log.info("PCPO: run %s computes in %s, gradient checkpointing %s", self.run_name,
                     options.precision.name, "on" if options.checkpointing else "off")

    # -- metadata / checkpoints ----------------------------------------------------------------
    def metadata(self) -> dict:
        st = self.live().state
        return {
            "pcpo_run": self.run_name, "pcpo_base_model": self.family.arch,
            "pcpo_prediction": self.family.prediction, "pcpo_iterations": str(st.iteration),
            "pcpo_steps": str(st.optimizer_steps), "pcpo_reward": str(st.last_reward or ""),
            "pcpo_objective": str(st.last_objective or ""),
            "pcpo_settings": json.dumps(st.settings.as_dict(), sort_keys=True), "pcpo_version": __version__,
            "pcpo_reward_mean_last": f"{st.history[-1]['reward_mean']:.6g}" if st.history else "",
        }

    @property
    def lineage(self) -> str:
        return self.live().state.lineage

    def metrics_log(self) -> MetricsLog:
        """The run's ``metrics.jsonl``, read once per session and then kept in memory (this process is
        its only writer)."""
        path = metrics_path(self.run_dir)
        log_ = getattr(self, "_pcpo_metrics", None)
        if log_ is None or log_.path != path:
            log_ = self._pcpo_metrics = MetricsLog(path)
        return log_

    def save_checkpoint(self) -> None:
        """The run's commit point: write the whole run state -- LoRA, optimizer, generator, and the
        guard state, metrics records and rated requests of the iteration -- as one atomic file
        (``output/pcpo/<run>/checkpoint.safetensors``), then the logs derived from it.  The metrics
        line goes first (a full disk loses no line: it stays with the run).  With several processes
        only rank 0 writes (every rank holds the same state)."""
        state = self.live().state
        self.pending_commit = None
        if distributed.is_writer():
            C.flush_metrics(state, self.metrics_log(), self.run_name)
            state.save(self.checkpoint_path)
            C.write_derived(state, self.run_dir, self.run_name, self.memo)
        else:
            state.saved_iteration = state.iteration

    def commit_pending(self, by: str | None = None, force: bool = False) -> bool:
        """Write the checkpoint the update left to ``by`` (the node class finishing the iteration; None:
        whoever comes first), or with ``force`` in any case; True when written."""
        p = self.pending_commit
        if p is not None and by is not None and p["by"] != by:
            return False
        if force or (p is not None and p["checkpoint"]):
            self.save_checkpoint()
            return True
        self.pending_commit = None
        if distributed.is_writer():
            C.flush_metrics(self.live().state, self.metrics_log(), self.run_name)
        return False

    def repair(self) -> None:
        """After loading the checkpoint: the derived logs follow it (see ``comfyui_pcpo.commit``)."""
        if distributed.is_writer():
            C.repair(self.state, self.run_dir, self.run_name, self.metrics_log(), self.memo)
        elif self.state.companions is None:
            self.state.companions = {}

    def save_if_dirty(self) -> bool:
        if self.state is not None and (self.state.dirty or self.pending_commit is not None):
            self.save_checkpoint()
            return True
        return False


def _evict(session: Session) -> None:
    session.save_if_dirty()
    session.release()
    log.info("PCPO: run %s checkpointed and released from memory", session.run_name)


def get_session(run_name: str, model, settings: RunSettings, resume: bool, owner=None, extra_pnginfo=None,
                options: TrainingOptions | None = None) -> Session:
    """The live session for ``run_name`` (continued, resumed from disk, or new); see PCPO LoRA.

    A press (a prompt the user queued) with ``resume`` on continues the run; with ``resume`` off it
    starts a new run, and one that exists -- a checkpoint on disk, or a live run that has trained --
    is refused (never overwritten).  A prompt that a loop of this run re-queued continues it either
    way (its loop id is looked up on the server, never trusted from the prompt)."""
    check_run_name(run_name)
    options = options or TrainingOptions.resolve(model)
    sess = SESSIONS.get(run_name)
    ckpt = os.path.join(run_dir_for(run_name), "checkpoint.safetensors")
    on_disk = os.path.exists(ckpt)
    disk_lineage = checkpoint_lineage(ckpt) if on_disk and sess is None else None  # read only when it decides
    action = L.session_action(
        resume, live_in_loop=sess is not None and find_loop(extra_pnginfo, run_name, sess.lineage) is not None,
        live_trained=None if sess is None else (sess.iteration > 0 or on_disk),
        disk_in_loop=disk_lineage is not None and find_loop(extra_pnginfo, run_name, disk_lineage) is not None,
        on_disk=on_disk)
    if action == L.REFUSE:
        where = (f"live in this ComfyUI at iteration {sess.iteration}" if sess is not None
                 else f"its checkpoint {ckpt}")
        raise L.refuse_restart(run_name, run_dir_for(run_name), where)
    if action == L.CONTINUE_LIVE:
        sess.live()
        sess.state.check_settings(settings, where=f" (run {run_name!r} is live)")
        changes = sess.state.apply_hyperparameters(settings)
        if changes:
            log.info("PCPO: run %s: %s", run_name, ", ".join(changes))
        if sess.base_model is not model:
            sess.rebind(model)
        sess.set_options(options)
        return sess
    if action == L.START_OVER:  # a new run that has not trained yet: nothing on disk is lost
        SESSIONS.pop(run_name)
        sess.replaced = True
        log.info("PCPO: run %s starts over (resume is off; it had not trained)", run_name)
    sess = Session(run_name, model, settings, owner=owner, options=options)
    if action == L.RESUME_DISK:
        try:
            sess.state.load(sess.checkpoint_path)
            sess.repair()
        except CheckpointError as e:
            raise ValueError(f"PCPO LoRA: {e}") from e
        log.info("PCPO: resumed run %s at iteration %d", run_name, sess.state.iteration)
    else:
        sess.repair()  # a new run: logs left by a run of this name whose checkpoint is gone follow it
    SESSIONS.put(run_name, sess, evict=_evict)
    return sess


class PCPOLoRA:
    """MODEL -> MODEL with a trainable LoRA, plus the session handle the other PCPO nodes use."""

    CATEGORY = "PCPO"
    FUNCTION = "create"
    RETURN_TYPES = ("MODEL", "PCPO_SESSION")
    RETURN_NAMES = ("model", "session")
    OUTPUT_TOOLTIPS = ("A copy of the input model with the live, trainable LoRA attached (use it for previews). "
                       "The input model itself is never changed.",
                       "The training session: wire it into the Trajectory Sampler, LoRA Update and Export nodes.")
    DESCRIPTION = ("Starts (or resumes) a PCPO training run: attaches a trainable LoRA to a copy of the model. The "
                   "LoRA and optimizer stay in memory between queued prompts and are checkpointed to "
                   "output/pcpo/RUN_NAME/ (RUN_NAME is the run_name below).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to align (SD1.x, SD2.x, SDXL, SD3 or FLUX). It is not "
                                "changed: training happens on a copy."}),
            "run_name": ("STRING", {"default": "pcpo_run", "tooltip": "Name of the run: its checkpoint lives in "
                                    "output/pcpo/RUN_NAME/. Re-using a name continues that run."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank (reference: 16; 4-64 is "
                             "usual, 256 the most accepted: a larger rank costs memory without training better). "
                             "A layer smaller than the rank gets the layer's size (logged). Fixed for the life of "
                             "a run."}),
            "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                "tooltip": "LoRA alpha; the update is scaled by alpha / rank (usual: alpha = rank; "
                                "at most 1024, 4 x the largest rank). Fixed for the life of a run."}),
            "target_layers": (list(TARGET_PRESETS), {"default": "attention", "tooltip":
                              "Which layers get a LoRA: attention projections (reference), + MLPs, all linear "
                              "layers, or all linear and conv layers. Fixed for the life of a run."}),
            "learning_rate": ("FLOAT", {"default": 3e-4, "min": 0.0, "max": 0.1, "step": 1e-6, "round": False,
                                        "tooltip": "Optimizer learning rate (6 decimals, e.g. 0.000005 = 5e-6; at "
                                        "most 0.1, which already destroys a LoRA with Adam in a few steps). "
                                        "Start with 3e-4 for a LoRA (the reference); lower it (1e-4 or less) if the "
                                        "reward jumps around or the images break, raise it if nothing changes in 20 "
                                        "iterations. A new value applies from the next update, also after resuming."}),
            "optimizer": (list(OPTIMIZERS), {"default": "AdamW", "tooltip": "AdamW/Adam use betas 0.9/0.999, eps "
                          "1e-8; SGD uses momentum 0.9. Fixed for the life of a run."}),
            "weight_decay": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                       "tooltip": "Pulls the LoRA weights towards zero a little every step (AdamW: "
                                       "decoupled; SGD: L2; Adam ignores it). 1e-4 is a safe default; 0 turns it off."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": True, "tooltip":
                             "Seeds the LoRA initialisation and the choice of trained timesteps. Fixed for the life "
                             "of a run."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "On: continue the run of this name (from its "
                                   "checkpoint after a restart). Off: start a new run; a run that already exists is "
                                   "never overwritten (refused: use a new run_name, or delete its folder in "
                                   "output/pcpo to start it over)."}),
        }, "optional": {
            "training_precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                                   "The precision the model computes in while training (LoRA and optimizer always "
                                   "stay fp32). auto: bf16 on GPUs that support it, else fp16 with gradient "
                                   "scaling; fp32 on a CPU. fp32 is exact but uses the most memory."}),
            "gradient_checkpointing": (list(CHECKPOINTING), {"default": "auto", "tooltip":
                                       "Recompute activations during the backward pass instead of storing them: "
                                       "much less memory, about a third more time. auto: on for SDXL, SD3 and FLUX."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO", "prompt": "PROMPT"}}

    @classmethod
    def IS_CHANGED(cls, resume=None, **kw):
        # resume off is decided on every prompt (a press refuses an existing run, a loop continues
        # it), not only when ComfyUI's cache misses; resume on continues the cached session
        return "" if resume is True else float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, run_name=None, alpha=None, learning_rate=None, weight_decay=None):
        """Checked when the prompt is queued (see nodes/validation.py); ComfyUI checks the others."""
        return verdict(cls, run_name=run_name, alpha=alpha, learning_rate=learning_rate, weight_decay=weight_decay)

    @classmethod
    def pcpo_checks(cls, values: dict, run_name=None) -> list:
        return [name_error("run_name", values["run_name"], kind="run")] if values.get("run_name") is not None else []

    def create(self, model, run_name, rank, alpha, target_layers, learning_rate, optimizer, weight_decay, seed, resume,
               training_precision="auto", gradient_checkpointing="auto", unique_id=None, extra_pnginfo=None,
               prompt=None):
        check_prompt(prompt, run_name if isinstance(run_name, str) else None)  # refuse before any work
        settings = RunSettings(rank=int(rank), alpha=float(alpha), target_layers=target_layers,
                               learning_rate=float(learning_rate), optimizer=optimizer,
                               weight_decay=float(weight_decay), seed=int(seed))
        options = TrainingOptions.resolve(model, training_precision, gradient_checkpointing)
        sess = get_session(run_name, model, settings, bool(resume), owner=unique_id, extra_pnginfo=extra_pnginfo,
                           options=options)
        return (sess.model, sess)


NODE_CLASS_MAPPINGS = {"PCPOLoRA": PCPOLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOLoRA": "PCPO LoRA"}
