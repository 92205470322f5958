"""Policy objectives on recorded rollout steps, selectable by name.

Every objective takes an :class:`ObjectiveInputs` of P (sample, step) pairs and returns
``(loss, metrics)``.  The log-ratio of a pair is computed ANALYTICALLY from the prediction change
D = pred_new - pred_old (same x_t, timestep and conditioning, guidance-combined), the rollout noise
eps_old and the step's weight w (see weights.py):

    M = -log rho = w mean(D eps_old) + 0.5 mean((w D)^2)          (means over latent elements)

never as a difference of two large log-probs.  Losses are formed in float32 by default
(``dtype``; tests use float64).

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


def neg_log_ratio(D: torch.Tensor, eps_old: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """M = -log rho = w mean(D eps_old) + 0.5 mean((w D)^2) per pair. D, eps_old (P, ...), w (P,) -> (P,)."""
    w = w.reshape(-1, *([1] * (D.ndim - 1))).to(D.dtype)
    return (w * D * eps_old).flatten(1).mean(1) + 0.5 * ((w * D) ** 2).flatten(1).mean(1)


def _as(t: torch.Tensor, dev, dtype) -> torch.Tensor:
    t = t.to(dev, dtype)
    # tensors recorded under torch.inference_mode() (a host's sampling) cannot join autograd
    return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t


def _prepare(inp: ObjectiveInputs, dtype: torch.dtype):
    dev = inp.pred_new.device
    D = inp.pred_new.to(dtype) - _as(inp.pred_old, dev, dtype)
    return (D, _as(inp.eps_old, dev, dtype), _as(inp.advantages, dev, dtype),
            _as(inp.w_native, dev, dtype), _as(inp.w_loss, dev, dtype))


def _metrics(inp, D, eps, A, w_nat, gate_off: torch.Tensor, num_steps: Optional[int]) -> dict:
    with torch.no_grad():
        log_rho = -neg_log_ratio(D, eps, w_nat)
        rho = log_rho.exp()
        kl = 0.5 * ((w_nat.reshape(-1, *([1] * (D.ndim - 1))) * D) ** 2).flatten(1).mean(1)
        m = {
            "clip_fraction": float(gate_off.float().mean()),
            "approx_kl": float(kl.mean()),
            "log_ratio_abs": float(log_rho.abs().mean()),
            "log_approx_error": float((log_rho - (rho - 1.0)).abs().mean()),
        }
        if inp.step_index is not None and num_steps:
            idx = inp.step_index.to(gate_off.device).long()
            cnt = torch.zeros(num_steps, device=idx.device).index_add_(0, idx, torch.ones(idx.shape, device=idx.device))
            off = torch.zeros(num_steps, device=idx.device).index_add_(0, idx, gate_off.float())
            m["clip_fraction_per_step"] = torch.where(cnt > 0, off / cnt.clamp_min(1), torch.full_like(cnt, float("nan"))).cpu()
            m["pairs_per_step"] = cnt.cpu()
    return m


def pcpo_loss(inp: ObjectiveInputs, xi: float = 1e-4, num_steps: Optional[int] = None,
              dtype: torch.dtype = torch.float32):
    """PCPO log-hinge: mean over pairs of max(0, xi |A| + A M), M with the PCPO weight."""
    D, eps, A, w_nat, w_loss = _prepare(inp, dtype)
    M = neg_log_ratio(D, eps, w_loss)
    hinge = xi * A.abs() + A * M
    loss = torch.relu(hinge).mean()
    return loss, _metrics(inp, D, eps, A, w_nat, hinge < 0, num_steps)


def grpo_clip_loss(inp: ObjectiveInputs, xi: float = 1e-4, num_steps: Optional[int] = None,
                   dtype: torch.dtype = torch.float32):
    """Clipped ratio: mean of max(-A rho, -A clip(rho, 1 - xi, 1 + xi)), rho = exp(-M_native)."""
    D, eps, A, w_nat, _ = _prepare(inp, dtype)
    rho = torch.exp(-neg_log_ratio(D, eps, w_nat))
    unclipped = -A * rho
    clipped = -A * rho.clamp(1.0 - xi, 1.0 + xi)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        gate_off = (xi * A.abs() - A * (rho - 1.0)) < 0
    return loss, _metrics(inp, D, eps, A, w_nat, gate_off, num_steps)


def ddpo_loss(inp: ObjectiveInputs, xi: float = 1e-4, num_steps: Optional[int] = None,
              dtype: torch.dtype = torch.float32):
    """DDPO-SF: mean of A * M_native (= -A log pi_new + const); ``xi`` is unused (no clipping)."""
    D, eps, A, w_nat, _ = _prepare(inp, dtype)
    loss = (A * neg_log_ratio(D, eps, w_nat)).mean()
    return loss, _metrics(inp, D, eps, A, w_nat, torch.zeros_like(A, dtype=torch.bool), num_steps)


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
