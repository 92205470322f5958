"""Group-relative advantages (GRPO style)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor        # (B,) float64, clipped
    zero_std_groups: int        # groups whose rewards are all equal (no gradient from them)
    num_groups: int


def group_advantages(rewards, group_ids, clip: float = 5.0, eps: float = 1e-8) -> Advantages:
    """A_i = (r_i - mean_g r) / (std_g r + eps) over the samples of the same group g, with the
    population std (ddof 0) in float64, clipped to [-clip, clip].  A group whose rewards are all
    equal gets exactly A = 0.

    rewards: (B,) any float; group_ids: (B,) int (samples of one prompt / shared x_T share an id).
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1).cpu()
    g = torch.as_tensor(group_ids).reshape(-1).cpu()
    if r.shape != g.shape:
        raise ValueError(f"rewards {tuple(r.shape)} and group_ids {tuple(g.shape)} must have the same length")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; check the reward function's input images")
    out = torch.zeros_like(r)
    zero = 0
    groups = torch.unique(g)
    for gid in groups:
        m = g == gid
        rg = r[m]
        if rg.numel() < 2 or bool((rg == rg[0]).all()):
            zero += 1
            continue
        out[m] = (rg - rg.mean()) / (rg.std(unbiased=False) + eps)
    if clip is not None and clip > 0:
        out = out.clamp(-clip, clip)
    return Advantages(out, zero, int(groups.numel()))
