"""Reward objects: what flows on a ``PCPO_REWARD`` socket.

A :class:`Reward` scores a batch of decoded images (ComfyUI IMAGE layout, (B, H, W, 3) in [0, 1])
with one float64 per image, higher is better.  Learned rewards (:class:`ModelReward`) keep their
weights in one ``torch.nn.Module`` (``module``) so the host can move it between devices and free
it; scoring runs under ``inference_mode`` in batches on whatever device that module is on.
:class:`RewardMix` combines rewards after normalising each one within its group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..advantages import group_advantages


class Reward:
    """Base class.  Subclasses set ``name``/``needs_prompt``/``description`` and implement ``_score``."""

    name: str = "reward"
    needs_prompt: bool = False
    description: str = ""
    module: Optional[torch.nn.Module] = None  # the weights the host loads/unloads (None: weight-free)

    def _score(self, images: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        raise NotImplementedError

    def check_prompts(self, n: int, prompts: Optional[Sequence[str]]) -> None:
        if self.needs_prompt and (prompts is None or len(prompts) != n or not all(prompts)):
            raise ValueError(f"reward {self.name!r} reads the prompt: it needs one non-empty prompt per image "
                             f"({n}); use PCPO Prompts, or type the prompt into the Reward Scorer's prompt input")

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(B, H, W, C) in [0, 1] -> (B,) float64 on the CPU."""
        if images.ndim != 4 or images.shape[-1] < 3:
            raise ValueError(f"images must be (B, H, W, 3) in [0, 1], got shape {tuple(images.shape)}")
        self.check_prompts(images.shape[0], prompts)
        with torch.inference_mode():
            out = self._score(images[..., :3].float().clamp(0, 1), prompts)
        return out.detach().to("cpu", torch.float64).reshape(-1)


class RegistryReward(Reward):
    """A weight-free reward from the name registry (``comfyui_pcpo.rewards.register_reward``)."""

    def __init__(self, spec):
        self.spec = spec
        self.name, self.needs_prompt, self.description = spec.name, spec.needs_prompt, spec.description

    def _score(self, images, prompts):
        return self.spec.fn(images.cpu(), prompts)


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


class ModelReward(Reward):
    """A reward with weights.  ``_score_batch(images on the module's device, prompts)`` -> (b,)."""

    batch_size: int = 8

    @property
    def device(self) -> torch.device:
        return module_device_dtype(self.module)[0]

    @property
    def dtype(self) -> torch.dtype:
        return module_device_dtype(self.module)[1]

    def _score_batch(self, images: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, images, prompts):
        self.module.eval()
        out = []
        bs = max(1, int(self.batch_size))
        for i in range(0, images.shape[0], bs):
            chunk = images[i:i + bs].to(self.device)
            out.append(self._score_batch(chunk, None if prompts is None else list(prompts[i:i + bs])).float().cpu())
        return torch.cat(out)


def group_normalise(values: torch.Tensor, group_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """(r - mean_g) / (std_g + 1e-8) within each group (population std, float64, not clipped); a group whose
    values are all equal, or of one sample, gives 0.  ``group_ids`` None: the whole batch is one group."""
    r = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    g = torch.zeros(r.shape, dtype=torch.long) if group_ids is None else group_ids
    return group_advantages(r, g, clip=0.0).values


@dataclass
class MixResult:
    values: torch.Tensor                       # (B,) float64: sum_k w_k * group_normalise(r_k)
    components: dict = field(default_factory=dict)   # label -> (B,) float64 raw values
    weights: dict = field(default_factory=dict)      # label -> weight

    def component_means(self) -> dict:
        return {k: float(v.mean()) for k, v in self.components.items()}

    def raw_weighted_mean(self) -> float:
        return float(sum(self.weights[k] * float(v.mean()) for k, v in self.components.items()))


class RewardMix(Reward):
    """``sum_k w_k * (r_k - mean_group r_k) / std_group r_k``: each component normalised within the group
    of samples that share a prompt and initial noise, so no component's scale drowns another."""

    def __init__(self, parts: Sequence[tuple[Reward, float]]):
        parts = [(r, float(w)) for r, w in parts if r is not None and float(w) != 0.0]
        if not parts:
            raise ValueError("PCPO Reward Mix needs at least one connected reward with a non-zero weight")
        self.parts = []
        seen: dict = {}
        for r, w in parts:
            if isinstance(r, RewardMix):
                raise ValueError("a PCPO Reward Mix cannot contain another mix: connect its rewards directly")
            label = r.name
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            self.parts.append((label, r, w))
        self.name = "mix(" + ", ".join(f"{w:g}*{label}" for label, _, w in self.parts) + ")"
        self.needs_prompt = any(r.needs_prompt for _, r, _ in self.parts)
        self.description = "weighted sum of group-normalised rewards"

    def score_parts(self, images, prompts=None, group_ids=None, run=None) -> MixResult:
        """``run(reward, images, prompts)`` scores one component (default ``reward.score``); the host
        passes one that loads the component's weights first and frees them after."""
        run = run or (lambda r, im, pr: r.score(im, pr))
        comps, weights = {}, {}
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        for label, r, w in self.parts:
            v = run(r, images, prompts if r.needs_prompt or prompts is not None else None)
            v = torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu()
            comps[label], weights[label] = v, w
            total += w * group_normalise(v, group_ids)
        return MixResult(total, comps, weights)

    def _score(self, images, prompts):
        return self.score_parts(images, prompts).values
