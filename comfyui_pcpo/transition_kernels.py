"""Gaussian transition kernels of the rollout policy.

Every kernel returns the step mean ``mu`` and standard deviation ``std`` of
pi(x_prev | x_t, c) = N(mu, std^2 I); the sampled step is ``x_prev = mu + std * noise``.
Shapes: latents (B, C, H, W) or any (B, ...); schedule scalars are python floats or tensors
broadcastable to the batch ((B, 1, 1, 1)).  Units: VP kernels work on VP latents
(x = sqrt(abar) x0 + sqrt(1 - abar) eps); sigma kernels on ComfyUI latents (x = x0 + sigma eps);
flow kernels on x = (1 - t) x0 + t eps.
"""
from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- predictions

def eps_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, abar_t, kind: str) -> torch.Tensor:
    """Convert a VP model output to eps.  kind: "eps", "v" (v = sqrt(abar) eps - sqrt(1-abar) x0)
    or "x0"."""
    abar_t = torch.as_tensor(abar_t, dtype=x_t.dtype, device=x_t.device)
    a, s = abar_t.sqrt(), (1.0 - abar_t).sqrt()
    if kind == "eps":
        return pred
    if kind == "v":
        return s * x_t + a * pred
    if kind == "x0":
        return (x_t - a * pred) / s
    raise ValueError(f"unknown prediction kind {kind!r}; use 'eps', 'v' or 'x0'")


def _per_sample(level, x: torch.Tensor):
    """A (b,) tensor of per-sample sigmas / times reshaped to broadcast over x (b, ...)."""
    if torch.is_tensor(level) and level.ndim == 1:
        return level.reshape(-1, *([1] * (x.ndim - 1)))
    return level


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """ComfyUI sigma coordinates: eps_hat = (x - x0_hat) / sigma (sigma scalar or (b,))."""
    return (x - denoised) / _per_sample(sigma, x)


def velocity_from_denoised(x: torch.Tensor, denoised: torch.Tensor, t) -> torch.Tensor:
    """Flow coordinates: v = (x - x0_hat) / t  (= noise - x0 for an exact prediction; t scalar or (b,))."""
    return (x - denoised) / _per_sample(t, x)


# ----------------------------------------------------------------------------- diffusion

def ddim_std(abar_t, abar_prev, eta: float):
    """DDIM step std: eta * sqrt((1 - abar_prev)/(1 - abar_t) * (1 - abar_t/abar_prev)) (eta 1 = DDPM)."""
    alpha_t = abar_t / abar_prev
    return eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - alpha_t)) ** 0.5


def ddim_vp_step(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t, abar_prev, std):
    """Stochastic DDIM in VP form.  Returns (mu, std) with

        x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
        mu     = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps_hat
    """
    x0_hat = (x_t - (1.0 - abar_t) ** 0.5 * eps_hat) / abar_t ** 0.5
    mu = abar_prev ** 0.5 * x0_hat + (1.0 - abar_prev - std ** 2) ** 0.5 * eps_hat
    return mu, std


def ancestral_sigma_up(sigma, sigma_next, eta: float):
    """k-diffusion's ancestral noise: min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)).

    In sigma coordinates this is exactly DDIM(eta)'s std scaled by 1 / sqrt(abar_prev)."""
    up = eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    if torch.is_tensor(up):
        return torch.minimum(up, torch.as_tensor(sigma_next, dtype=up.dtype, device=up.device))
    return min(up, sigma_next)


def ddim_sigma_step(x: torch.Tensor, eps_hat: torch.Tensor, sigma, sigma_next, sigma_up):
    """Stochastic DDIM in ComfyUI sigma coordinates.  Returns (mu, std = sigma_up) with

        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        mu         = x - (sigma - sigma_down) * eps_hat       (= x0_hat + sigma_down * eps_hat)
    """
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    return x - (sigma - sigma_down) * eps_hat, sigma_up


# ----------------------------------------------------------------------------- flow

def flow_sde_step(x: torch.Tensor, v: torch.Tensor, t, t_next, noise_level):
    """Reverse SDE step of rectified flow from t to t_next < t.  Returns (mu, std) with
    dt = t - t_next and

        mu  = x (1 - sigma^2 dt / (2 t)) - dt (1 + sigma^2 (1 - t) / (2 t)) v
        std = sigma sqrt(dt)
    """
    dt = t - t_next
    s2 = noise_level ** 2
    mu = x * (1.0 - s2 * dt / (2.0 * t)) - dt * (1.0 + s2 * (1.0 - t) / (2.0 * t)) * v
    return mu, noise_level * dt ** 0.5


# ----------------------------------------------------------------------------- log-prob

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mu: torch.Tensor, std) -> torch.Tensor:
    """Per-sample log-prob with the reference codes' convention: the squared error is AVERAGED over
    the non-batch elements:  mean(-(x - mu)^2 / (2 std^2)) - log std - log sqrt(2 pi).  Returns (B,)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    sq = (-(x - mu) ** 2 / (2.0 * std ** 2)).flatten(1).mean(1)
    log_std = std.log().reshape(-1) if std.numel() == x.shape[0] else std.log()
    return sq - log_std - LOG_SQRT_2PI
