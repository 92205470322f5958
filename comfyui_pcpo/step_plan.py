"""Step plan: everything a rollout and its gradient pass need per step, computed from the grid the
user actually runs (ComfyUI sigmas for diffusion models, the t grid for flow models).

Rollout variants (diffusion):
  * ``native``    : DDIM(eta) rollout (= ComfyUI's euler_ancestral(eta)); PCPO loss weight w_bar.
  * ``uw-sigma``  : the reference configuration: rollout std eta * sigma_tilde(w*), loss weight w_bar
                    (w_bar from the native DDIM(eta) weights on the same grid).
  * ``uw-lambda`` : DDIM(eta) rollout of eps_ref + lambda_t (eps_theta - eps_ref),
                    lambda_t = w_bar / w_t, so the exact log-ratio weight of eps_theta is w_bar.
Flow models keep their sampler (rule ``constant`` eta or ``flow-grpo`` a); PCPO weight zeta * dt_i.

SDE windows (``window``, see ``sde_window``): only the window's W steps are stochastic; the plan
then covers those steps alone (``sigmas`` is the (W+1,) slice of the grid, ``info["window"]`` says
where it lies) and PCPO's proportionate weights are renormalised to them, in the terms of
``spec/pcpo-math.md`` section 4b:

* diffusion: w_bar_W = mean of the native DDIM(eta) weights w_t over the window's steps (the whole
  grid's w_bar when the window is the grid); uw-sigma's loss scale and uw-lambda's lambda_t =
  w_bar_W / w_t use it;
* flow: zeta_W = sum of the native weights w_i over the window, T_W = t_start - t_end the window's
  share of generation time, w_i = zeta_W * dt_i / T_W: credit per unit time uniform inside the
  window and the window's total native credit preserved (on a full grid from t = 1 to 0, T = 1
  and this is zeta * dt_i).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from typing import Optional

from . import credit_weights as weights, schedules, transition_kernels as kernels
from .sde_window import Window

F64 = torch.float64
VARIANTS = ("uw-sigma", "uw-lambda", "native")
FLOW_NOISE_RULES = ("constant", "flow-grpo")


@dataclass
class StepPlan:
    """Per-step schedule of a rollout.  N = number of steps; all tensors float64 on CPU.

    sigmas:   (N+1,) descending ComfyUI sigmas (diffusion) or flow times t (flow).
    std:      (N,) step std in those coordinates (sigma_up for diffusion, sigma_i sqrt(dt) for flow).
    noise_level: (N,) flow SDE noise sigma_i (flow only; zeros for diffusion).
    w_native: (N,) exact log-ratio weight of the trained prediction (0 for deterministic steps;
              w_t * lambda_t under uw-lambda).
    w_loss:   (N,) PCPO weight used by the ``pcpo`` objective.
    lam:      (N,) uw-lambda mixing coefficients (ones for the other variants).
    """
    family: str
    variant: str
    sigmas: torch.Tensor
    std: torch.Tensor
    noise_level: torch.Tensor
    w_native: torch.Tensor
    w_loss: torch.Tensor
    lam: torch.Tensor
    eta: float
    noise_rule: str = "constant"
    info: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.std.numel())

    @property
    def window(self) -> Optional[Window]:
        """Where the plan's steps lie in the sampling grid (an SDE window), or None: the whole grid."""
        return Window.from_dict(self.info.get("window"))

    def grid_step(self, i: int) -> int:
        """Step i of the plan as a step of the whole sampling grid."""
        w = self.window
        return int(i) + (w.start if w is not None else 0)

    def trainable_steps(self) -> torch.Tensor:
        """Indices of steps that carry a log-ratio (std > 0), ascending."""
        return torch.nonzero(self.std > 0).flatten()

    def to_dict(self) -> dict:
        return {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "StepPlan":
        d = dict(d)
        for k in ("sigmas", "std", "noise_level", "w_native", "w_loss", "lam"):
            d[k] = torch.tensor(d[k], dtype=F64)
        return cls(**d)


def diffusion_plan(sigmas, eta: float = 1.0, variant: str = "uw-sigma", w_star: float = 4.5,
                   window: Optional[Window] = None) -> StepPlan:
    """Plan for an eps/v/x0 model on ComfyUI sigmas (N+1,) (last usually 0); with ``window``, the
    plan of the window's steps (module doc)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown rollout variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if eta <= 0:
        raise ValueError("eta must be > 0: a deterministic sampler has no policy to optimise")
    sig = torch.as_tensor(sigmas, dtype=F64).flatten().cpu()
    if sig.numel() < 2 or not bool((sig[:-1] > sig[1:]).all()):
        raise ValueError("sigmas must be a strictly decreasing schedule with at least one step")
    s, sn = sig[:-1], sig[1:]
    up_native = kernels.ancestral_sigma_up(s, sn, eta)
    if not bool((up_native > 0).any()):
        raise no_trainable_step_error(sig)
    w_nat_ddim = weights.sigma_native_weights(sig, up_native)
    sel = _window_slice(window, s.numel())
    wbar = weights.w_bar(w_nat_ddim[sel])
    info = {"w_bar": wbar}
    if variant == "uw-sigma":
        a, ap = schedules.abar_from_sigma(s), schedules.abar_from_sigma(sn)
        st_vp = weights.sigma_tilde(a, ap, w_star, eta)
        up = torch.where(sn > 0, st_vp / ap.sqrt(), torch.zeros_like(sn))
        up = torch.minimum(up, sn)
        info.update(w_star=w_star, loss_scale=w_star / wbar)
    else:
        up = up_native
    w_nat = weights.sigma_native_weights(sig, up)
    w_loss = torch.where(up > 0, torch.full_like(up, wbar), torch.zeros_like(up))
    lam = torch.ones_like(up)
    if variant == "uw-lambda":
        # the trained prediction eps_theta enters the kernel scaled by lambda_t, so its exact
        # log-ratio weight is w_t * lambda_t = w_bar
        lam = weights.uw_lambda(w_nat, wbar)
        w_nat = w_nat * lam
    plan = StepPlan("diffusion", variant, sig, up, torch.zeros_like(up), w_nat, w_loss, lam, float(eta), info=info)
    return _restrict(plan, window)


def flow_plan(ts, noise_rule: str = "constant", level: float = 0.3, variant: str = "native",
              window: Optional[Window] = None) -> StepPlan:
    """Plan for a rectified-flow model on a descending t grid (N+1,) ending at 0; with ``window``,
    the plan of the window's steps (module doc)."""
    if noise_rule not in FLOW_NOISE_RULES:
        raise ValueError(f"unknown flow noise rule {noise_rule!r}; choose one of {', '.join(FLOW_NOISE_RULES)}")
    if level <= 0:
        raise ValueError("the flow noise level must be > 0")
    t = torch.as_tensor(ts, dtype=F64).flatten().cpu()
    if t.numel() < 2 or not bool((t[:-1] > t[1:]).all()) or float(t[0]) > 1.0 or float(t[-1]) < 0.0:
        raise ValueError("flow times must decrease strictly inside [0, 1]")
    sig = schedules.flow_noise_levels(t, noise_rule, level)
    if not bool((sig > 0).all()) or not bool(torch.isfinite(sig).all()):
        raise ValueError(f"the {noise_rule!r} noise rule gives a zero or infinite noise level on this grid "
                         f"(t = {t.tolist()}); use at least 2 steps, or the 'constant' rule")
    dt = t[:-1] - t[1:]
    std = sig * dt.sqrt()
    w_nat = weights.flow_native_weights(t, sig)
    sel = _window_slice(window, dt.numel())
    z = weights.zeta(w_nat[sel])
    w_loss = weights.flow_pcpo_weights(t, z)
    if window is not None:  # zeta_W dt_i / T_W: the window's credit, uniform per unit time inside it
        w_loss = w_loss / float(t[window.start] - t[window.end])
    lam = torch.ones_like(std)
    if variant == "uw-lambda":
        lam = w_loss / w_nat
        w_nat = w_loss.clone()
    plan = StepPlan("flow", variant, t, std, sig, w_nat, w_loss, lam, float(level), noise_rule, {"zeta": z})
    return _restrict(plan, window)


def final_only_plan(family: str, grid) -> StepPlan:
    """The plan of a rollout that recorded only its final latents (sampled by any ComfyUI sampler, for
    the forward-process objectives): no recorded step; ``info["grid"]`` is the sampling grid (N+1,)."""
    g = torch.as_tensor(grid, dtype=F64).flatten().cpu()
    e = torch.zeros(0, dtype=F64)
    return StepPlan(family, "final", g[-1:].clone(), e, e.clone(), e.clone(), e.clone(), e.clone(), 0.0,
                    info={"grid": g.tolist(), "final_only": True})


def _window_slice(window: Optional[Window], steps: int) -> slice:
    if window is None:
        return slice(None)
    if window.grid_steps != steps or window.start < 0 or window.size < 1 or window.end > steps:
        raise ValueError(f"SDE window {window.to_dict()} does not fit a grid of {steps} steps")
    return slice(window.start, window.end)


def _restrict(plan: StepPlan, window: Optional[Window]) -> StepPlan:
    """The plan of the window's steps alone: the (W+1,) grid slice and the W steps' tensors."""
    if window is None:
        return plan
    a, b = window.start, window.end
    info = dict(plan.info, window=window.to_dict())
    return StepPlan(plan.family, plan.variant, plan.sigmas[a:b + 1].clone(), plan.std[a:b].clone(),
                    plan.noise_level[a:b].clone(), plan.w_native[a:b].clone(), plan.w_loss[a:b].clone(),
                    plan.lam[a:b].clone(), plan.eta, plan.noise_rule, info)


def no_trainable_step_error(sigmas) -> ValueError:
    """The error for a schedule without a stochastic step (a single step into sigma 0)."""
    grid = ", ".join(f"{float(v):.4g}" for v in torch.as_tensor(sigmas).flatten())
    return ValueError(f"no stochastic step to train in sigmas [{grid}]: a step into sigma 0 is deterministic "
                      "(it carries no policy), so a one-step schedule has nothing to train. Use at least 2 steps "
                      "(raise steps, or wire SIGMAS with 2 or more steps: split SplitSigmas earlier); "
                      "train_fraction only picks among the stochastic steps and cannot add one")


def check_training_schedule(plan: StepPlan) -> StepPlan:
    """Refuse a schedule a rollout cannot be trained on: one that does not end at 0 (the final
    samples would be noisy and the reward would score noise), or one without a stochastic step."""
    end = float(plan.sigmas[-1])
    if end != 0.0:
        raise ValueError(f"sigmas ends at {end:.4g}, not 0: the final samples would still be noisy and the reward "
                         "would score noise; end the schedule at 0: don't use the first half of SplitSigmas alone "
                         "(wire its second half with a LATENT, or the whole schedule)")
    if plan.trainable_steps().numel() == 0:
        raise no_trainable_step_error(plan.sigmas)
    return plan


def step_mean(plan: StepPlan, i: int, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Mean of step i given the guidance-combined prediction (eps_hat for diffusion, v for flow)."""
    s, sn = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
    if plan.family == "diffusion":
        mu, _ = kernels.ddim_sigma_step(x, pred, s, sn, float(plan.std[i]))
    else:
        mu, _ = kernels.flow_sde_step(x, pred, s, sn, float(plan.noise_level[i]))
    return mu


def mean_coefficients(plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c), each (N,) float64: step i's mean is  mu = a_i x - c_i pred  (the kernel's prediction:
    eps_hat for diffusion, v for flow), as :func:`step_mean` computes it.  Under ``uw-lambda`` the
    kernel's prediction is the mix eps_ref + lambda (eps_theta - eps_ref), not the trained one."""
    s, sn, std = plan.sigmas[:-1], plan.sigmas[1:], plan.std
    if plan.family == "diffusion":
        down = (sn ** 2 - std ** 2).clamp_min(0.0).sqrt()
        return torch.ones_like(s), s - down
    dt, s2 = s - sn, plan.noise_level ** 2
    return 1.0 - s2 * dt / (2.0 * s), dt * (1.0 + s2 * (1.0 - s) / (2.0 * s))


def prediction_from_denoised(plan: StepPlan, x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """ComfyUI models return the denoised x0; convert to the kernel's prediction (eps_hat for
    diffusion, v for flow) at sigma / t (a scalar, or (b,) per sample)."""
    if plan.family == "diffusion":
        return kernels.eps_from_denoised(x, denoised, sigma)
    return kernels.velocity_from_denoised(x, denoised, sigma)
