"""Per-step log-ratio weights: native (set by the schedule) and PCPO's proportionate weights.

For a Gaussian step whose mean moves by -k * D when the prediction moves by D and whose std is s,
the exact log-ratio is  -log rho = w mean(D eps_old) + 0.5 mean((w D)^2)  with w = k / s.

* diffusion (Proposition 1): w_t = C(t) / sigma_t, C(t) = c1 - c2,
  c1 = sqrt(1 - abar_t) / sqrt(alpha_t), c2 = sqrt(1 - abar_prev - sigma_t^2);
  in ComfyUI sigma coordinates the same number is (sigma - sigma_down) / sigma_up;
* flow: w_i = sqrt(dt_i) / sigma_i * (1 + (1 - t_i) sigma_i^2 / (2 t_i)).

PCPO replaces w by a weight proportional to generation time: the constant w_bar (mean native weight)
for diffusion, zeta * dt_i for flow (zeta = sum of native weights), computed from the grid in use.
All functions are float64 and vectorised over steps.
"""
from __future__ import annotations

import torch

from .transition_kernels import ddim_std

F64 = torch.float64


# ----------------------------------------------------------------------------- diffusion

def ddim_c1_c2(abar_t, abar_prev, std):
    """c1 = sqrt(1 - abar_t) / sqrt(alpha_t), c2 = sqrt(1 - abar_prev - std^2) (VP form)."""
    abar_t = torch.as_tensor(abar_t, dtype=F64)
    abar_prev = torch.as_tensor(abar_prev, dtype=F64)
    std = torch.as_tensor(std, dtype=F64)
    alpha_t = abar_t / abar_prev
    c1 = (1.0 - abar_t).sqrt() / alpha_t.sqrt()
    c2 = (1.0 - abar_prev - std ** 2).clamp_min(0.0).sqrt()
    return c1, c2


def ddim_native_weights(abar_t, abar_prev, eta: float = 1.0, std=None) -> torch.Tensor:
    """w_t = C(t) / sigma_t per DDIM step (VP form).  ``std`` overrides the DDIM(eta) std."""
    abar_t = torch.as_tensor(abar_t, dtype=F64)
    abar_prev = torch.as_tensor(abar_prev, dtype=F64)
    if std is None:
        std = ddim_std(abar_t, abar_prev, eta)
    std = torch.as_tensor(std, dtype=F64)
    c1, c2 = ddim_c1_c2(abar_t, abar_prev, std)
    return (c1 - c2) / std


def sigma_native_weights(sigmas: torch.Tensor, sigma_up: torch.Tensor) -> torch.Tensor:
    """Native weights on a ComfyUI sigma grid: (sigma - sigma_down) / sigma_up per step.

    sigmas: (N+1,) descending; sigma_up: (N,) step stds.  A step with sigma_up = 0 (e.g. the final
    step to sigma = 0) is deterministic and gets weight 0 (it carries no log-ratio)."""
    sigmas = torch.as_tensor(sigmas, dtype=F64)
    sigma_up = torch.as_tensor(sigma_up, dtype=F64)
    s, sn = sigmas[:-1], sigmas[1:]
    down = (sn ** 2 - sigma_up ** 2).clamp_min(0.0).sqrt()
    w = (s - down) / sigma_up
    return torch.where(sigma_up > 0, w, torch.zeros_like(w))


def w_bar(native: torch.Tensor) -> float:
    """PCPO's constant diffusion weight: the mean native weight over the stochastic steps."""
    native = torch.as_tensor(native, dtype=F64)
    native = native[native > 0]
    if native.numel() == 0:
        raise ValueError("no stochastic step in the schedule: eta must be > 0")
    return float(native.mean())


def sigma_tilde(abar_t, abar_prev, w_star: float = 4.5, eta: float = 1.0) -> torch.Tensor:
    """Rollout std of the reference "uw-sigma" configuration (VP form):

        sigma_tilde = eta * [w* c1 + sqrt((1 + w*^2)(1 - abar_prev) - c1^2)] / (1 + w*^2)

    This root solves (c1 + c2) / sigma_tilde = w* (with c2 from sigma_tilde), NOT (c1 - c2) /
    sigma_tilde = w*: the reference's uniformity comes from its constant loss weight (a documented
    discrepancy of the reconstruction; see tests/test_credit_weights.py)."""
    abar_t = torch.as_tensor(abar_t, dtype=F64)
    abar_prev = torch.as_tensor(abar_prev, dtype=F64)
    alpha_t = abar_t / abar_prev
    c1 = (1.0 - abar_t).sqrt() / alpha_t.sqrt()
    root = ((1.0 + w_star ** 2) * (1.0 - abar_prev) - c1 ** 2).clamp_min(0.0).sqrt()
    return eta * (w_star * c1 + root) / (1.0 + w_star ** 2)


def uw_lambda(native: torch.Tensor, wbar: float) -> torch.Tensor:
    """"uw-lambda" mixing coefficients lambda_t = w_bar sigma_t / C(t) = w_bar / w_t.

    Sampling with eps = eps_ref + lambda_t (eps_theta - eps_ref) makes the exact log-ratio weight of
    eps_theta equal to w_bar at every step.  Deterministic steps (w_t = 0) get lambda 1."""
    native = torch.as_tensor(native, dtype=F64)
    return torch.where(native > 0, wbar / native.clamp_min(1e-300), torch.ones_like(native))


# ----------------------------------------------------------------------------- flow

def flow_native_weights(ts: torch.Tensor, noise_levels: torch.Tensor) -> torch.Tensor:
    """w_i = sqrt(dt_i) / sigma_i * (1 + (1 - t_i) sigma_i^2 / (2 t_i)) for grid ts (N+1,). (N,)."""
    ts = torch.as_tensor(ts, dtype=F64)
    sig = torch.as_tensor(noise_levels, dtype=F64)
    t, dt = ts[:-1], ts[:-1] - ts[1:]
    return dt.sqrt() / sig * (1.0 + (1.0 - t) * sig ** 2 / (2.0 * t))


def zeta(native: torch.Tensor) -> float:
    """Total native flow credit: zeta = sum_i w_i over all steps of the grid."""
    return float(torch.as_tensor(native, dtype=F64).sum())


def flow_pcpo_weights(ts: torch.Tensor, zeta_value: float) -> torch.Tensor:
    """PCPO flow weights zeta * dt_i: credit proportional to generation time, summing to zeta."""
    ts = torch.as_tensor(ts, dtype=F64)
    return zeta_value * (ts[:-1] - ts[1:])
