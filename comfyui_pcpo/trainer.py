"""The PCPO update loop (Algorithm 1, steps 2-6), independent of any host.

The host supplies ``predict(x_t, sigma, sample_idx) -> pred`` returning the guidance-combined
prediction (eps_hat for diffusion, v for flow) of the CURRENT policy with grad, for latents
x_t (b, *L), sigma / t (b,) float and the trajectory's sample indices (b,).  Every micro-batch
lies inside one group (the host needs only that group's conditioning) and at one step (every row
has the same sigma: hosts such as ComfyUI read the first row's timestep for timestep-ranged
conditioning, ControlNet ranges and hooks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .advantages import group_advantages
from .forward_objectives import (TIME_WEIGHTINGS, ForwardInputs, forward_noise, get_forward_objective, is_forward,
                                 matching_target, time_weights)
from .objectives import LOG_RATIO_FORMS, ObjectiveInputs, get_objective
from .step_plan import mean_coefficients, no_trainable_step_error
from .trajectory import Trajectory

Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PCPOConfig:
    objective: str = "pcpo"           # "pcpo" | "grpo-clip" | "ddpo" | forward-process: "awm" | "nft"
    clip_range: float = 1e-4          # xi
    adv_clip: float = 5.0
    train_fraction: float = 1.0       # share of the trainable steps (last step excluded) kept per sample
    micro_batch: int = 4
    grad_clip: float = 1.0            # max gradient norm; 0 = no clipping
    updates_per_rollout: int = 2
    seed: int = 0
    log_ratio: str = "analytic"       # baselines only: "difference" = logp_new - logp_old as the reference codes
    time_weighting: str = "paper"     # forward-process objectives: "paper" | "proportionate"

    def validate(self) -> "PCPOConfig":
        if is_forward(self.objective):
            get_forward_objective(self.objective)
            if self.time_weighting not in TIME_WEIGHTINGS:
                raise ValueError(f"time_weighting {self.time_weighting!r} is unknown; choose one of "
                                 f"{', '.join(TIME_WEIGHTINGS)}")
            if self.log_ratio != "analytic":
                raise ValueError(f"log_ratio {self.log_ratio!r} applies to the baseline objectives; {self.objective} "
                                 "has no log-ratio (it trains on the forward process)")
        else:
            get_objective(self.objective)
        if self.log_ratio not in LOG_RATIO_FORMS:
            raise ValueError(f"log_ratio {self.log_ratio!r} is unknown; choose one of {', '.join(LOG_RATIO_FORMS)}")
        if self.log_ratio != "analytic" and self.objective == "pcpo":
            raise ValueError(f"log_ratio {self.log_ratio!r} applies to the baseline objectives (grpo-clip, ddpo); "
                             "pcpo computes its log-ratio analytically (log_ratio 'analytic')")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.micro_batch < 1 or self.updates_per_rollout < 1:
            raise ValueError("micro_batch and updates_per_rollout must be >= 1")
        if self.clip_range <= 0:
            raise ValueError("clip_range (xi) must be > 0")
        if self.grad_clip < 0:
            raise ValueError("grad_clip must be >= 0 (0 = no clipping)")
        return self


def candidate_steps(traj: Trajectory) -> torch.Tensor:
    """Trainable steps: stochastic ones, without the final step of the grid (reference default).
    An SDE window's plan never holds that step (``sde_window``): all its steps are candidates."""
    steps = traj.plan.trainable_steps()
    if steps.numel() == 0:
        raise no_trainable_step_error(traj.plan.sigmas)
    win = traj.plan.window
    last = traj.num_steps - 1 if win is None else win.grid_steps - 1 - win.start
    keep = steps[steps != last]
    return keep if keep.numel() > 0 else steps


def check_objective_fits(traj: Trajectory, objective: str) -> None:
    """Refuse an objective the rollout's record cannot train: a final-only record (a ComfyUI sampler)
    under a policy objective, an SDE-window record under a forward-process one."""
    if is_forward(objective):
        final_grid(traj)
    elif traj.plan.info.get("final_only"):
        raise ValueError(f"this rollout recorded only the final images (a ComfyUI sampler was wired into the "
                         f"Trajectory Sampler); {objective} trains on the recorded SDE steps: unwire the sampler, "
                         "or pick the objective awm or nft")


def forward_candidates(traj: Trajectory) -> torch.Tensor:
    """Training noise levels of the forward-process objectives: the indices of every point of the
    sampling grid but the final 0 (``final_grid``)."""
    return torch.arange(final_grid(traj).numel() - 1)


def timestep_candidates(traj: Trajectory, objective: str) -> torch.Tensor:
    """What the timestep draw of ``objective`` picks from (each micro-batch draws a permutation of it)."""
    return forward_candidates(traj) if is_forward(objective) else candidate_steps(traj)


def final_grid(traj: Trajectory) -> torch.Tensor:
    """The whole sampling grid (N+1,) float64 of a trajectory whose final latents are recorded (a
    final-only record of a ComfyUI sampler, or a full SDE rollout, whose last latent is x0)."""
    grid = traj.plan.info.get("grid")
    if grid is not None:
        return torch.tensor(grid, dtype=torch.float64)
    if traj.plan.window is not None:
        raise ValueError("an SDE-window rollout does not record the final latents: the forward-process objectives "
                         "(awm, nft) train on them; unwire the PCPO SDE Window, or wire a ComfyUI SAMPLER into the "
                         "Trajectory Sampler's sampler input")
    return traj.plan.sigmas.double()


def forward_noise_generator(traj: Trajectory, group: int, chunk: int, j: int) -> torch.Generator:
    """The fresh noise of pair set (group, micro-batch, training time j): seeded by the rollout's (seed,
    iteration, group), so a resumed run draws the same numbers."""
    from .run_state import rollout_seed
    meta = traj.meta
    group = int(group) + int(meta.get("group_offset", 0) or 0)  # the group's index across processes
    base = rollout_seed(int(meta.get("seed", 0) or 0), int(meta.get("iteration", 0) or 0), group)
    return torch.Generator().manual_seed((base * 6364136223846793005 + chunk * 1442695040888963407 + j + 1) % 2 ** 63)


def group_micro_batches(group_ids: torch.Tensor, size: int) -> dict[int, tuple]:
    """{group id: chunks of at most ``size`` of its sample indices}; a chunk never crosses a group."""
    group_ids = group_ids.cpu()
    return {int(g): torch.nonzero(group_ids == g).flatten().split(size) for g in torch.unique(group_ids)}


def micro_batches(group_ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """All micro-batches of :func:`group_micro_batches`, group by group."""
    return [mb for chunks in group_micro_batches(group_ids, size).values() for mb in chunks]


class PCPOTrainer:
    """Owns the optimizer loop over one rollout batch.  ``params``: trainable tensors."""

    def __init__(self, params, optimizer: torch.optim.Optimizer, config: PCPOConfig,
                 generator: Optional[torch.Generator] = None, grad_scaler=None,
                 reduce_gradients: Optional[Callable[[list], None]] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        """``generator`` draws the trained timesteps; a host that keeps one per run passes it in,
        otherwise one is seeded from ``config.seed``.  ``grad_scaler`` (a ``torch.amp.GradScaler``,
        for fp16 compute) scales the loss before backward and skips a step whose gradients
        overflowed.  ``reduce_gradients(params)`` (several processes: averages the accumulated
        gradients across them, e.g. :func:`comfyui_pcpo.distributed.average_gradients`) runs before
        unscaling and clipping.  ``compute_dtype``: the model's compute dtype (training precision),
        the working dtype of ``log_ratio="difference"`` (default: the prediction's dtype)."""
        self.params = [p for p in params]
        self.reduce_gradients = reduce_gradients
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.config = config.validate()
        self.compute_dtype = compute_dtype
        self.generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)

    def _clip_gradients(self) -> float:
        """Total gradient norm before clipping; clipped to ``grad_clip`` unless that is 0 (off)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.config.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def _optimize(self, n_updates: int, mbs: dict, work_for, predict, run_group) -> tuple:
        """``n_updates`` optimizer steps, each on the gradients every group's ``work_for(g, u)``
        accumulates (reduced across processes, unscaled, clipped).  Returns (last pre-clip gradient
        norm, every update's, steps skipped by the gradient scaler)."""
        grad_norm, grad_norms, skipped = 0.0, [], 0
        for u in range(n_updates):
            self.optimizer.zero_grad(set_to_none=True)
            for g in mbs:
                if run_group is not None:
                    run_group(g, work_for(g, u))
                else:
                    work_for(g, u)(predict)
            if self.reduce_gradients is not None:
                self.reduce_gradients(self.params)
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(self.optimizer)
            grad_norm = self._clip_gradients()
            grad_norms.append(grad_norm)
            if self.grad_scaler is not None:  # skips the step when the scaled gradients overflowed
                scale = self.grad_scaler.get_scale()
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
                skipped += int(self.grad_scaler.get_scale() < scale)
            elif not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError("non-finite gradient norm: lower the learning rate, or use training_precision "
                                         "fp32 or bf16")
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, grad_norms, skipped

    def _forward_update(self, traj: Trajectory, rewards: torch.Tensor, adv, predict, run_group, on_progress) -> dict:
        """The forward-process objectives (``forward_objectives``): per micro-batch ``train_fraction`` of
        the grid's noise levels, the final latents re-noised there with fresh noise, the prediction
        with grad against the matching target, weighted by the advantage.  The rollout policy's
        prediction (nft's pred_old) is the first update's own prediction, detached."""
        cfg = self.config
        B = traj.batch_size
        loss_fn = get_forward_objective(cfg.objective)
        grid = final_grid(traj)
        family = traj.plan.family
        cand = forward_candidates(traj)
        keep = max(1, int(round(cfg.train_fraction * cand.numel())))
        mbs = group_micro_batches(traj.group_ids, cfg.micro_batch)
        w_t, sig = time_weights(family, grid, cfg.time_weighting).float(), grid.float()
        x0 = traj.latents[:, -1]
        dev = x0.device
        total_pairs = B * keep
        n_updates = cfg.updates_per_rollout
        total_calls = n_updates * keep * sum(len(v) for v in mbs.values())
        perm = {(g, c): cand[torch.randperm(cand.numel(), generator=self.generator)[:keep]]
                for g, chunks in mbs.items() for c in range(len(chunks))}
        old: dict = {}
        st = {"loss": 0.0, "matching_error": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "done": 0,
              "step_clipped": torch.zeros(grid.numel() - 1, dtype=torch.float64),
              "step_seen": torch.zeros(grid.numel() - 1, dtype=torch.float64)}

        def work_for(g: int, u: int):
            def work(pred_fn: Predict) -> None:
                for c, mb in enumerate(mbs[g]):
                    for j in range(keep):
                        step = perm[(g, c)][j]
                        steps = step.expand(mb.numel())
                        x0_mb = x0[mb.to(dev)].float()
                        noise = torch.randn(x0_mb.shape, generator=forward_noise_generator(traj, g, c, j)).to(dev)
                        s = sig[steps]
                        x_s = forward_noise(family, x0_mb, noise, s)
                        pred_new = pred_fn(x_s, s, mb)
                        key = (g, c, j)
                        if u == 0:  # the rollout policy: the parameters before this iteration's first step
                            old[key] = pred_new.detach().float()
                        target = matching_target(family, x0_mb, noise).to(pred_new.device)
                        inp = ForwardInputs(adv.values[mb].to(pred_new.device), pred_new, old[key], target,
                                            w_t[steps].to(pred_new.device), s.to(pred_new.device))
                        loss, m = loss_fn(inp)
                        scaled = loss * (mb.numel() / total_pairs)
                        (self.grad_scaler.scale(scaled) if self.grad_scaler is not None else scaled).backward()
                        frac = mb.numel() / total_pairs / n_updates
                        st["loss"] += float(loss.detach()) * frac
                        st["matching_error"] += m["matching_error"] * frac
                        st["clip_fraction"] += m["clip_fraction"] * frac
                        st["step_clipped"][int(step)] += m["clip_fraction"] * mb.numel()
                        st["step_seen"][int(step)] += mb.numel()
                        with torch.no_grad():  # the size of the change of the prediction, as approx_kl
                            st["approx_kl"] += float(0.5 * (pred_new.detach().float() - old[key]).pow(2).mean()) * frac
                        st["done"] += 1
                        if on_progress is not None:
                            on_progress(st["done"], total_calls)
            return work

        grad_norm, grad_norms, skipped = self._optimize(n_updates, mbs, work_for, predict, run_group)
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "zero_std_groups": adv.zero_std_groups, "groups": adv.num_groups,
            "loss": st["loss"], "clip_fraction": st["clip_fraction"], "approx_kl": st["approx_kl"], "log_approx_error": 0.0,
            "clip_fraction_per_step": [float(c / n) if n > 0 else None
                                       for c, n in zip(st["step_clipped"], st["step_seen"])],
            "grad_norm": grad_norm, "grad_norms": grad_norms, "skipped_steps": skipped,
            "grad_scale": self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0,
            "first_update_log_ratio": 0.0, "pairs": total_pairs, "objective": cfg.objective,
            "log_ratio": "none", "log_ratio_gap": 0.0, "matching_error": st["matching_error"],
            "time_weighting": cfg.time_weighting,
        }

    def update(self, traj: Trajectory, rewards: torch.Tensor, predict: Optional[Predict] = None,
               run_group: Optional[Callable[[int, Callable[[Predict], None]], None]] = None,
               on_progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """Run ``updates_per_rollout`` optimizer steps on ``traj`` scored by ``rewards`` (B,).

        Give either ``predict`` or ``run_group(group_id, work)``: the host then calls
        ``work(predict)`` with a predictor bound to that group's conditioning (ComfyUI prepares
        conditioning per sampling call).  Gradients of all groups accumulate before each step.

        Returns metrics: reward_mean/std, zero_std_groups, loss, clip_fraction (+ per step of the
        sampling grid, None where no pair was trained, e.g. outside an SDE window), approx_kl, log_approx_error, grad_norm (pre-clip, last update),
        grad_norms (every update), skipped_steps (overflow under gradient scaling), grad_scale,
        pairs, log_ratio (the form), log_ratio_gap (mean |log rho used - analytic log rho|; 0 for
        the analytic form), and
        first_update_log_ratio (max mean |log rho| of the first update: 0 when the gradient pass
        reproduces the rollout exactly)."""
        if (predict is None) == (run_group is None):
            raise ValueError("give exactly one of predict or run_group")
        cfg = self.config
        check_objective_fits(traj, cfg.objective)
        B, S = traj.batch_size, traj.num_steps
        rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        if rewards.numel() != B:
            raise ValueError(f"got {rewards.numel()} rewards for a trajectory of {B} samples")
        adv = group_advantages(rewards, traj.group_ids, clip=cfg.adv_clip)
        if is_forward(cfg.objective):
            return self._forward_update(traj, rewards, adv, predict, run_group, on_progress)
        objective = get_objective(cfg.objective)
        cand = candidate_steps(traj)
        keep = max(1, int(round(cfg.train_fraction * cand.numel())))
        mbs = group_micro_batches(traj.group_ids, cfg.micro_batch)
        plan = traj.plan
        w_native, w_loss, sig = plan.w_native.float(), plan.w_loss.float(), plan.sigmas.float()
        difference = cfg.log_ratio == "difference"
        if difference:
            if plan.variant == "uw-lambda":
                raise ValueError("log_ratio 'difference' needs the rollout kernel's own prediction; under the "
                                 "uw-lambda variant it mixes in the reference model's: use log_ratio 'analytic'")
            mean_x, mean_pred = (v.float() for v in mean_coefficients(plan))
            step_std = plan.std.float()
        obj_kw = {"log_ratio": cfg.log_ratio, "work_dtype": self.compute_dtype} if difference else {}
        total_pairs = B * keep
        n_updates = cfg.updates_per_rollout
        total_calls = n_updates * keep * sum(len(v) for v in mbs.values())
        st = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "log_approx_error": 0.0, "log_ratio_gap": 0.0,
              "first_lr": 0.0, "done": 0, "clip_sum": torch.zeros(S), "pair_cnt": torch.zeros(S)}
        # per micro-batch a random subset of the candidate steps in random order (same for every
        # update): all rows of one forward pass share its step
        perm = {(g, c): cand[torch.randperm(cand.numel(), generator=self.generator)[:keep]]
                for g, chunks in mbs.items() for c in range(len(chunks))}
        dev = traj.latents.device

        def work_for(g: int, u: int):
            def work(pred_fn: Predict) -> None:
                for c, mb in enumerate(mbs[g]):
                    for j in range(keep):
                        steps = perm[(g, c)][j].expand(mb.numel())
                        rows, cols = mb.to(dev), steps.to(dev)
                        pred_new = pred_fn(traj.latents[rows, cols], sig[steps], mb)
                        inp = ObjectiveInputs(adv.values[mb].to(pred_new.device), pred_new,
                                              traj.pred_old[rows, cols], traj.eps_old[rows, cols],
                                              w_native[steps], w_loss[steps], steps)
                        if difference:
                            inp.x_t, inp.x_prev = traj.latents[rows, cols], traj.latents[rows, cols + 1]
                            inp.mean_x, inp.mean_pred, inp.std = mean_x[steps], mean_pred[steps], step_std[steps]
                        loss, m = objective(inp, xi=cfg.clip_range, num_steps=S, **obj_kw)
                        scaled = loss * (mb.numel() / total_pairs)
                        (self.grad_scaler.scale(scaled) if self.grad_scaler is not None else scaled).backward()
                        frac = mb.numel() / total_pairs / n_updates
                        st["loss"] += float(loss.detach()) * frac
                        for k in ("clip_fraction", "approx_kl", "log_approx_error"):
                            st[k] += m[k] * frac
                        st["log_ratio_gap"] += m.get("log_ratio_gap", 0.0) * frac
                        if u == 0:  # on-policy check: the first update replays the rollout exactly
                            st["first_lr"] = max(st["first_lr"], m["log_ratio_abs"])
                        st["clip_sum"] += torch.nan_to_num(m["clip_fraction_per_step"] * m["pairs_per_step"])
                        st["pair_cnt"] += m["pairs_per_step"]
                        st["done"] += 1
                        if on_progress is not None:
                            on_progress(st["done"], total_calls)
            return work

        grad_norm, grad_norms, skipped = self._optimize(n_updates, mbs, work_for, predict, run_group)
        cnt = st["pair_cnt"]
        per_step = [float(c) / float(n) if n > 0 else None for c, n in zip(st["clip_sum"], cnt)]
        win = plan.window
        if win is not None:  # per step of the whole sampling grid (None outside the SDE window)
            per_step = [None] * win.start + per_step + [None] * (win.grid_steps - win.end)
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "zero_std_groups": adv.zero_std_groups, "groups": adv.num_groups,
            "loss": st["loss"], "clip_fraction": st["clip_fraction"], "approx_kl": st["approx_kl"],
            "log_approx_error": st["log_approx_error"], "clip_fraction_per_step": per_step,
            "grad_norm": grad_norm, "grad_norms": grad_norms, "skipped_steps": skipped,
            "grad_scale": self.grad_scaler.get_scale() if self.grad_scaler is not None else 1.0,
            "first_update_log_ratio": st["first_lr"],
            "pairs": total_pairs, "objective": cfg.objective, "log_ratio": cfg.log_ratio,
            "log_ratio_gap": st["log_ratio_gap"],
        }
