"""Host-independent rollout: run the stochastic sampler of a :class:`StepPlan` and record the
trajectory.  The host supplies the guidance-combined predictor; for ComfyUI the node layer wraps
its model call (denoised x0 -> eps / v with ``plan.prediction_from_denoised``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .step_plan import StepPlan, step_mean
from .trajectory import Trajectory

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (b,*L), sigma (b,)) -> pred
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]  # (step i, x) -> standard normal noise shaped like x
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (i, x, sigma, pred)
# (x, grid segment (n+1,) float64 descending) -> x at the segment's end: a deterministic ODE solver
OdeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cpu_noise(generator: torch.Generator) -> NoiseFn:
    """Step noise drawn on the CPU from ``generator`` in float32 (the same numbers on every device),
    moved to x's device and dtype."""
    def draw(i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    return draw


def transition(plan: StepPlan, i: int, x: torch.Tensor, pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_prev = mu_i(x, pred) + std_i * noise."""
    mu = step_mean(plan, i, x, pred)
    std = float(plan.std[i])
    return mu + std * noise if std > 0 else mu


def rollout(predict: PredictFn, plan: StepPlan, x_init: torch.Tensor, noise,
            predict_ref: Optional[PredictFn] = None, record: bool = True, storage_device="cpu",
            storage_dtype=torch.float32, callback: Optional[Callable[[int, torch.Tensor], None]] = None,
            on_step: Optional[StepHook] = None):
    """Sample from ``x_init`` (b, *L) (already scaled to the first sigma / t) through every step.

    ``noise`` is the step-noise source: a ``torch.Generator`` (drawn with :func:`cpu_noise`) or a
    :data:`NoiseFn`.  Under the ``uw-lambda`` variant ``predict_ref`` (the base model) is required
    and the executed prediction is pred_ref + lambda_i (pred - pred_ref); the record keeps ``pred``
    (the trained model's).  ``on_step(i, x, sigma, pred)`` sees each step's state and the trained
    model's prediction before the transition (e.g. :class:`KLToReference`); ``callback(i, x_next)``
    runs after it (progress, cancel).  Returns (x_final, dict of recorded tensors or None).
    """
    draw = cpu_noise(noise) if isinstance(noise, torch.Generator) else noise
    if plan.variant == "uw-lambda" and predict_ref is None:
        raise ValueError("the uw-lambda rollout needs the base model's prediction (predict_ref)")
    b = x_init.shape[0]
    x = x_init
    lat, epss, preds = ([x.detach().to(storage_device, storage_dtype)], [], []) if record else (None, None, None)
    for i in range(plan.num_steps):
        sigma = torch.full((b,), float(plan.sigmas[i]), device=x.device, dtype=x.dtype)
        pred = predict(x, sigma)
        if on_step is not None:
            on_step(i, x, sigma, pred)
        used = pred
        if plan.variant == "uw-lambda" and float(plan.std[i]) > 0:
            ref = predict_ref(x, sigma)
            used = ref + float(plan.lam[i]) * (pred - ref)
        eps = draw(i, x)
        x = transition(plan, i, x, used, eps)
        if record:
            lat.append(x.detach().to(storage_device, storage_dtype))
            epss.append(eps.detach().to(storage_device, storage_dtype))
            preds.append(pred.detach().to(storage_device, storage_dtype))
        if callback is not None:
            callback(i, x)
    if not record:
        return x, None
    return x, {"latents": torch.stack(lat, 1), "eps_old": torch.stack(epss, 1), "pred_old": torch.stack(preds, 1)}


def windowed_rollout(predict: PredictFn, plan: StepPlan, grid: torch.Tensor, x_init: torch.Tensor, noise,
                     ode: Optional[OdeFn] = None, **kw):
    """:func:`rollout` of an SDE window's ``plan`` (``plan.window``, see ``sde_window``) inside the
    whole sampling ``grid`` (N+1,): the deterministic solver ``ode`` integrates from grid[0] to the
    window's first grid point, the window's steps run and are recorded exactly as :func:`rollout`
    records them, and ``ode`` integrates from the window's last grid point to grid[N].  A plan without
    a window is the full SDE rollout (``ode`` unused).  ``kw`` go to :func:`rollout`.  Returns
    (x_final, record of the window's steps or None)."""
    win = plan.window
    if win is None:
        return rollout(predict, plan, x_init, noise, **kw)
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
    if grid.numel() != win.grid_steps + 1 or not torch.equal(grid[win.start:win.end + 1], plan.sigmas):
        raise ValueError("the SDE window's plan does not lie on this sampling grid")
    if ode is None:
        raise ValueError("an SDE window needs a deterministic solver for the steps outside it (ode)")
    x = x_init
    if win.start > 0:
        x = ode(x, grid[:win.start + 1])
    x, rec = rollout(predict, plan, x, noise, **kw)
    if win.end < win.grid_steps:
        x = ode(x, grid[win.end:])
    return x, rec


class KLToReference:
    """An ``on_step`` hook: per sample, the KL of the policy's transition to a reference model's
    (``predict_ref``, e.g. the base model), per latent element, summed over the stochastic steps:
    KL_i = mean over elements of (mu_i(x, pred) - mu_i(x, pred_ref))^2 / (2 std_i^2), both
    transitions being Gaussians with the same std_i.  Accumulated in float64 in ``self.kl`` (b,)."""

    def __init__(self, plan: StepPlan, predict_ref: PredictFn, batch: int):
        self.plan, self.predict_ref = plan, predict_ref
        self.kl = torch.zeros(batch, dtype=torch.float64)

    def __call__(self, i: int, x: torch.Tensor, sigma: torch.Tensor, pred: torch.Tensor) -> None:
        std = float(self.plan.std[i])
        if std <= 0:
            return
        ref = self.predict_ref(x, sigma)
        d = (step_mean(self.plan, i, x, pred) - step_mean(self.plan, i, x, ref)).double() / std
        self.kl += 0.5 * d.pow(2).flatten(1).mean(1).cpu()


def make_trajectory(records: list, plan: StepPlan, group_ids: torch.Tensor, prompt_index: torch.Tensor,
                    prompts: list, meta: Optional[dict] = None) -> Trajectory:
    """Concatenate per-group rollout records (in sample order) into one Trajectory."""
    cat = {k: torch.cat([r[k] for r in records], 0) for k in ("latents", "eps_old", "pred_old")}
    return Trajectory(**cat, group_ids=group_ids.long().cpu(), prompt_index=prompt_index.long().cpu(),
                      plan=plan, prompts=list(prompts), meta=dict(meta or {}))
