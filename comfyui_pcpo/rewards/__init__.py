"""Reward registry.

A reward maps a batch of decoded images to one scalar per image:

    fn(images: Tensor (B, H, W, 3) float in [0, 1], prompts: list[str] | None) -> Tensor (B,) float64

Images use ComfyUI's IMAGE layout (channels last).  Higher is better.  Register a reward
with ``@register_reward("name", description=...)``; the node layer lists ``reward_names()``
in its dropdown, so a new reward module only has to be imported here.

Learned rewards are objects (:class:`~comfyui_pcpo.rewards.base.Reward`) built by loaders from
their published files: ``clip_models`` (LAION aesthetic v2, PickScore v1, CLIP score), ``hps``
(HPSv2.1, open_clip), ``imagereward`` (ImageReward, transformers BLIP), ``ocr`` (RapidOCR);
``base.RewardMix`` combines rewards normalised within each group.  Their heavy imports
(transformers, open_clip, rapidocr) happen only when a model loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

RewardFn = Callable[[torch.Tensor, Optional[Sequence[str]]], torch.Tensor]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    description: str
    needs_prompt: bool = False


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(name: str, description: str = "", needs_prompt: bool = False):
    """Decorator adding ``fn`` to the registry under ``name``."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = RewardSpec(name, fn, description, needs_prompt)
        return fn

    return deco


def reward_names() -> list[str]:
    return list(_REGISTRY)


def get_reward(name: str) -> RewardSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
        ) from None


def score(name: str, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Score ``images`` (B, H, W, 3) in [0, 1] with reward ``name``; returns (B,) float64."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be (B, H, W, 3) in [0, 1], got shape {tuple(images.shape)}")
    spec = get_reward(name)
    if spec.needs_prompt:
        if prompts is None or len(prompts) != images.shape[0]:
            raise ValueError(
                f"reward {name!r} needs one prompt per image ({images.shape[0]}), got "
                f"{None if prompts is None else len(prompts)}"
            )
    out = spec.fn(images[..., :3].float().clamp(0, 1), prompts)
    return out.detach().to(torch.float64).reshape(-1)


# Built-in rewards register themselves on import.
from . import simple as _simple  # noqa: E402,F401
from . import colour as _colour  # noqa: E402,F401


def builtin_reward(name: str):
    """The registry reward ``name`` as a :class:`~comfyui_pcpo.rewards.base.Reward` object."""
    from .base import RegistryReward
    return RegistryReward(get_reward(name))
