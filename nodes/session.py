"""PCPO LoRA: a training session (patched MODEL + adapters + optimizer + run folder).

Sessions live in a module-level registry keyed by run name, so re-queued prompts continue the same
run with the LoRA and optimizer state resident on the load device; every update writes an atomic
checkpoint into ``output/pcpo/<run name>/`` from which a restarted ComfyUI resumes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

import torch

import folder_paths

from comfyui_pcpo import __version__
from comfyui_pcpo.lora import TARGET_PRESETS
from comfyui_pcpo.trajectory import atomic_save_safetensors

from .glue import attach_lora, model_family

log = logging.getLogger("comfyui-pcpo")

SESSIONS: dict = {}
OPTIMIZERS = ("AdamW", "Adam", "SGD")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def run_dir_for(run_name: str) -> str:
    if not _RUN_NAME.match(run_name or "") or ".." in run_name:
        raise ValueError(f"run_name {run_name!r} is not valid: use letters, digits, '_', '-' or '.' "
                         "(no slashes, no '..'), e.g. 'pcpo_run'")
    return os.path.join(folder_paths.get_output_directory(), "pcpo", run_name)


class Session:
    """Everything that persists between iterations of one run."""

    def __init__(self, run_name: str, base_model, settings: dict):
        self.run_name = run_name
        self.run_dir = run_dir_for(run_name)
        self.settings = dict(settings)
        self.base_model = base_model
        self.family = model_family(base_model)
        self.model, self.adapters = attach_lora(base_model, settings["rank"], settings["alpha"],
                                                settings["target_layers"], seed=settings["seed"])
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator().manual_seed(int(settings["seed"]))
        self.iteration = 0          # completed rollout + update rounds
        self.optimizer_steps = 0
        self.history: list = []     # one dict of stats per iteration
        self.last_reward = None
        self.last_objective = None

    # -- construction -------------------------------------------------------------------------
    def params(self) -> list:
        return [p for a in self.adapters.values() for p in a.parameters()]

    def _make_optimizer(self):
        s = self.settings
        with torch.inference_mode(False):
            if s["optimizer"] == "AdamW":
                return torch.optim.AdamW(self.params(), lr=s["learning_rate"], betas=(0.9, 0.999),
                                         weight_decay=s["weight_decay"], eps=1e-8)
            if s["optimizer"] == "Adam":
                return torch.optim.Adam(self.params(), lr=s["learning_rate"], betas=(0.9, 0.999), eps=1e-8)
            return torch.optim.SGD(self.params(), lr=s["learning_rate"], momentum=0.9,
                                   weight_decay=s["weight_decay"])

    def rebind(self, base_model) -> None:
        """Attach the same adapters to a (new) upstream MODEL object."""
        fam = model_family(base_model)
        if fam.arch != self.family.arch:
            raise ValueError(f"run {self.run_name!r} trains a {self.family.arch} model but got a {fam.arch} "
                             "MODEL; use a new run_name for another model")
        self.base_model = base_model
        self.model, _ = attach_lora(base_model, 0, 0, "", adapters=self.adapters)

    def set_learning_rate(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.settings["learning_rate"] = lr

    # -- metadata -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        s = self.settings
        return {
            "pcpo_run": self.run_name, "pcpo_base_model": self.family.arch,
            "pcpo_prediction": self.family.prediction, "pcpo_iterations": str(self.iteration),
            "pcpo_steps": str(self.optimizer_steps), "pcpo_reward": str(self.last_reward or ""),
            "pcpo_objective": str(self.last_objective or ""),
            "pcpo_settings": json.dumps(s, sort_keys=True), "pcpo_version": __version__,
            "pcpo_reward_mean_last": f"{self.history[-1]['reward_mean']:.6g}" if self.history else "",
        }

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.safetensors")

    @property
    def optimizer_path(self) -> str:
        return os.path.join(self.run_dir, "optimizer.pt")

    def save_checkpoint(self) -> None:
        """Atomic: optimizer state first, then the LoRA with the iteration count (the commit point)."""
        os.makedirs(self.run_dir, exist_ok=True)
        tmp = self.optimizer_path + ".tmp"
        torch.save({"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                    "iteration": self.iteration}, tmp)
        os.replace(tmp, self.optimizer_path)
        tensors = {}
        for name, a in self.adapters.items():
            tensors[f"{name}.down"] = a.down.detach().cpu().contiguous()
            tensors[f"{name}.up"] = a.up.detach().cpu().contiguous()
        md = {"settings": json.dumps(self.settings), "iteration": str(self.iteration),
              "optimizer_steps": str(self.optimizer_steps), "history": json.dumps(self.history[-2000:]),
              "last_reward": str(self.last_reward or ""), "last_objective": str(self.last_objective or ""),
              "arch": self.family.arch, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_save_safetensors(tensors, self.checkpoint_path, md)

    def load_checkpoint(self) -> bool:
        if not os.path.exists(self.checkpoint_path):
            return False
        from safetensors import safe_open
        with safe_open(self.checkpoint_path, framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            saved = json.loads(md.get("settings", "{}"))
            for k in ("rank", "target_layers"):
                if saved.get(k) != self.settings.get(k):
                    raise ValueError(
                        f"run {self.run_name!r} in {self.run_dir} was trained with {k}={saved.get(k)!r}, "
                        f"not {self.settings.get(k)!r}: use a new run_name, or set resume to false to start over")
            missing = [n for n in self.adapters if f"{n}.up" not in f.keys()]
            if missing:
                raise ValueError(f"checkpoint {self.checkpoint_path} does not match this model "
                                 f"({len(missing)} LoRA layers missing, e.g. {missing[0]}); use a new run_name")
            with torch.inference_mode(False), torch.no_grad():
                for n, a in self.adapters.items():
                    a.down.copy_(f.get_tensor(f"{n}.down"))
                    a.up.copy_(f.get_tensor(f"{n}.up"))
        self.iteration = int(md.get("iteration", 0))
        self.optimizer_steps = int(md.get("optimizer_steps", 0))
        self.history = json.loads(md.get("history", "[]"))
        self.last_reward = md.get("last_reward") or None
        self.last_objective = md.get("last_objective") or None
        if os.path.exists(self.optimizer_path):
            st = torch.load(self.optimizer_path, map_location="cpu", weights_only=True)
            if int(st.get("iteration", -1)) == self.iteration:
                with torch.inference_mode(False):
                    self.optimizer.load_state_dict(st["optimizer"])
                self.generator.set_state(st["generator"])
            else:
                log.warning("PCPO: optimizer state of run %s is from another iteration; starting it fresh", self.run_name)
        log.info("PCPO: resumed run %s at iteration %d", self.run_name, self.iteration)
        return True


class PCPOLoRA:
    """MODEL -> MODEL with a trainable LoRA, plus the session handle the other PCPO nodes use."""

    CATEGORY = "PCPO"
    FUNCTION = "create"
    RETURN_TYPES = ("MODEL", "PCPO_SESSION")
    RETURN_NAMES = ("model", "session")
    OUTPUT_TOOLTIPS = ("The input model with the live, trainable LoRA attached (use it for previews).",
                       "The training session: wire it into the Trajectory Sampler, LoRA Update and Export nodes.")
    DESCRIPTION = ("Starts (or resumes) a PCPO training run: attaches a trainable LoRA to the model. The LoRA and "
                   "optimizer stay in memory between queued prompts and are checkpointed to output/pcpo/<run_name>.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to align (SD1.x, SD2.x, SDXL, SD3 or FLUX)."}),
            "run_name": ("STRING", {"default": "pcpo_run", "tooltip": "Name of the run: its checkpoints live in "
                                    "output/pcpo/<run_name>. Re-using a name continues that run."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank (reference: 16)."}),
            "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                "tooltip": "LoRA alpha; the update is scaled by alpha / rank."}),
            "target_layers": (list(TARGET_PRESETS), {"default": "attention", "tooltip":
                              "Which layers get a LoRA: attention projections (reference), + MLPs, all linear "
                              "layers, or all linear and conv layers."}),
            "learning_rate": ("FLOAT", {"default": 3e-4, "min": 0.0, "max": 1.0, "step": 1e-5, "round": False,
                                        "tooltip": "Optimizer learning rate (reference for LoRA: 3e-4)."}),
            "optimizer": (list(OPTIMIZERS), {"default": "AdamW", "tooltip": "AdamW uses betas 0.9/0.999, eps 1e-8."}),
            "weight_decay": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 1e-5, "round": False,
                                       "tooltip": "Decoupled weight decay (AdamW) / L2 (SGD)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                             "Seeds the LoRA initialisation and the choice of trained timesteps."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "Resume from the run folder's checkpoint when one "
                                   "exists. Off: start over (the old checkpoint is overwritten at the next update)."}),
        }}

    def create(self, model, run_name, rank, alpha, target_layers, learning_rate, optimizer, weight_decay, seed, resume):
        settings = {"rank": int(rank), "alpha": float(alpha), "target_layers": target_layers,
                    "learning_rate": float(learning_rate), "optimizer": optimizer,
                    "weight_decay": float(weight_decay), "seed": int(seed)}
        run_dir_for(run_name)  # validates the name
        sess = SESSIONS.get(run_name)
        fixed = ("rank", "alpha", "target_layers", "optimizer", "seed")
        if sess is not None and resume and all(sess.settings.get(k) == settings[k] for k in fixed):
            if sess.base_model is not model:
                sess.rebind(model)
            sess.set_learning_rate(float(learning_rate))
            sess.settings["weight_decay"] = float(weight_decay)
            return (sess.model, sess)
        if sess is not None and resume:
            changed = [k for k in fixed if sess.settings.get(k) != settings[k]]
            raise ValueError(f"run {run_name!r} is live with different {', '.join(changed)}; use a new run_name, "
                             "or set resume to false to start over")
        sess = Session(run_name, model, settings)
        if resume:
            sess.load_checkpoint()
        SESSIONS[run_name] = sess
        return (sess.model, sess)


NODE_CLASS_MAPPINGS = {"PCPOLoRA": PCPOLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOLoRA": "PCPO LoRA"}
