"""Weight-free rewards: JPEG (in)compressibility as in DDPO, and brightness."""
from __future__ import annotations

import io

import numpy as np
import torch

from . import register_reward


def _jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image saved as JPEG. images: (B, H, W, 3) in [0, 1]."""
    from PIL import Image  # Pillow ships with ComfyUI; imported lazily to keep import cheap

    arr = (images.detach().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float64)


@register_reward("jpeg-compressibility", "minus the JPEG file size in kB (DDPO): rewards simple images")
def jpeg_compressibility(images, prompts=None):
    return -_jpeg_kilobytes(images)


@register_reward("jpeg-incompressibility", "JPEG file size in kB (DDPO): rewards detailed images")
def jpeg_incompressibility(images, prompts=None):
    return _jpeg_kilobytes(images)


@register_reward("brightness", "mean pixel value in [0, 1]: rewards bright images")
def brightness(images, prompts=None):
    return images.to(torch.float64).mean(dim=(1, 2, 3))


@register_reward("saturation", "mean HSV saturation in [0, 1]: rewards colourful images")
def saturation(images, prompts=None):
    x = images.to(torch.float64)
    mx = x.max(dim=-1).values
    mn = x.min(dim=-1).values
    sat = (mx - mn) / mx.clamp_min(1e-6)
    return sat.mean(dim=(1, 2))
