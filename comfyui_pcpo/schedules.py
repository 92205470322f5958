"""Noise schedules and time grids (float64).

Two coordinate systems are used throughout:

* diffusion (eps / v / x0 models): ComfyUI's sigma ("VE") coordinates, x = x0 + sigma * noise,
  related to the VP cumulative product by sigma^2 = (1 - abar) / abar;
* flow (rectified flow): t in [0, 1], x = (1 - t) x0 + t * noise, t = 1 is pure noise.

Nothing here is looked up: every grid is built from the schedule parameters a run uses.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_steps: int = 1000) -> torch.Tensor:
    """abar[k] for k = 0..num_train_steps-1 of the SD1.x/SDXL "scaled linear" schedule. (T,) float64."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_steps, dtype=F64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_train_steps: int, steps: int, offset: int = 1) -> torch.Tensor:
    """diffusers' DDIM "leading" grid, descending: for 1000/50 with offset 1: 981, 961, ..., 1. (steps,) int64."""
    ratio = num_train_steps // steps
    return (torch.arange(steps, dtype=torch.int64) * ratio).flip(0) + offset


def ddim_abar_pairs(alphas_cumprod: torch.Tensor, steps: int, offset: int = 1,
                    set_alpha_to_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar_t, abar_prev) per inference step on the DDIM grid, both (steps,) float64.

    abar_prev at the last step is abar[0] unless ``set_alpha_to_one`` (diffusers' flag).
    """
    ts = ddim_timesteps(alphas_cumprod.numel(), steps, offset)
    ratio = alphas_cumprod.numel() // steps
    prev = ts - ratio
    final = torch.tensor(1.0 if set_alpha_to_one else float(alphas_cumprod[0]), dtype=F64)
    abar_t = alphas_cumprod[ts].to(F64)
    abar_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp_min(0)].to(F64), final)
    return abar_t, abar_prev


def sigma_from_abar(abar: torch.Tensor) -> torch.Tensor:
    """ComfyUI sigma of a VP level: sigma = sqrt((1 - abar) / abar)."""
    abar = torch.as_tensor(abar, dtype=F64)
    return ((1.0 - abar) / abar).sqrt()


def abar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """VP level of a ComfyUI sigma: abar = 1 / (1 + sigma^2)."""
    sigma = torch.as_tensor(sigma, dtype=F64)
    return 1.0 / (1.0 + sigma ** 2)


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift of a flow time grid: t -> s t / (1 + (s - 1) t)."""
    t = torch.as_tensor(t, dtype=F64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Descending flow grid 1 = t_1 > ... > t_{N+1} = 0: shift(linspace(1, 0, N + 1)). (N+1,) float64."""
    return flow_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=F64), shift)


def flow_noise_levels(ts: torch.Tensor, rule: str = "constant", level: float = 0.3) -> torch.Tensor:
    """Per-step SDE noise level sigma_i for a flow grid ``ts`` (N+1,). Returns (N,) float64.

    rule "constant" (DanceGRPO): sigma_i = level (eta, 0.3 in the reference).
    rule "flow-grpo": sigma_i = level * sqrt(t_i / (1 - t_i)) (a = 0.7 in the reference); at
    t_i = 1 the formula is infinite, so the next grid point stands in for t_i.
    """
    ts = torch.as_tensor(ts, dtype=F64)
    t = ts[:-1]
    if rule == "constant":
        return torch.full_like(t, float(level))
    if rule == "flow-grpo":
        t_guarded = torch.where(t >= 1.0, ts[1:], t)
        return level * (t_guarded / (1.0 - t_guarded)).sqrt()
    raise ValueError(f"unknown flow noise rule {rule!r}; use 'constant' or 'flow-grpo'")
