"""FLUX's rotary position embedding in plain torch (differentiable).

The math of ComfyUI's own ``comfy.ldm.flux.math.apply_rope1`` before it called comfy-kitchen's kernel
(and of comfy-kitchen's eager backend): each adjacent pair ``(x[2k], x[2k+1])`` of the last axis is
multiplied by the 2x2 rotation ``freqs_cis[..., k, :, :]``, computed in ``freqs_cis``'s dtype
(float32) and cast back to ``x``'s dtype.
"""
from __future__ import annotations

import torch


def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., seq, dim) by ``freqs_cis`` (..., seq, dim/2, 2, 2)."""
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if x.ndim > 2 and freqs_cis.ndim > 2 and x.shape[2] != 1 and freqs_cis.shape[2] > x.shape[2]:
        freqs_cis = freqs_cis[:, :, :x.shape[2]]  # frequencies for a longer sequence: the first ones
    x_out = freqs_cis[..., 0] * x_[..., 0]
    x_out = x_out.addcmul(freqs_cis[..., 1], x_[..., 1])
    return x_out.reshape(*x.shape).type_as(x)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope1` on queries and keys."""
    return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)
