"""Policy objectives on recorded rollout steps, selectable by name.

Every objective takes an :class:`ObjectiveInputs` of P (sample, step) pairs and returns
``(loss, metrics)``.  The log-ratio of a pair is computed ANALYTICALLY from the prediction change
D = pred_new - pred_old (same x_t, timestep and conditioning, guidance-combined), the rollout noise
eps_old and the step's weight w (see credit_weights.py):

    M = -log rho = w mean(D eps_old) + 0.5 mean((w D)^2)          (means over latent elements)

never as a difference of two large log-probs.  Losses are formed in float32 by default
(``dtype``; tests use float64).

The baselines (``grpo-clip``, ``ddpo``) also take ``log_ratio="difference"``: the log-ratio the way
the reference code bases (DDPO's ``ddim_step_with_logprob``, DanceGRPO's ``flux_step``, Flow-GRPO's
``sde_step_with_logprob``) form it, for precision comparisons.  Each step's mean is computed from
the prediction, mu = a x_t - c pred, and the Gaussian log-density of the recorded x_prev under the
new and under the old mean, each  mean(-(x_prev - mu)^2 / (2 s^2)) - log s - log sqrt(2 pi)  (mean
over latent elements), and rho = exp(logp_new - logp_old).  As in those code bases, the latents,
prediction and mean are in the working dtype ``work_dtype`` (the model's compute dtype, e.g. bf16
as in DanceGRPO; default the prediction's dtype) and the log-densities in float32 (all three cast
the residual to float32); the difference is cast to ``dtype`` for the loss.  In exact arithmetic
the two forms are equal (x_prev = mu_old + s eps_old, w = c / s); in finite precision the
difference form subtracts two O(1) log-densities to get a log-ratio of the order of xi, and a
16-bit mean mu = a x_t - c pred keeps the change c D only to its last bit (benchmarks/precision.py
measures both).  This form needs the latent-unit record of the step (``x_t``, ``x_prev``,
``mean_x`` = a, ``mean_pred`` = c, ``std`` = s in :class:`ObjectiveInputs`; see
:func:`comfyui_pcpo.step_plan.mean_coefficients`).  ``pcpo`` is analytic only (its proportionate weight
is not the kernel's).

* ``pcpo``: log-hinge  max(0, xi |A| + A M_pcpo)  with PCPO's proportionate weight w_loss.
* ``grpo-clip``: DanceGRPO / Flow-GRPO clipped ratio  max(-A rho, -A clip(rho, 1 - xi, 1 + xi)),
  rho from the native (exact) weight; its gradient equals that of max(0, xi |A| - A (rho - 1)).
  (DDPO's importance-sampled objective is the same loss.)
* ``ddpo``: DDPO's score-function estimator (DDPO-SF / REINFORCE): A * M_native, i.e.
  -A log pi_new up to a constant; no clipping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .transition_kernels import gaussian_log_prob

LOG_RATIO_FORMS = ("analytic", "difference")


@dataclass
class ObjectiveInputs:
    """P (sample, step) pairs.  Shapes: advantages, w_native, w_loss, step_index: (P,);
    pred_new, pred_old, eps_old: (P, ...) latent-shaped.  pred_new carries the gradient."""
    advantages: torch.Tensor
    pred_new: torch.Tensor
    pred_old: torch.Tensor
    eps_old: torch.Tensor
    w_native: torch.Tensor
    w_loss: torch.Tensor
    step_index: Optional[torch.Tensor] = None
    # the step in latent units, needed only by log_ratio="difference": mu = mean_x x_t - mean_pred pred,
    # x_prev = mu_old + std eps_old.  x_t, x_prev (P, ...); mean_x, mean_pred, std (P,)
    x_t: Optional[torch.Tensor] = None
    x_prev: Optional[torch.Tensor] = None
    mean_x: Optional[torch.Tensor] = None
    mean_pred: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None


def neg_log_ratio(D: torch.Tensor, eps_old: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """M = -log rho = w mean(D eps_old) + 0.5 mean((w D)^2) per pair. D, eps_old (P, ...), w (P,) -> (P,)."""
    w = w.reshape(-1, *([1] * (D.ndim - 1))).to(D.dtype)
    return (w * D * eps_old).flatten(1).mean(1) + 0.5 * ((w * D) ** 2).flatten(1).mean(1)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def step_log_prob(x_prev: torch.Tensor, x_t: torch.Tensor, pred: torch.Tensor, mean_x: torch.Tensor,
                  mean_pred: torch.Tensor, std: torch.Tensor, work_dtype: torch.dtype,
                  density_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log pi(x_prev | x_t) of the Gaussian step N(mean_x x_t - mean_pred pred, std^2) with the reference
    convention (squared error averaged over latent elements).  The latents, the prediction and the mean
    are in ``work_dtype``; the log-density (residual, square, mean) in ``density_dtype``.  (P,)"""
    dev = pred.device
    x_t, x_prev, pred = _as(x_t, dev, work_dtype), _as(x_prev, dev, work_dtype), pred.to(work_dtype)
    a, c = (_col(_as(v, dev, work_dtype), x_t) for v in (mean_x, mean_pred))
    mu = a * x_t - c * pred
    s = _col(_as(std, dev, density_dtype), x_t)
    return gaussian_log_prob(x_prev.to(density_dtype), mu.to(density_dtype), s)


def difference_log_ratio(inp: "ObjectiveInputs", work_dtype: Optional[torch.dtype] = None,
                         density_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """log rho = logp_new - logp_old as the reference code bases form it: the step means from the
    predictions in ``work_dtype`` (default: pred_new's dtype), two log-densities of the recorded x_prev
    in ``density_dtype`` (default float32, as DDPO, DanceGRPO and Flow-GRPO do, or ``work_dtype`` when
    that is wider) and their difference.  (P,)"""
    missing = [k for k in ("x_t", "x_prev", "mean_x", "mean_pred", "std") if getattr(inp, k) is None]
    if missing:
        raise ValueError(f"log_ratio 'difference' needs the step record {', '.join(missing)} in ObjectiveInputs")
    wd = work_dtype or inp.pred_new.dtype
    args = (inp.mean_x, inp.mean_pred, inp.std, wd, density_dtype or torch.promote_types(wd, torch.float32))
    lp_new = step_log_prob(inp.x_prev, inp.x_t, inp.pred_new, *args)
    with torch.no_grad():
        lp_old = step_log_prob(inp.x_prev, inp.x_t, _as(inp.pred_old, inp.pred_new.device, wd), *args)
    return lp_new - lp_old


def _check_form(log_ratio: str) -> None:
    if log_ratio not in LOG_RATIO_FORMS:
        raise ValueError(f"log_ratio {log_ratio!r} is unknown; choose one of {', '.join(LOG_RATIO_FORMS)}")


def _as(t: torch.Tensor, dev, dtype) -> torch.Tensor:
    t = t.to(dev, dtype)
    # tensors recorded under torch.inference_mode() (a host's sampling) cannot join autograd
    return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t


def _prepare(inp: ObjectiveInputs, dtype: torch.dtype):
    dev = inp.pred_new.device
    D = inp.pred_new.to(dtype) - _as(inp.pred_old, dev, dtype)
    return (D, _as(inp.eps_old, dev, dtype), _as(inp.advantages, dev, dtype),
            _as(inp.w_native, dev, dtype), _as(inp.w_loss, dev, dtype))


def _metrics(inp, D, eps, A, w_nat, gate_off: torch.Tensor, num_steps: Optional[int],
             used_log_rho: Optional[torch.Tensor] = None) -> dict:
    """``used_log_rho``: the log-ratio the objective used when it was not the analytic one (then
    ``log_ratio_gap`` = mean |used - analytic| is reported too)."""
    with torch.no_grad():
        log_rho = -neg_log_ratio(D, eps, w_nat)
        analytic = log_rho
        if used_log_rho is not None:
            log_rho = used_log_rho.detach()
        rho = log_rho.exp()
        kl = 0.5 * ((w_nat.reshape(-1, *([1] * (D.ndim - 1))) * D) ** 2).flatten(1).mean(1)
        m = {
            "clip_fraction": float(gate_off.float().mean()),
            "approx_kl": float(kl.mean()),
            "log_ratio_abs": float(log_rho.abs().mean()),
            "log_approx_error": float((log_rho - (rho - 1.0)).abs().mean()),
        }
        if used_log_rho is not None:
            m["log_ratio_gap"] = float((log_rho - analytic).abs().mean())
        if inp.step_index is not None and num_steps:
            idx = inp.step_index.to(gate_off.device).long()
            cnt = torch.zeros(num_steps, device=idx.device).index_add_(0, idx, torch.ones(idx.shape, device=idx.device))
            off = torch.zeros(num_steps, device=idx.device).index_add_(0, idx, gate_off.float())
            m["clip_fraction_per_step"] = torch.where(cnt > 0, off / cnt.clamp_min(1), torch.full_like(cnt, float("nan"))).cpu()
            m["pairs_per_step"] = cnt.cpu()
    return m


def pcpo_loss(inp: ObjectiveInputs, xi: float = 1e-4, num_steps: Optional[int] = None,
              dtype: torch.dtype = torch.float32, log_ratio: str = "analytic",
              work_dtype: Optional[torch.dtype] = None):
    """PCPO log-hinge: mean over pairs of max(0, xi |A| + A M), M with the PCPO weight (analytic only)."""
    _check_form(log_ratio)
    if log_ratio != "analytic":
        raise ValueError("log_ratio 'difference' applies to the baseline objectives (grpo-clip, ddpo); pcpo "
                         "computes its log-ratio analytically with its proportionate weight")
    D, eps, A, w_nat, w_loss = _prepare(inp, dtype)
    M = neg_log_ratio(D, eps, w_loss)
    hinge = xi * A.abs() + A * M
    loss = torch.relu(hinge).mean()
    return loss, _metrics(inp, D, eps, A, w_nat, hinge < 0, num_steps)


def grpo_clip_loss(inp: ObjectiveInputs, xi: float = 1e-4, num_steps: Optional[int] = None,
                   dtype: torch.dtype = torch.float32, log_ratio: str = "analytic",
                   work_dtype: Optional[torch.dtype] = None):
    """Clipped ratio: mean of max(-A rho, -A clip(rho, 1 - xi, 1 + xi)), rho = exp(-M_native)
    (analytic) or exp(logp_new - logp_old) (``log_ratio="difference"``, in ``work_dtype``)."""
    _check_form(log_ratio)
    D, eps, A, w_nat, _ = _prepare(inp, dtype)
    used = None
    if log_ratio == "analytic":
        rho = torch.exp(-neg_log_ratio(D, eps, w_nat))
    else:
        used = difference_log_ratio(inp, work_dtype).to(dtype)
        rho = torch.exp(used)
    unclipped = -A * rho
    clipped = -A * rho.clamp(1.0 - xi, 1.0 + xi)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        gate_off = (xi * A.abs() - A * (rho - 1.0)) < 0
    return loss, _metrics(inp, D, eps, A, w_nat, gate_off, num_steps, used)


def ddpo_loss(inp: ObjectiveInputs, xi: float = 1e-4, num_steps: Optional[int] = None,
              dtype: torch.dtype = torch.float32, log_ratio: str = "analytic",
              work_dtype: Optional[torch.dtype] = None):
    """DDPO-SF: mean of A * M_native (= -A log pi_new + const); ``xi`` is unused (no clipping).
    ``log_ratio="difference"``: M = -(logp_new - logp_old) formed in ``work_dtype``."""
    _check_form(log_ratio)
    D, eps, A, w_nat, _ = _prepare(inp, dtype)
    used = None
    if log_ratio == "analytic":
        loss = (A * neg_log_ratio(D, eps, w_nat)).mean()
    else:
        used = difference_log_ratio(inp, work_dtype).to(dtype)
        loss = (-A * used).mean()
    return loss, _metrics(inp, D, eps, A, w_nat, torch.zeros_like(A, dtype=torch.bool), num_steps, used)


OBJECTIVES: dict[str, Callable] = {
    "pcpo": pcpo_loss,
    "grpo-clip": grpo_clip_loss,
    "ddpo": ddpo_loss,
}


def get_objective(name: str) -> Callable:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None
