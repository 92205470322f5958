"""The rollout record.

Layout (B samples, S steps, latent shape L = (C, H, W) or (C, T, H, W)):

    latents   (B, S+1, *L)  x at every grid point: latents[:, i] = x_t of step i, latents[:, i+1] = x_prev
    eps_old   (B, S, *L)    the noise drawn at each step: x_prev = mu_old + std_i * eps_old
    pred_old  (B, S, *L)    guidance-combined rollout prediction (eps_hat for diffusion, v for flow;
                            the LoRA model's eps_theta under uw-lambda)
    group_ids (B,) int64    samples of one group share a prompt and an initial noise
    prompt_index (B,) int64 index into ``prompts``
    plan      StepPlan      sigmas / t grid, stds and weights (see step_plan.py)

Tensors are stored in ``storage_dtype`` (float32 default) on any device; ``to()`` moves them.
``save`` / ``load`` use safetensors (atomic write) with the non-tensor fields as JSON metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch

from .atomic import atomic_save_safetensors
from .step_plan import StepPlan

_TENSORS = ("latents", "eps_old", "pred_old", "group_ids", "prompt_index")


@dataclass
class Trajectory:
    latents: torch.Tensor
    eps_old: torch.Tensor
    pred_old: torch.Tensor
    group_ids: torch.Tensor
    prompt_index: torch.Tensor
    plan: StepPlan
    prompts: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        B, S1 = self.latents.shape[:2]
        S = S1 - 1
        if self.eps_old.shape[:2] != (B, S) or self.pred_old.shape[:2] != (B, S):
            raise ValueError(
                f"trajectory layout mismatch: latents {tuple(self.latents.shape)}, eps_old "
                f"{tuple(self.eps_old.shape)}, pred_old {tuple(self.pred_old.shape)}; expected (B, S+1, ...) and (B, S, ...)")
        if S != self.plan.num_steps:
            raise ValueError(f"trajectory has {S} steps but its plan has {self.plan.num_steps}")
        if self.group_ids.shape != (B,) or self.prompt_index.shape != (B,):
            raise ValueError("group_ids and prompt_index must be (B,)")

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.latents.shape[1]) - 1

    def x_t(self, step: int) -> torch.Tensor:
        return self.latents[:, step]

    def x_prev(self, step: int) -> torch.Tensor:
        return self.latents[:, step + 1]

    def sample_prompts(self) -> list:
        return [self.prompts[int(i)] for i in self.prompt_index] if self.prompts else []

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Trajectory":
        def mv(t, floating=True):
            return t.to(device=device, dtype=dtype if (floating and dtype is not None) else t.dtype)
        return Trajectory(mv(self.latents), mv(self.eps_old), mv(self.pred_old),
                          mv(self.group_ids, False), mv(self.prompt_index, False),
                          self.plan, list(self.prompts), dict(self.meta))

    def pin_memory(self) -> "Trajectory":
        """The same record in page-locked CPU memory (faster, asynchronous copies of each micro-batch
        to a GPU); a no-op copy-free return when no CUDA device is available."""
        if not torch.cuda.is_available():
            return self
        return Trajectory(self.latents.pin_memory(), self.eps_old.pin_memory(), self.pred_old.pin_memory(),
                          self.group_ids, self.prompt_index, self.plan, list(self.prompts), dict(self.meta))

    def save(self, path: str) -> None:
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in _TENSORS}
        md = {"plan": json.dumps(self.plan.to_dict()), "prompts": json.dumps(self.prompts),
              "meta": json.dumps(self.meta, default=str), "format": "pcpo-trajectory-1"}
        atomic_save_safetensors(tensors, path, md)

    @classmethod
    def load(cls, path: str, device="cpu") -> "Trajectory":
        from safetensors import safe_open
        with safe_open(path, framework="pt", device=str(device)) as f:
            md = f.metadata() or {}
            if md.get("format") != "pcpo-trajectory-1":
                raise ValueError(f"{path} is not a PCPO trajectory file")
            t = {k: f.get_tensor(k) for k in _TENSORS}
        return cls(**t, plan=StepPlan.from_dict(json.loads(md["plan"])),
                   prompts=json.loads(md["prompts"]), meta=json.loads(md["meta"]))
