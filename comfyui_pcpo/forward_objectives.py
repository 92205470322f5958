"""Forward-process objectives: train on re-noised final images, weighted by the group advantage.
They need only each sample's final latent x0 and its reward, so the rollout may use any sampler,
deterministic ones included.  Selectable by name next to the policy objectives of objectives.py.

Notation (one (sample, training time) pair; s = the training noise level, a point of the sampling
grid: a ComfyUI sigma for eps/v models, a flow time t for rectified-flow models; n ~ N(0, I) fresh
noise; A the clipped group advantage):

    diffusion:  x_s = x0 + s n                  target  n         (noise matching, eps space)
    flow:       x_s = (1 - s) x0 + s n          target  n - x0    (velocity matching, v space)

``pred`` is the model's guidance-combined prediction in the same space (eps_hat for diffusion, v for
flow; ComfyUI returns the denoised x0 and ``step_plan.prediction_from_denoised`` converts it), and
l(pred) = mean over latent elements of (pred - target)^2.

* ``awm`` -- Advantage Weighted Matching (Xue et al., ICML 2026; the velocity-matching loss of the
  pretraining objective, weighted by the advantage):  loss = mean over pairs of  A w_s l(pred_new).
  A > 0 lowers the matching error of that sample (raises its likelihood under the model's ELBO), A < 0
  raises it.  Source: the paper's abstract and the public reimplementation notes of Flow-Factory
  (X-GenGroup/Flow-Factory, guidance/algorithms.md, "AWM Weighting": l = |v_theta - (eps - x0)|^2
  times a weighting w(l, t), the uniform one being plain l).  Reconstruction: the paper's code was not
  reachable here; its optional stabilisers (a KL to an EMA policy, ratio clipping) are not applied.
* ``nft`` -- DiffusionNFT (Zheng et al., ICLR 2026; negative-aware fine-tuning on the forward
  process): the implicit positive and negative policies
      pred_+ = (1 - beta) pred_old + beta pred_new,   pred_- = (1 + beta) pred_old - beta pred_new,
  with pred_old the rollout policy's prediction at the same x_s (the parameters before this
  iteration's first update), and the optimality probability r = 0.5 + 0.5 clip(A, -1, 1) (A is
  already the reward normalised within the group):
      loss = mean over pairs of  w_s [ r l(pred_+) + (1 - r) l(pred_-) ].
  At r = 1/2 and pred_new = pred_old the gradient is 0; r > 1/2 pulls pred_new towards the target.
  Source: the paper's abstract and method as summarised by Flow-Factory ("implicit positive and
  negative policies v+ and v-, weighted by a normalized reward r in [0, 1]").  Reconstruction: the
  paper's adaptive (self-normalised x0-space) loss scale and its EMA old policy are not applied; the
  old policy is the policy that sampled the rollout.

Time weighting w_s (``time_weighting``):

* ``paper``: w = 1, every training time alike (AWM's "Uniform", DiffusionNFT's unweighted loss);
* ``proportionate``: PCPO's principle (credit per unit of generation time uniform, spec
  ``pcpo-math.md`` section 4b) on the sampling grid: flow w_i = dt_i / mean(dt) (the step's share of
  generation time, mean 1 over the grid); diffusion w = 1 (PCPO's constant w_bar: every step of the
  grid the same credit; the scale is absorbed by the learning rate).

Training times: for each micro-batch a random subset of the grid's noise levels (every point but the
final 0), ``train_fraction`` of them, drawn from the trainer's generator like the policy objectives'
steps; the noise of each pair from a generator seeded by the rollout's (seed, iteration, group), so
a resumed run draws the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORWARD_OBJECTIVES = ("awm", "nft")
TIME_WEIGHTINGS = ("paper", "proportionate")
NFT_BETA = 1.0


def is_forward(objective: str) -> bool:
    return objective in FORWARD_OBJECTIVES


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def forward_noise(family: str, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s of the forward process at noise level s (b,) (see the module doc)."""
    s = _col(s.to(x0.dtype), x0)
    return x0 + s * noise if family == "diffusion" else (1.0 - s) * x0 + s * noise


def matching_target(family: str, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The prediction the model matches at x_s: the noise (diffusion) or the velocity noise - x0 (flow)."""
    return noise if family == "diffusion" else noise - x0


def time_weights(family: str, grid: torch.Tensor, weighting: str) -> torch.Tensor:
    """w_i per grid point i = 0 .. N-1 (the final 0 is never trained), float64."""
    if weighting not in TIME_WEIGHTINGS:
        raise ValueError(f"time_weighting {weighting!r} is unknown; choose one of {', '.join(TIME_WEIGHTINGS)}")
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    n = grid.numel() - 1
    if weighting == "paper" or family == "diffusion":
        return torch.ones(n, dtype=torch.float64)
    dt = grid[:-1] - grid[1:]
    return dt / dt.mean()


@dataclass
class ForwardInputs:
    """P pairs: advantages, weight (P,); pred_new (with grad), pred_old, target (P, ...)."""
    advantages: torch.Tensor
    pred_new: torch.Tensor
    pred_old: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def _err(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def _prep(inp: ForwardInputs, dtype):
    dev = inp.pred_new.device
    return (inp.pred_new.to(dtype), inp.pred_old.to(dev, dtype), inp.target.to(dev, dtype),
            inp.advantages.to(dev, dtype), inp.weight.to(dev, dtype))


def awm_loss(inp: ForwardInputs, dtype: torch.dtype = torch.float32, **_):
    """mean(A w l(pred_new)); metrics: the mean matching error."""
    new, _old, tgt, A, w = _prep(inp, dtype)
    err = _err(new, tgt)
    loss = (A * w * err).mean()
    return loss, {"matching_error": float(err.detach().mean()), "clip_fraction": 0.0}


def nft_loss(inp: ForwardInputs, dtype: torch.dtype = torch.float32, beta: float = NFT_BETA, **_):
    """mean(w [r l(pred_+) + (1 - r) l(pred_-)]), r = 0.5 + 0.5 clip(A, -1, 1)."""
    new, old, tgt, A, w = _prep(inp, dtype)
    r = 0.5 + 0.5 * A.clamp(-1.0, 1.0)
    pos = (1.0 - beta) * old + beta * new
    neg = (1.0 + beta) * old - beta * new
    loss = (w * (r * _err(pos, tgt) + (1.0 - r) * _err(neg, tgt))).mean()
    return loss, {"matching_error": float(_err(new, tgt).detach().mean()), "clip_fraction": 0.0}


LOSSES = {"awm": awm_loss, "nft": nft_loss}


def get_forward_objective(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown forward objective {name!r}; choose one of {', '.join(LOSSES)}") from None
