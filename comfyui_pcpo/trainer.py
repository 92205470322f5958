"""The PCPO update loop (Algorithm 1, steps 2-6), independent of any host.

The host supplies ``predict(x_t, sigma, sample_idx) -> pred`` returning the guidance-combined
prediction (eps_hat for diffusion, v for flow) of the CURRENT policy with grad, for latents
x_t (b, *L), per-sample sigma / t (b,) float and the trajectory's sample indices (b,).  Every
micro-batch lies inside one group, so the host needs only that group's conditioning.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from .advantages import group_advantages
from .objectives import ObjectiveInputs, get_objective
from .trajectory import Trajectory

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PCPOConfig:
    objective: str = "pcpo"           # "pcpo" | "grpo-clip" | "ddpo"
    clip_range: float = 1e-4          # xi
    adv_clip: float = 5.0
    train_fraction: float = 1.0       # share of the trainable steps (last step excluded) kept per sample
    micro_batch: int = 4
    grad_clip: float = 1.0
    updates_per_rollout: int = 2
    seed: int = 0

    def validate(self) -> "PCPOConfig":
        get_objective(self.objective)
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.micro_batch < 1 or self.updates_per_rollout < 1:
            raise ValueError("micro_batch and updates_per_rollout must be >= 1")
        if self.clip_range <= 0:
            raise ValueError("clip_range (xi) must be > 0")
        return self


def candidate_steps(traj: Trajectory) -> torch.Tensor:
    """Trainable steps: stochastic ones, without the final step of the grid (reference default)."""
    steps = traj.plan.trainable_steps()
    last = traj.num_steps - 1
    keep = steps[steps != last]
    return keep if keep.numel() > 0 else steps


def micro_batches(group_ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split sample indices into chunks of at most ``size`` that never cross a group."""
    out = []
    for g in torch.unique(group_ids):
        idx = torch.nonzero(group_ids == g).flatten()
        out.extend(idx.split(size))
    return out


class PCPOTrainer:
    """Owns the optimizer loop over one rollout batch.  ``params``: trainable tensors."""

    def __init__(self, params, optimizer: torch.optim.Optimizer, config: PCPOConfig):
        self.params = [p for p in params]
        self.optimizer = optimizer
        self.config = config.validate()
        self.generator = torch.Generator().manual_seed(config.seed)

    def update(self, traj: Trajectory, rewards: torch.Tensor, predict: Predict,
               on_pair_batch: Optional[Callable[[int, int], None]] = None) -> dict:
        """Run ``updates_per_rollout`` optimizer steps on ``traj`` scored by ``rewards`` (B,).

        Returns metrics: reward_mean/std, zero_std_groups, loss, clip_fraction (+ per step),
        approx_kl, log_approx_error, grad_norm (pre-clip, last update), pairs, and
        first_update_log_ratio (max mean |log rho| of the first update: 0 when the gradient pass
        reproduces the rollout exactly)."""
        cfg = self.config
        B, S = traj.batch_size, traj.num_steps
        rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        if rewards.numel() != B:
            raise ValueError(f"got {rewards.numel()} rewards for a trajectory of {B} samples")
        adv = group_advantages(rewards, traj.group_ids, clip=cfg.adv_clip)
        objective = get_objective(cfg.objective)
        cand = candidate_steps(traj)
        keep = max(1, int(round(cfg.train_fraction * cand.numel())))
        mbs = micro_batches(traj.group_ids.cpu(), cfg.micro_batch)
        plan = traj.plan
        w_native = plan.w_native.float()
        w_loss = plan.w_loss.float()
        sig = plan.sigmas.float()
        total_pairs = B * keep
        clip_sum = torch.zeros(S)
        pair_cnt = torch.zeros(S)
        agg = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "log_approx_error": 0.0}
        grad_norm = 0.0
        first_lr = 0.0
        done = 0
        n_updates = cfg.updates_per_rollout
        # per-sample random subset of the candidate steps, in random order (same for every update)
        perm = torch.stack([cand[torch.randperm(cand.numel(), generator=self.generator)[:keep]] for _ in range(B)])
        for u in range(n_updates):
            self.optimizer.zero_grad(set_to_none=True)
            for j in range(keep):
                for mb in mbs:
                    steps = perm[mb, j]
                    dev = traj.latents.device
                    x_t = traj.latents[mb.to(dev), steps.to(dev)]
                    pred_old = traj.pred_old[mb.to(dev), steps.to(dev)]
                    eps_old = traj.eps_old[mb.to(dev), steps.to(dev)]
                    pred_new = predict(x_t, sig[steps], mb)
                    inp = ObjectiveInputs(adv.values[mb].to(pred_new.device), pred_new, pred_old, eps_old,
                                          w_native[steps], w_loss[steps], steps)
                    loss, m = objective(inp, xi=cfg.clip_range, num_steps=S)
                    (loss * (mb.numel() / total_pairs)).backward()
                    frac = mb.numel() / total_pairs / n_updates
                    agg["loss"] += float(loss.detach()) * frac
                    for k in ("clip_fraction", "approx_kl", "log_approx_error"):
                        agg[k] += m[k] * frac
                    if u == 0:  # on-policy check: the first update replays the rollout exactly
                        first_lr = max(first_lr, m["log_ratio_abs"])
                    clip_sum += torch.nan_to_num(m["clip_fraction_per_step"] * m["pairs_per_step"])
                    pair_cnt += m["pairs_per_step"]
                    done += 1
                    if on_pair_batch is not None:
                        on_pair_batch(done, n_updates * keep * len(mbs))
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)) if grads else 0.0
            if not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError("non-finite gradient norm; lower the learning rate or check the model dtype")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        per_step = torch.where(pair_cnt > 0, clip_sum / pair_cnt.clamp_min(1), torch.full_like(pair_cnt, float("nan")))
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "zero_std_groups": adv.zero_std_groups, "groups": adv.num_groups,
            **agg, "clip_fraction_per_step": per_step.tolist(), "grad_norm": grad_norm,
            "first_update_log_ratio": first_lr,
            "pairs": total_pairs, "objective": cfg.objective,
        }

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "config": asdict(self.config)}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.generator.set_state(sd["generator"])
