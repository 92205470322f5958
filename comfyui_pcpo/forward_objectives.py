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

* ``awm`` -- Advantage Weighted Matching (Xue et al., ICML 2026).  The pretraining loss as a
  log-likelihood surrogate per (sample, training time) pair, l_new = -w_s l(pred_new) (its ELBO up to
  constants), in a clipped likelihood ratio like GRPO's, plus a proximal term to the rollout policy:
      rho = exp(l_new - l_old) = exp(w_s (l(pred_old) - l(pred_new))),   a = clip(A, -c, c) / c,
      loss = mean over pairs of  max(-a rho, -a clip(rho, 1 - eps, 1 + eps)) + lam l(pred_new; pred_old),
  with eps = AWM_CLIP_RANGE = 1, c = AWM_ADV_CLIP = 5, lam = AWM_PROXIMAL = 1 and pred_old the
  rollout policy's prediction at the same x_s (the parameters before this iteration's first update,
  so rho = 1 there and the first gradient is a w_s grad l(pred_new)).  a > 0 lowers the sample's
  matching error (raises its likelihood), a < 0 raises it; the exponential makes that push fade as
  the error grows and the proximal term pulls the prediction back towards the rollout policy's.
  Source: the reference code (scxue/advantage_weighted_matching, scripts/train_sd3_awm.py:
  ``compute_log_prob_awm`` with the ``Uniform`` weighting, ``loss_type = 'exp_first'``, and
  config/dgx_awm.py: ``clip_range = 1``, advantages clipped at ``adv_clip_max`` 5 and scaled to
  ``advantage_max`` 1, ``ema_beta = 1`` with ``kl_ema_weight = 'Uniform'``).  Reconstructed: the
  reference's proximal term is to an EMA of the policy updated once per epoch with decay
  min(0.3, 0.001 step), which early in training is the policy that sampled the epoch; here it is
  always that rollout policy.  Not applied: its KL to the base model (beta 0.001), its EMA sampling
  policy and its default ``ghuber`` error shape (``paper`` here is its ``Uniform``).
* ``nft`` -- DiffusionNFT (Zheng et al., ICLR 2026; negative-aware fine-tuning on the forward
  process): the implicit positive and negative policies
      pred_+ = (1 - beta) pred_old + beta pred_new,   pred_- = (1 + beta) pred_old - beta pred_new,
  with pred_old as for awm, the optimality probability r = 1/2 + clip(A, -c, c) / (2 c)
  (c = NFT_ADV_CLIP = 5, the reference's adv_clip_max), and each prediction's error measured in x0
  space (x0_hat = x_s - s pred in both families, so x0_hat - x0 = -s (pred - target)) with the
  reference's adaptive, self-normalised scale:
      L(pred) = mean((s (pred - target))^2) / sg(max(mean |s (pred - target)|, 1e-5)),
      loss = mean over pairs of  w_s (c / beta) [r L(pred_+) + (1 - r) L(pred_-)].
  At r = 1/2 and pred_new = pred_old the gradient is 0; r > 1/2 pulls pred_new towards the target.
  Source: the reference code (NVlabs DiffusionNFT, as in its public mirrors, e.g.
  Holosemantix/DiffusionNFT: ``positive_prediction``, ``implicit_negative_prediction``,
  ``weight_factor``, ``ori_policy_loss * adv_clip_max``), beta = 1.  Not applied: its KL to the
  reference model and its EMA old policy (the old policy here is the one that sampled the rollout);
  for eps-prediction models (SD1.x/SDXL) the x0-space form is this module's transfer of the flow
  formula (the reference trains SD3 and FLUX).

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
NFT_ADV_CLIP = 5.0      # DiffusionNFT's adv_clip_max: r = 1/2 + clip(A, -c, c) / (2 c)
NFT_MIN_SCALE = 1e-5    # the floor of its adaptive loss scale
AWM_CLIP_RANGE = 1.0    # AWM's clip_range on the likelihood ratio
AWM_ADV_CLIP = 5.0      # AWM's adv_clip_max: advantages clipped there and divided by it (advantage_max 1)
AWM_PROXIMAL = 1.0      # AWM's ema_beta: the weight of the proximal term to the rollout policy


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
    """P pairs: advantages, weight (P,); pred_new (with grad), pred_old, target (P, ...); level (P,): the
    noise level s of each pair (sigma or flow time), which nft's x0-space error needs."""
    advantages: torch.Tensor
    pred_new: torch.Tensor
    pred_old: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    level: torch.Tensor | None = None


def _err(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def _prep(inp: ForwardInputs, dtype):
    dev = inp.pred_new.device
    return (inp.pred_new.to(dtype), inp.pred_old.to(dev, dtype), inp.target.to(dev, dtype),
            inp.advantages.to(dev, dtype), inp.weight.to(dev, dtype))


def awm_loss(inp: ForwardInputs, dtype: torch.dtype = torch.float32, clip_range: float = AWM_CLIP_RANGE,
             adv_clip: float = AWM_ADV_CLIP, proximal: float = AWM_PROXIMAL, **_):
    """mean(max(-a rho, -a clip(rho, 1 - eps, 1 + eps)) + lam l(pred_new; pred_old)),
    rho = exp(w (l(pred_old) - l(pred_new))), a = clip(A, -c, c) / c; metrics: the mean matching error
    and the share of pairs whose ratio left the clip range."""
    new, old, tgt, A, w = _prep(inp, dtype)
    a = A.clamp(-adv_clip, adv_clip) / adv_clip
    err = _err(new, tgt)
    rho = torch.exp(w * (_err(old, tgt) - err))
    policy = torch.maximum(-a * rho, -a * rho.clamp(1.0 - clip_range, 1.0 + clip_range))
    loss = (policy + proximal * _err(new, old)).mean()
    clipped = ((rho.detach() - 1.0).abs() > clip_range).to(dtype).mean()
    return loss, {"matching_error": float(err.detach().mean()), "clip_fraction": float(clipped)}


def _x0_error(pred: torch.Tensor, target: torch.Tensor, level: torch.Tensor, floor: float) -> torch.Tensor:
    """DiffusionNFT's adaptive x0-space error per pair: mean(d^2) / sg(max(mean |d|, floor)),
    d = s (pred - target) = -(x0_hat - x0)."""
    d = (pred - target).flatten(1) * level.reshape(-1, 1)
    return d.pow(2).mean(1) / d.detach().abs().mean(1).clamp_min(floor)


def nft_loss(inp: ForwardInputs, dtype: torch.dtype = torch.float32, beta: float = NFT_BETA,
             adv_clip: float = NFT_ADV_CLIP, min_scale: float = NFT_MIN_SCALE, **_):
    """mean(w (c / beta) [r L(pred_+) + (1 - r) L(pred_-)]), r = 1/2 + clip(A, -c, c) / (2 c);
    ``min_scale`` is the floor of the adaptive scale (a floor above every mean |d| makes it constant)."""
    new, old, tgt, A, w = _prep(inp, dtype)
    if inp.level is None:
        raise ValueError("nft needs the noise level of each pair (ForwardInputs.level)")
    s = inp.level.to(new.device, dtype)
    r = 0.5 + 0.5 * A.clamp(-adv_clip, adv_clip) / adv_clip
    pos = (1.0 - beta) * old + beta * new
    neg = (1.0 + beta) * old - beta * new
    loss = (w * (adv_clip / beta) * (r * _x0_error(pos, tgt, s, min_scale)
                                     + (1.0 - r) * _x0_error(neg, tgt, s, min_scale))).mean()
    return loss, {"matching_error": float(_err(new, tgt).detach().mean()), "clip_fraction": 0.0}


LOSSES = {"awm": awm_loss, "nft": nft_loss}


def get_forward_objective(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown forward objective {name!r}; choose one of {', '.join(LOSSES)}") from None
