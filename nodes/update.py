"""PCPO LoRA Update: one PCPO (or baseline) update of the live LoRA from a scored rollout."""
from __future__ import annotations

import logging
import math
import time

import torch

import comfy.model_management
import comfy.utils

from comfyui_pcpo import progress as P
from comfyui_pcpo import ratings as H
from comfyui_pcpo.forward_objectives import FORWARD_OBJECTIVES, TIME_WEIGHTINGS, is_forward
from comfyui_pcpo.objectives import OBJECTIVES
from comfyui_pcpo.step_plan import prediction_from_denoised
from comfyui_pcpo import distributed
from comfyui_pcpo.atomic import dumps
from comfyui_pcpo.trainer import PCPOConfig, PCPOTrainer, check_objective_fits, final_grid, timestep_candidates
from comfyui_pcpo.iteration import (RUNNING_MEAN_OF, STALL_LIMIT, check_inputs, checkpoint_due, finishing_node,
                                    format_stats, gradient_stalled, stall_error, update_warnings)

from .model_hooks import clone_conditioning, interrupted, load_for_training, run_in_guider, training_mode
from .requeue import LOOPS, find_loop, requeue
from .validation import verdict
from .dashboard import record_iteration
from .heldout import apply_guard_lr, latest_heldout

log = logging.getLogger("comfyui-pcpo")


class PCPOLoRAUpdate:
    CATEGORY = "PCPO"
    FUNCTION = "update"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "stats")
    OUTPUT_TOOLTIPS = ("The same live model, after the update.",
                       "This iteration's training stats as JSON (reward mean/std, clip fraction, KL, grad norm).")
    DESCRIPTION = ("Updates the LoRA from a scored rollout with PCPO (or a baseline objective), checkpoints the run, "
                   "and re-queues the workflow until iterations_per_queue iterations have run.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": ("PCPO_SESSION", {"tooltip": "The run (from PCPO LoRA)."}),
            "trajectory": ("PCPO_TRAJECTORY", {"tooltip": "The rollout from the Trajectory Sampler."}),
            "rewards": ("PCPO_REWARDS", {"tooltip": "Its rewards from the Reward Scorer."}),
            "objective": (list(OBJECTIVES) + list(FORWARD_OBJECTIVES), {"default": "pcpo", "tooltip":
                          "How the rewards change the LoRA. pcpo (pick this): every denoising step gets credit in "
                          "proportion to its share of the image, with a clipped (log-hinge) loss that keeps each "
                          "update small. grpo-clip: the DanceGRPO/Flow-GRPO loss, for comparison. ddpo: plain "
                          "policy gradient (REINFORCE) without clipping, for comparison. awm and nft (2026): learn "
                          "from the final images only, re-noised (Advantage Weighted Matching, DiffusionNFT); they "
                          "work with any sampler wired into the Trajectory Sampler's sampler input."}),
            "clip_range": ("FLOAT", {"default": 1e-4, "min": 1e-6, "max": 1.0, "step": 1e-6, "round": False,
                                     "tooltip": "How far one update may move the model (the trust region, 'xi' in the "
                                     "paper), 6 decimals. Keep the reference 1e-4; lower it (5e-5) if the KL in the "
                                     "stats is high or the images break, raise it (2e-4) if the clip fraction stays "
                                     "near 1."}),
            "advantage_clip": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                         "tooltip": "Caps how hard one image can pull the LoRA. Each image is "
                                         "scored against the other images of its prompt (how many spreads above "
                                         "or below their average); this cuts that score at plus or minus this "
                                         "value, so one freak image cannot dominate an update. Keep 5 (the "
                                         "reference): it only acts in groups of 27 or more images (smaller groups "
                                         "never reach 5). Lower it (2-3) with large groups if single outliers "
                                         "make the reward jump; 0 turns the cap off."}),
            "train_fraction": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 1.0, "step": 0.05, "tooltip":
                               "Share of each image's denoising steps the update learns from (a random pick; "
                               "the last step is never trained). 1 learns from all of them (the reference for "
                               "SD1.x/SDXL). Lower it to make each update faster (time falls in proportion) at "
                               "the cost of a noisier update; 0.6 is the FLUX reference."}),
            "micro_batch": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip":
                                    "Samples per forward/backward (within a group). Lower it if memory runs out."}),
            "grad_clip": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                                    "Clip the gradient norm to this value (reference 1.0); 0 = no clipping."}),
            "updates_per_rollout": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip":
                                            "How many times the LoRA is updated from one batch of images before "
                                            "new ones are sampled. The first update learns from images the LoRA "
                                            "just made; the next ones reuse them after the LoRA has already moved "
                                            "(clip_range keeps that in check). 2 (the reference) gets more out of "
                                            "each batch; 1 is the fastest and safest. Every extra update repeats the "
                                            "whole training pass, and too many overshoot (clip and kl in the stats "
                                            "rise)."}),
            "iterations_per_queue": ("INT", {"default": 1, "min": 1, "max": 100000, "tooltip":
                                             "Iterations (sample, score, update) one press of Queue runs: the node "
                                             "re-queues the workflow until they are done. Cancel stops it."}),
            "checkpoint_every": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip":
                                         "Write the run checkpoint every this many iterations (and at the end)."}),
        }, "optional": {
            "time_weighting": (list(TIME_WEIGHTINGS), {"default": "paper", "tooltip":
                               "awm and nft only: how much each noise level counts. paper: all alike, as the "
                               "papers train. proportionate: PCPO's rule, each level in proportion to its share of "
                               "the sampling time (differs for flow models such as SD3 and FLUX)."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, clip_range=None, advantage_clip=None, train_fraction=None, grad_clip=None):
        """The FLOAT inputs, checked when the prompt is queued (finite and in range: see nodes/validation.py)."""
        return verdict(cls, clip_range=clip_range, advantage_clip=advantage_clip, train_fraction=train_fraction, grad_clip=grad_clip)

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def update(self, session, trajectory, rewards, objective, clip_range, advantage_clip, train_fraction,
               micro_batch, grad_clip, updates_per_rollout, iterations_per_queue, checkpoint_every,
               time_weighting="paper", prompt=None, extra_pnginfo=None, unique_id=None):
        session = session.live()
        state = session.state
        batch = trajectory
        check_inputs(session.run_name, state.iteration, session.token, batch, rewards)
        # the loop this prompt continues, as the server remembers it (a forged marker is a press)
        loop = find_loop(extra_pnginfo, session.run_name, session.lineage)
        if loop is not None:
            press = P.Press(loop.first, loop.target, loop.started)
        else:
            press = P.new_press(state.iteration, int(iterations_per_queue),
                                getattr(batch, "started", 0.0) or time.time())
        target = press.target

        check_objective_fits(batch.traj, objective)  # before any work
        cfg = PCPOConfig(objective=objective, clip_range=clip_range, adv_clip=advantage_clip,
                         train_fraction=train_fraction, micro_batch=micro_batch, grad_clip=grad_clip,
                         updates_per_rollout=updates_per_rollout, seed=0, time_weighting=time_weighting)
        apply_guard_lr(session)  # a learning rate the Reward Guard lowered
        trainer = PCPOTrainer(state.params(), state.optimizer, cfg, generator=state.generator,
                              grad_scaler=state.grad_scaler,
                              reduce_gradients=distributed.average_gradients if distributed.active() else None,
                              compute_dtype=session.options.precision.dtype)
        model = session.model
        device = model.load_device
        traj = batch.traj
        sigmas = (final_grid(traj) if is_forward(objective) else traj.plan.sigmas).float()
        G = max(int((traj.group_ids == g).sum()) for g in torch.unique(traj.group_ids))
        pbar = comfy.utils.ProgressBar(100)

        def progress(done, total):
            pbar.update_absolute(int(100 * done / max(total, 1)), 100)
            interrupted()

        def run_group(g, work):
            pos, neg = batch.group_conds[g]

            def fn(predict):
                def pred(x, s, idx):
                    x, s = x.to(device).clone(), s.to(device)
                    return prediction_from_denoised(traj.plan, x, predict(x, s), s)
                return work(pred)

            run_in_guider(model, clone_conditioning(pos), clone_conditioning(neg), batch.cfg,
                          (min(G, micro_batch), *batch.latent_shape), sigmas, fn)

        # an iteration is atomic: any failure (Cancel included) restores the run exactly as it was
        snapshot = state.snapshot()
        try:
            load_for_training(model, batch.latent_shape, min(G, micro_batch))
            # several processes: the timestep draws of the other ranks' groups, so every rank keeps the
            # generator of one process sampling all groups
            n_cand, n_groups = timestep_candidates(traj, objective).numel(), int(torch.unique(traj.group_ids).numel())
            before, after = distributed.timestep_draws_around(n_groups, math.ceil(G / micro_batch))
            distributed.skip_timestep_draws(state.generator, before, n_cand)
            with training_mode():
                stats = trainer.update(traj, rewards.values, run_group=run_group, on_progress=progress)
            distributed.skip_timestep_draws(state.generator, after, n_cand)
            stats = distributed.reduce_stats(stats, traj.batch_size)
        except BaseException as e:
            state.restore(snapshot)
            if isinstance(e, comfy.model_management.InterruptProcessingException):
                session.save_if_dirty()
            raise
        summary = {k: stats[k] for k in ("reward_mean", "reward_std", "clip_fraction", "approx_kl", "grad_norm",
                                         "log_approx_error", "zero_std_groups", "first_update_log_ratio")}
        summary.update(objective=objective, reward=rewards.name, skipped_steps=stats["skipped_steps"],
                       precision=session.options.precision.name,
                       flow_noise_rule=str(traj.meta.get("flow_noise_rule", "constant")))
        win = traj.plan.window
        if win is not None:  # the SDE window this iteration trained: its first and last step of the grid
            summary.update(sde_window_first_step=win.start, sde_window_last_step=win.end - 1)
        human = getattr(rewards, "human", None)
        if human is not None:  # what shows progress under human ratings (their mean is 0 by construction)
            summary.update(H.tracking_fields(state.history, human["rated_groups"], human["groups"],
                                             human.get("model_reward"), human.get("model_reward_name")))
        stalled = gradient_stalled(stats)
        state.stalled_iterations = state.stalled_iterations + 1 if stalled else 0
        state.commit(summary, int(updates_per_rollout), rewards.name, objective)
        if state.companions is None:
            state.companions = {}
        rated = getattr(rewards, "rating_requests", None)
        if rated:  # the rating requests this iteration trains on, committed with it
            state.companions["ratings"] = {"iteration": state.iteration, "request_ids": sorted(rated)}
        else:
            state.companions.pop("ratings", None)
        record_iteration(session, stats)  # this iteration's metrics record (and its metrics.jsonl line)
        due = checkpoint_due(state.iteration, int(checkpoint_every), target)
        finisher = finishing_node(prompt, unique_id)
        if finisher is not None:  # the guard / held-out evaluation commits the iteration with its results
            session.pending_commit = {"by": finisher, "checkpoint": due}
        elif due:
            session.save_checkpoint()
        if state.stalled_iterations >= STALL_LIMIT:
            session.save_checkpoint()
            raise RuntimeError(stall_error(session.run_name, state.stalled_iterations, stats,
                                           session.options.precision.name))
        warnings = update_warnings(float(traj.meta.get("eta", 1.0)), stats)
        warnings += state.load_notes  # findings of the checkpoint this run was resumed from, shown once
        state.load_notes = []
        text = format_stats(state.iteration, stats)
        log.info("PCPO %s: %s", session.run_name, text)
        for w in warnings:
            log.warning("PCPO %s: %s", session.run_name, w)
        where = P.progress(press, state.iteration, time.time())
        shown_progress = P.as_ui(where)
        if state.iteration < target:
            started = loop is None
            if started:  # a press: the server remembers its loop (run, lineage, target, progress)
                loop = LOOPS.start(session.run_name, session.lineage, target, press.first, press.started)
            if not requeue(prompt, extra_pnginfo, session.run_name, loop=loop.id,
                           on_cancel={"node": str(unique_id), "text": shown_progress["cancel_text"]}):
                if started:
                    LOOPS.end(loop)
                log.info("PCPO: no server queue to loop on; run the next iteration by queueing again")
        else:
            LOOPS.end(loop)
        stats_json = dumps({**stats, "iteration": state.iteration, "target_iteration": target,
                            "optimizer_steps": state.optimizer_steps, "warnings": warnings})
        recent = [h["reward_mean"] for h in state.history[-RUNNING_MEAN_OF:]]
        shown = {"iteration": state.iteration, "target_iteration": target, "reward_mean": stats["reward_mean"],
                 "running_mean": sum(recent) / len(recent), "running_count": len(recent),
                 "progress": shown_progress}
        if human is not None:
            shown["rated_groups_total"] = state.history[-1]["rated_groups_total"]
            shown["signal"] = H.signal_text(state.history, latest_heldout(session.run_name, state.iteration),
                                            RUNNING_MEAN_OF)
        return {"ui": {"text": [text] + [f"warning: {w}" for w in warnings], "pcpo_stats": [shown]},
                "result": (model, stats_json)}


NODE_CLASS_MAPPINGS = {"PCPOLoRAUpdate": PCPOLoRAUpdate}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOLoRAUpdate": "PCPO LoRA Update"}
