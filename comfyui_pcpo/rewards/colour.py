"""Prompt-colour agreement: a weight-free, prompt-aware reward for the embedded demo model.

Every pixel is classified to its nearest colour of the demo palette
(:data:`comfyui_pcpo.demo.shapes.PALETTE`).  The image's actual background colour is the most
common class on the 2-pixel border; every other pixel is "shape".  The score is

    0.8 * (shape pixels of the prompted shape colour) / max(#shape pixels, 3% of the image)
  + 0.2 * (border pixels of the prompted background colour)

in [0, 1]; graded (not 0/1) so that a group of samples has reward variance.  A prompt with no
background colour scores the shape term only; a prompt naming no palette colour scores 0.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..demo.shapes import COLOURS, PALETTE_ARRAY, colour_words
from . import register_reward

SHAPE_WEIGHT = 0.8
BORDER = 2
MIN_SHAPE_FRACTION = 0.03


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, H, W) long index into :data:`COLOURS` (nearest colour)."""
    pal = torch.as_tensor(PALETTE_ARRAY, dtype=torch.float32, device=images.device)
    d = ((images[..., None, :3].float() - pal) ** 2).sum(-1)
    return d.argmin(-1)


def _border(cls: torch.Tensor, width: int = BORDER) -> torch.Tensor:
    """(B, H, W) -> (B, N) classes of the border pixels."""
    b, h, w = cls.shape
    m = torch.zeros(h, w, dtype=torch.bool, device=cls.device)
    m[:width, :] = m[-width:, :] = True
    m[:, :width] = m[:, -width:] = True
    return cls[:, m]


def colour_analysis(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-image statistics used by the reward and by the evaluation script.

    Returns float64 tensors (B,): ``shape_score`` (fraction of shape pixels with the prompted
    colour, area-floored), ``background_score`` (fraction of border pixels with the prompted
    background colour, NaN if the prompt names none), ``dominant_correct`` (1 if the most
    common shape-pixel colour is the prompted one and the shape covers at least 3% of the
    image), ``background_correct`` (1 if the border's majority colour is the prompted
    background), ``reward``.
    """
    n = images.shape[0]
    cls = classify_pixels(images)
    nc = len(COLOURS)
    border = _border(cls)
    border_counts = torch.nn.functional.one_hot(border, nc).sum(1)  # (B, C)
    actual_bg = border_counts.argmax(-1)  # (B,)
    all_counts = torch.nn.functional.one_hot(cls.flatten(1), nc).sum(1)  # (B, C)
    shape_counts = all_counts.clone()
    shape_counts[torch.arange(n), actual_bg] = 0
    n_shape = shape_counts.sum(-1).double()
    floor = MIN_SHAPE_FRACTION * cls.shape[1] * cls.shape[2]

    out = {k: torch.zeros(n, dtype=torch.float64) for k in
           ("shape_score", "background_score", "dominant_correct", "background_correct", "reward")}
    for i, p in enumerate(prompts):
        c, b = colour_words(p or "")
        if c is None:
            out["background_score"][i] = float("nan")
            continue
        ci = COLOURS.index(c)
        shape = float(shape_counts[i, ci]) / max(float(n_shape[i]), floor)
        out["shape_score"][i] = shape
        out["dominant_correct"][i] = float(
            float(n_shape[i]) >= floor and int(shape_counts[i].argmax()) == ci)
        if b is None:
            out["background_score"][i] = float("nan")
            out["reward"][i] = shape
        else:
            bi = COLOURS.index(b)
            bg = float(border_counts[i, bi]) / float(border.shape[1])
            out["background_score"][i] = bg
            out["background_correct"][i] = float(int(actual_bg[i]) == bi)
            out["reward"][i] = SHAPE_WEIGHT * shape + (1 - SHAPE_WEIGHT) * bg
    return out


@register_reward(
    "prompt-colour-agreement",
    "demo model: does the shape have the colour named in the prompt (and the background the "
    "named background colour)? fraction of pixels, in [0, 1]",
    needs_prompt=True,
)
def prompt_colour_agreement(images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    if prompts is None:
        raise ValueError("prompt-colour-agreement needs one prompt per image")
    return colour_analysis(images, prompts)["reward"]
