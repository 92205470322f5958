"""PCPO Held-out Evaluation and PCPO Reward Guard.

The evaluation samples a fixed list of held-out prompts (never trained on) with fixed noise (one
generator per prompt, from the node's seed: the same LoRA gives the same images and scores) with the
run's current LoRA, every ``every`` iterations (and at iteration 1), scores them with the training
reward and optional guard rewards, and measures the KL of the policy to the base model along those
samples.  The guard keeps the best state by held-out reward and rolls back to it exactly when the run
trips (see ``comfyui_pcpo.guard``).  Both run after the LoRA Update (wire its stats into the
evaluation) and write their results into the iteration's line of ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

import comfy.samplers
import comfy.utils

from comfyui_pcpo import rewards as R
from comfyui_pcpo.guard import (ACTIONS, BEST_FILE, GUARD_FILE, GuardConfig, GuardState, apply_lr, apply_verdict,
                                decide, guard_of, keep_guard)
from comfyui_pcpo.rewards.base import RewardMix
from comfyui_pcpo.rollout import KLToReference, rollout
from comfyui_pcpo.run_state import heldout_seed

from .dashboard import merge_metrics, preview, to_image_tensor
from .export import filename_error
from .validation import verdict
from .model_hooks import run_in_guider
from .prompts import encode_text, read_prompt_lines
from .reward_models import run_reward
from .sampler import latent_shape_for, make_plan, policy_and_base, step_progress

log = logging.getLogger("comfyui-pcpo")
NO_GUARD = "(none)"
DEFAULT_PROMPTS = "a red circle on a green background\na blue square on a yellow background"


@dataclass
class HeldOut:
    """What flows on a PCPO_HELDOUT socket."""
    run_name: str
    iteration: int
    fresh: bool                   # evaluated at this iteration (False: the latest earlier result)
    reward: float                 # mean training reward on the held-out samples
    reward_name: str
    guards: dict                  # guard reward name -> mean
    kl_base: float                # KL of the policy to the base model per latent element, summed over steps
    per_sample: list
    prompts: list
    images: torch.Tensor = field(repr=False, default=None)

    def fields(self) -> dict:
        return {"heldout_reward": self.reward, "heldout_reward_name": self.reward_name,
                "heldout_guard": dict(self.guards), "heldout_kl_base": self.kl_base,
                "heldout_iteration": self.iteration}


def image_grid(images: torch.Tensor, min_tile: int = 128) -> np.ndarray:
    """(B, H, W, C) in [0, 1] -> one uint8 grid, small images scaled up (nearest) to ``min_tile``."""
    imgs = images.detach().float().clamp(0, 1).cpu()
    if imgs.shape[-1] == 1:
        imgs = imgs.expand(*imgs.shape[:-1], 3)
    imgs = imgs[..., :3]
    B, H, W, _ = imgs.shape
    k = max(1, math.ceil(min_tile / max(min(H, W), 1)))
    if k > 1:
        imgs = imgs.repeat_interleave(k, 1).repeat_interleave(k, 2)
        H, W = H * k, W * k
    cols = math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    pad = 4
    out = torch.ones(rows * (H + pad) + pad, cols * (W + pad) + pad, 3)
    for b in range(B):
        r, c = divmod(b, cols)
        out[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = imgs[b]
    return (out.numpy() * 255).round().astype(np.uint8)


def reward_object(name: str, model=None):
    return model if model is not None else R.builtin_reward(name)


def mean_score(obj, images, prompts) -> tuple:
    """(mean, per-sample list) of ``obj`` on the images (a Reward Mix: its raw weighted mean)."""
    obj.check_prompts(images.shape[0], prompts)
    if isinstance(obj, RewardMix):
        mix = obj.score_parts(images, prompts, torch.arange(images.shape[0]), run=run_reward)
        return mix.raw_weighted_mean(), []
    v = run_reward(obj, images, prompts).double()
    if not torch.isfinite(v).all():
        raise ValueError(f"reward {obj.name!r} returned NaN or inf on the held-out samples")
    return float(v.mean()), [float(x) for x in v]


def sample_heldout(session, conds, shape, sigmas, eta, cfg, samples_per_prompt, seed, flow_rule="constant"):
    """Final latents (B, *shape) of every held-out prompt and the KL of the policy to the base model
    (per latent element, summed over the stochastic steps, averaged over samples)."""
    model = session.model
    fam = session.family
    ms = model.get_model_object("model_sampling")
    sig = torch.as_tensor(sigmas).detach().double().cpu()
    plan = make_plan(fam, sig, eta, "native", flow_rule)
    n = int(samples_per_prompt)
    sigma0 = float(sig[0])
    max_denoise = math.isclose(float(ms.sigma_max), sigma0, rel_tol=1e-5) or sigma0 > float(ms.sigma_max)
    pbar = comfy.utils.ProgressBar(len(conds) * plan.num_steps)
    finals, kls = [], []
    for p, (pos, neg) in enumerate(conds):
        gen = torch.Generator().manual_seed(heldout_seed(seed, p))
        noise = torch.randn((n, *shape), generator=gen)
        x_init = ms.noise_scaling(torch.tensor(sigma0), noise, torch.zeros_like(noise), max_denoise)

        def fn(predict, x_init=x_init, gen=gen):
            pred, ref = policy_and_base(plan, predict, session.adapters)
            kl = KLToReference(plan, ref, n)
            x, _ = rollout(pred, plan, x_init.to(model.load_device), gen, record=False, on_step=kl,
                           callback=step_progress(pbar))
            return x, kl.kl

        with torch.no_grad():
            xf, kl = run_in_guider(model, pos, neg, cfg, (n, *shape), sig.float(), fn, seed=seed)
        xf = ms.inverse_noise_scaling(torch.tensor(float(sig[-1])), xf)
        finals.append(model.model.process_latent_out(xf.float()).cpu())
        kls.append(kl)
    return torch.cat(finals, 0), float(torch.cat(kls).mean())


def training_flow_rule(session) -> str:
    """The flow noise rule of the run's latest training rollout (the LoRA Update records it in the
    run's history); ``constant`` before the first update."""
    history = session.state.history
    return str(history[-1].get("flow_noise_rule", "constant")) if history else "constant"


_LAST: dict = {}  # run name -> latest HeldOut


def latest_heldout(run_name: str, iteration: int):
    """The latest held-out result of ``run_name`` at or before ``iteration`` as {"reward", "iteration",
    "name"}, or None (no Held-out Evaluation wired, or none run yet)."""
    last = _LAST.get(run_name)
    if last is None or last.iteration > iteration:
        return None
    return {"reward": last.reward, "iteration": last.iteration, "name": last.reward_name}


class PCPOHeldOutEvaluation:
    CATEGORY = "PCPO"
    FUNCTION = "evaluate"
    OUTPUT_NODE = True
    RETURN_TYPES = ("PCPO_HELDOUT", "IMAGE", "FLOAT")
    RETURN_NAMES = ("heldout", "images", "heldout_reward")
    OUTPUT_TOOLTIPS = ("The evaluation (for the Reward Guard and the stats).",
                       "Grid of the latest held-out samples.", "Mean training reward on the held-out samples.")
    DESCRIPTION = ("Every k iterations, samples fixed held-out prompts with fixed noise (never trained on) with the "
                   "current LoRA, scores them with the training reward and optional guard rewards, and measures the "
                   "KL to the base model. Same LoRA, same scores.")

    @classmethod
    def INPUT_TYPES(cls):
        names = R.reward_names()
        return {"required": {
            "session": ("PCPO_SESSION", {"tooltip": "The run (from PCPO LoRA)."}),
            "clip": ("CLIP", {"tooltip": "Encodes the held-out prompts."}),
            "vae": ("VAE", {"tooltip": "Decodes the held-out samples for scoring."}),
            "prompts": ("STRING", {"multiline": True, "default": DEFAULT_PROMPTS, "tooltip":
                                   "Held-out prompts, one per line (# comments); keep them out of the training "
                                   "prompts."}),
            "negative": ("STRING", {"default": "", "tooltip": "Negative prompt."}),
            "every": ("INT", {"default": 5, "min": 1, "max": 100000, "tooltip":
                              "Evaluate every this many iterations (and at iteration 1)."}),
            "samples_per_prompt": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip":
                                           "Samples per held-out prompt (each with its own fixed noise)."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200, "tooltip": "Sampling steps (as in training)."}),
            "cfg": ("FLOAT", {"default": 4.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "Guidance scale."}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 1.0, "step": 0.01, "tooltip":
                              "How much random noise each step adds; use the Trajectory Sampler's eta so "
                              "held-out images are made like the training ones. The noise itself is fixed by the seed."}),
            "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"default": "simple", "tooltip": "Sigma schedule."}),
            "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Image height."}),
            "seed": ("INT", {"default": 1234, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip":
                             "Fixes the held-out noise (use another value than the training seed)."}),
            "reward": (names, {"default": names[0], "tooltip": "The training reward (a registry name), unless "
                               "reward_model is connected."}),
            "guard_reward": ([NO_GUARD] + names, {"default": NO_GUARD, "tooltip":
                             "A second reward to watch (e.g. saturation while training for brightness)."}),
        }, "optional": {
            "stats": ("STRING", {"forceInput": True, "tooltip": "Wire the LoRA Update's stats here so the "
                                 "evaluation sees this iteration's update."}),
            "reward_model": ("PCPO_REWARD", {"tooltip": "The training reward as a PCPO_REWARD (replaces reward)."}),
            "guard_reward_model": ("PCPO_REWARD", {"tooltip": "A learned guard reward (e.g. an aesthetic score "
                                   "while training for OCR)."}),
            "guard_reward_model_2": ("PCPO_REWARD", {"tooltip": "Another learned guard reward."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, eta=None):
        """The FLOAT inputs, checked when the prompt is queued (finite and in range: see nodes/validation.py)."""
        return verdict(cls, cfg=cfg, eta=eta)

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def evaluate(self, session, clip, vae, prompts, negative, every, samples_per_prompt, steps, cfg, eta, scheduler,
                 width, height, seed, reward, guard_reward, stats=None, reward_model=None, guard_reward_model=None,
                 guard_reward_model_2=None):
        session = session.live()
        it = session.state.iteration
        last = _LAST.get(session.run_name)
        if last is not None and last.iteration > it:  # the run was resumed from an earlier checkpoint
            last = None
        due = it >= 1 and (it % int(every) == 0 or it == 1)
        if not due or (last is not None and last.iteration == it):
            session.commit_pending(by="PCPOHeldOutEvaluation")
            if last is None:
                return {"ui": {"text": [f"next held-out evaluation at iteration {(it // every + 1) * every}"]},
                        "result": (None, torch.zeros(1, 8, 8, 3), float("nan"))}
            held = HeldOut(**{**last.__dict__, "fresh": False})
            return {"ui": {"text": [f"held-out (iteration {last.iteration}): {last.reward:.4f}"]},
                    "result": (held, last.images, last.reward)}
        texts = read_prompt_lines(prompts)
        if not texts:
            raise ValueError("PCPO Held-out Evaluation: no held-out prompts: write one prompt per line")
        held = self.run(session, clip, vae, texts, negative, samples_per_prompt, steps, cfg, eta, scheduler, width,
                        height, seed, reward_object(reward, reward_model),
                        self._guards(guard_reward, guard_reward_model, guard_reward_model_2))
        _LAST[session.run_name] = held
        merge_metrics(session, held.fields())
        session.commit_pending(by="PCPOHeldOutEvaluation")  # without a guard: the iteration commits here
        grid = image_grid(held.images)
        text = (f"held-out (iteration {it}): {held.reward_name} {held.reward:.4f}"
                + "".join(f" | {k} {v:.4f}" for k, v in held.guards.items()) + f" | KL to base {held.kl_base:.3g}")
        log.info("PCPO %s: %s", session.run_name, text)
        return {"ui": {"text": [text], "images": [preview(grid, f"pcpo_heldout_{session.run_name}")]},
                "result": (held, to_image_tensor(grid), held.reward)}

    @staticmethod
    def _guards(name, *models) -> list:
        out = [] if name == NO_GUARD else [R.builtin_reward(name)]
        return out + [m for m in models if m is not None]

    @staticmethod
    def run(session, clip, vae, texts, negative, samples_per_prompt, steps, cfg, eta, scheduler, width, height,
            seed, reward_obj, guard_objs, flow_rule=None) -> HeldOut:
        """``flow_rule``: the flow noise rule (None: the one the run's training rollouts use)."""
        model = session.model
        ms = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, int(steps))
        shape = latent_shape_for(model, None, int(width), int(height))
        neg = encode_text(clip, negative)
        conds = [(encode_text(clip, t), neg) for t in texts]
        rule = training_flow_rule(session) if flow_rule is None else flow_rule
        latents, kl = sample_heldout(session, conds, shape, sigmas, float(eta), float(cfg), samples_per_prompt, seed,
                                     rule)
        images = vae.decode(latents).float().cpu()
        if images.ndim == 5:  # video VAEs: (B, T, H, W, C)
            images = images.reshape(-1, *images.shape[-3:])
        sample_prompts = [t for t in texts for _ in range(int(samples_per_prompt))]
        mean, per = mean_score(reward_obj, images, sample_prompts)
        guards = {}
        for g in guard_objs:
            label = g.name if g.name not in guards else f"{g.name}_{len(guards)}"
            guards[label] = mean_score(g, images, sample_prompts)[0]
        return HeldOut(session.run_name, session.state.iteration, True, mean, reward_obj.name, guards, kl, per,
                       texts, images)


# ------------------------------------------------------------------------------------ the guard

def guard_state(session) -> GuardState:
    """The run's guard state: in memory, else the one committed with its checkpoint (a checkpoint of
    an earlier version: ``guard.json``)."""
    gs = getattr(session, "_pcpo_guard", None)
    if gs is None:
        gs = guard_of(session.state, os.path.join(session.run_dir, GUARD_FILE))
        session._pcpo_guard = gs
    return gs


def apply_guard_lr(session) -> None:
    """Before an update: the learning rate the guard chose (``lower_lr`` scales the node's value)."""
    apply_lr(session.state, guard_state(session))


def cancel_requeue(run_name: str) -> bool:
    """Drop the pending re-queue of ``run_name`` (the loop stops after the current prompt)."""
    from . import requeue as loop
    dropped = False
    with loop._lock:
        for pid in list(loop._pending):
            markers = loop._pending[pid]["markers"]
            if markers.pop(run_name, None) is not None:
                dropped = True
            if not markers:
                loop._pending.pop(pid)
    return dropped


class PCPORewardGuard:
    CATEGORY = "PCPO"
    FUNCTION = "guard"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The guard's state and this evaluation's verdict as JSON.",)
    DESCRIPTION = ("Keeps the best LoRA by held-out reward (exported beside the latest) and, when the held-out "
                   "reward falls a margin below its best, a guard reward falls a margin below its reference, or "
                   "the KL to the base model passes a bound, rolls LoRA and optimizer state back to the best "
                   "exactly, then stops, lowers the learning rate, or continues.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": ("PCPO_SESSION", {"tooltip": "The run (from PCPO LoRA)."}),
            "heldout": ("PCPO_HELDOUT", {"tooltip": "From PCPO Held-out Evaluation."}),
            "heldout_margin": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1e6, "step": 0.005, "round": False,
                                         "tooltip": "Roll back when the held-out reward falls this much (reward "
                                         "units) below its best."}),
            "guard_margin": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1e6, "step": 0.005, "round": False,
                                       "tooltip": "Roll back when a guard reward falls this much below its highest "
                                       "value at an accepted evaluation."}),
            "kl_bound": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.01, "round": False,
                                   "tooltip": "Roll back when the KL to the base model (held-out) passes this "
                                   "(0 = no bound)."}),
            "action": (list(ACTIONS), {"default": "lower_lr", "tooltip": "After a rollback: stop the loop, lower "
                                       "the learning rate (times lr_factor, from then on), or continue."}),
            "lr_factor": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.05,
                                    "tooltip": "lower_lr multiplies the learning rate by this at each rollback, "
                                    "down to 1/64 of the node's value (then it stays there)."}),
            "best_filename": ("STRING", {"default": "pcpo/{run}_best", "tooltip":
                                         "The best LoRA is exported here (inside models/loras; {run} becomes the "
                                         "run name), beside the latest one; empty: not exported."}),
            "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16", "tooltip": "Precision of the best LoRA file."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, best_filename=None, heldout_margin=None, guard_margin=None, kl_bound=None,
                        lr_factor=None):
        """Checked when the prompt is queued (see nodes/validation.py); ComfyUI checks the others."""
        return verdict(cls, best_filename=best_filename, heldout_margin=heldout_margin, guard_margin=guard_margin,
                       kl_bound=kl_bound, lr_factor=lr_factor)

    @classmethod
    def pcpo_checks(cls, values: dict, run_name=None) -> list:
        name = values.get("best_filename")
        return [filename_error(name, "best_filename", run_name)] if isinstance(name, str) and name else []

    def guard(self, session, heldout, heldout_margin, guard_margin, kl_bound, action, lr_factor, best_filename,
              dtype):
        session = session.live()
        state = session.state
        cfg = GuardConfig(float(heldout_margin), float(guard_margin), float(kl_bound), action, float(lr_factor))
        gs = guard_state(session)
        report = {"iteration": state.iteration, "evaluated": False}
        if heldout is None or not heldout.fresh or heldout.iteration != state.iteration:
            keep_guard(state, gs)
            session.commit_pending()
            report.update(best_iteration=gs.best_iteration, best=gs.best_score, lr_scale=gs.lr_scale,
                          rollbacks=len(gs.rollbacks))
            return {"ui": {"text": [f"guard: no new evaluation (best {gs.best_score} at {gs.best_iteration})"]},
                    "result": (json.dumps(report),)}
        if heldout.run_name != session.run_name:
            raise ValueError(f"the held-out evaluation belongs to run {heldout.run_name!r}, not {session.run_name!r}")
        best_path = os.path.join(session.run_dir, BEST_FILE)
        # one verdict for the run: with several processes rank 0 decides and every rank applies it
        verdict = decide(cfg, gs, state.iteration, heldout.reward, heldout.guards, heldout.kl_base, best_path)

        def export_best():
            from .export import PCPOExportLoRA
            return PCPOExportLoRA().export(session, best_filename, dtype)["result"][0]

        outcome = apply_verdict(state, gs, cfg, verdict, heldout.reward, best_path, session.run_name,
                                export_best=export_best if best_filename else None,
                                stop_loop=lambda: cancel_requeue(session.run_name))
        lines, fields = outcome.lines, outcome.fields
        if verdict.tripped:
            for ln in lines:
                log.warning("PCPO %s: %s", session.run_name, ln)
        merge_metrics(session, fields)
        # one commit: the guard state, the rolled-back LoRA and this iteration's metrics record go into
        # the run checkpoint together (a new best or a rollback always commits; guard.json follows)
        keep_guard(state, gs)
        session.commit_pending(force=verdict.new_best or verdict.tripped)
        report.update(evaluated=True, tripped=verdict.tripped, reasons=verdict.reasons, new_best=verdict.new_best,
                      best_iteration=gs.best_iteration, best=gs.best_score, lr_scale=gs.lr_scale,
                      rollbacks=len(gs.rollbacks), rollback=fields.get("rollback"))
        text = lines or [f"guard: ok (best {gs.best_score:.4f} at iteration {gs.best_iteration})"]
        return {"ui": {"text": text}, "result": (json.dumps(report),)}


NODE_CLASS_MAPPINGS = {"PCPOHeldOutEvaluation": PCPOHeldOutEvaluation, "PCPORewardGuard": PCPORewardGuard}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOHeldOutEvaluation": "PCPO Held-out Evaluation",
                              "PCPORewardGuard": "PCPO Reward Guard"}
