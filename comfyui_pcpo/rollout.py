"""Host-independent rollout: run the stochastic sampler of a :class:`StepPlan` and record the
trajectory.  The host supplies the guidance-combined predictor; for ComfyUI the node layer wraps
its model call (denoised x0 -> eps / v with ``plan.prediction_from_denoised``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .plan import StepPlan, step_mean
from .trajectory import Trajectory

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (b,*L), sigma (b,)) -> pred


def transition(plan: StepPlan, i: int, x: torch.Tensor, pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_prev = mu_i(x, pred) + std_i * noise."""
    mu = step_mean(plan, i, x, pred)
    std = float(plan.std[i])
    return mu + std * noise if std > 0 else mu


def rollout(predict: PredictFn, plan: StepPlan, x_init: torch.Tensor, generator: torch.Generator,
            predict_ref: Optional[PredictFn] = None, record: bool = True, storage_device="cpu",
            storage_dtype=torch.float32, callback: Optional[Callable[[int, torch.Tensor], None]] = None):
    """Sample from ``x_init`` (b, *L) (already scaled to the first sigma / t) through every step.

    Step noise is drawn on the CPU from ``generator`` (reproducible across devices).  Under the
    ``uw-lambda`` variant ``predict_ref`` (the base model) is required and the executed prediction
    is pred_ref + lambda_i (pred - pred_ref); the record keeps ``pred`` (the trained model's).
    Returns (x_final, dict of recorded tensors or None).
    """
    if plan.variant == "uw-lambda" and predict_ref is None:
        raise ValueError("the uw-lambda rollout needs the base model's prediction (predict_ref)")
    b = x_init.shape[0]
    x = x_init
    lat, epss, preds = ([x.detach().to(storage_device, storage_dtype)], [], []) if record else (None, None, None)
    for i in range(plan.num_steps):
        sigma = torch.full((b,), float(plan.sigmas[i]), device=x.device, dtype=x.dtype)
        pred = predict(x, sigma)
        used = pred
        if plan.variant == "uw-lambda" and float(plan.std[i]) > 0:
            ref = predict_ref(x, sigma)
            used = ref + float(plan.lam[i]) * (pred - ref)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
        x = transition(plan, i, x, used, noise)
        if record:
            lat.append(x.detach().to(storage_device, storage_dtype))
            epss.append(noise.detach().to(storage_device, storage_dtype))
            preds.append(pred.detach().to(storage_device, storage_dtype))
        if callback is not None:
            callback(i, x)
    if not record:
        return x, None
    return x, {"latents": torch.stack(lat, 1), "eps_old": torch.stack(epss, 1), "pred_old": torch.stack(preds, 1)}


def make_trajectory(records: list, plan: StepPlan, group_ids: torch.Tensor, prompt_index: torch.Tensor,
                    prompts: list, meta: Optional[dict] = None) -> Trajectory:
    """Concatenate per-group rollout records (in sample order) into one Trajectory."""
    cat = {k: torch.cat([r[k] for r in records], 0) for k in ("latents", "eps_old", "pred_old")}
    return Trajectory(**cat, group_ids=group_ids.long().cpu(), prompt_index=prompt_index.long().cpu(),
                      plan=plan, prompts=list(prompts), meta=dict(meta or {}))
