"""PCPO Human Rating: the person at the ComfyUI page is the reward.

When the node runs it issues a rating request (its images, group by group with the prompt) to the
page through the pack's web extension (``web/pcpo.js``) and the routes of ``nodes/human_routes.py``,
and waits for the answer with a countdown on the node's progress bar, a timeout, and Cancel.  Groups
the person did not rate (or all groups after a timeout) are completed by a model reward or skipped
(zero advantage); in mixed mode only ``human_groups`` groups per iteration are shown at all.  Every
rating is appended to ``output/pcpo/<run>/ratings.jsonl`` with the ids of its images, whose PNGs are
kept beside it in ``rated/``; once the update that trained on it is committed with the run
checkpoint, a trained mark naming its request follows (``comfyui_pcpo.ratings.trained_ratings``).
"""
from __future__ import annotations

import io
import logging
import os
import time

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils

from comfyui_pcpo import ratings as H
from comfyui_pcpo import rewards as R

from . import human_routes
from .reward import PCPORewardScorer, Rewards, check_images
from .session import run_dir_for

log = logging.getLogger("comfyui-pcpo")

UNRATED = ("model reward", "skip")
POLL_S = 0.1


def to_png(image: torch.Tensor) -> bytes:
    arr = (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def wait_for_rating(req: H.RatingRequest, node_id=None, clock=time.monotonic) -> str:
    """Block until the page answers ``req``, it times out, or the run is cancelled (raises the
    host's interrupt).  Returns "rated" or "timeout".  The timeout closes the request first
    (:meth:`RatingRequest.expire`): a rating accepted before is used, one after is refused."""
    total = max(1, int(round(req.timeout_s)))
    pbar = comfy.utils.ProgressBar(total, node_id=node_id) if node_id is not None else comfy.utils.ProgressBar(total)
    start = clock()
    last = -1
    while not req.done.wait(POLL_S):
        comfy.model_management.throw_exception_if_processing_interrupted()
        elapsed = clock() - start
        if elapsed >= req.timeout_s:
            if req.expire() == "timeout":
                return "timeout"
            break  # answered (or cancelled) just before the timeout
        if int(elapsed) != last:
            last = int(elapsed)
            pbar.update_absolute(min(last, total), total)
    if req.state == "cancelled":
        raise comfy.model_management.InterruptProcessingException()
    pbar.update_absolute(total, total)
    return "rated"


class PCPOHumanRating:
    CATEGORY = "PCPO"
    FUNCTION = "rate"
    RETURN_TYPES = ("PCPO_REWARDS", "FLOAT")
    RETURN_NAMES = ("rewards", "reward_mean")
    OUTPUT_TOOLTIPS = ("Per-sample rewards for the PCPO LoRA Update (from your ratings).",
                       "Mean reward of this batch (on the calibrated scale).")
    DESCRIPTION = ("You are the reward: the page shows this rollout's images group by group (one prompt each) and "
                   "you pick the best and the worst image, or score each from 1 to 5 (keys: see the panel). Groups "
                   "you do not rate are scored by a model reward or skipped. Ratings are appended to "
                   "output/pcpo/RUN_NAME/ratings.jsonl.")

    @classmethod
    def INPUT_TYPES(cls):
        names = R.reward_names()
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The rollout's final samples, decoded with VAE Decode (same order)."}),
            "trajectory": ("PCPO_TRAJECTORY", {"tooltip": "The rollout these images come from (gives the groups "
                           "and prompts)."}),
            "mode": (list(H.MODES), {"default": "best-worst", "tooltip":
                     "best-worst: click the best image, shift-click (or right-click) the worst; fastest, about 10 s "
                     "a group. score: give every image 1-5 (keys 1-5 score the highlighted image)."}),
            "human_groups": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip":
                             "How many groups per iteration you rate (0 = all). The other groups are scored by "
                             "the model reward: mixed mode, for when you cannot rate everything."}),
            "unrated": (list(UNRATED), {"default": "model reward", "tooltip":
                        "Groups left unrated (skipped in the panel, or after the timeout): score them with the model "
                        "reward (reward_model if connected, else the reward below), or skip them (they teach "
                        "nothing this iteration)."}),
            "calibration": (list(H.CALIBRATIONS), {"default": "rank", "tooltip":
                            "rank: every group's rewards, yours and the model's, become ranks within the group "
                            "from -1 (worst) to +1 (best), so both share one scale (recommended for mixed mode). "
                            "none: your ratings as -1..+1 and the model's raw scores."}),
            "timeout_s": ("INT", {"default": 900, "min": 5, "max": 86400, "tooltip":
                          "Seconds to wait for your rating; then the unrated rule applies to every group."}),
            "reward": (names, {"default": names[0], "tooltip": "Model reward for unrated groups when no "
                       "reward_model is connected."}),
        }, "optional": {
            "prompt": ("STRING", {"default": "", "tooltip": "Single-prompt runs with plain CONDITIONING: the prompt "
                                  "text shown with the images (and read by prompt-based rewards)."}),
            "reward_model": ("PCPO_REWARD", {"tooltip": "A learned reward or a Reward Mix for the unrated groups "
                             "(replaces the reward list)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def rate(self, images, trajectory, mode, human_groups, unrated, calibration, timeout_s, reward, prompt="",
             reward_model=None, unique_id=None):
        check_images(images, trajectory)
        if mode not in H.MODES or unrated not in UNRATED or calibration not in H.CALIBRATIONS:
            raise ValueError(f"mode must be one of {H.MODES}, unrated one of {UNRATED}, calibration one of "
                             f"{H.CALIBRATIONS}")
        run, it = trajectory.run_name, int(trajectory.iteration)
        group_ids = [int(g) for g in trajectory.traj.group_ids.tolist()]
        prompts = [p if p else prompt for p in trajectory.prompts] or [prompt] * len(group_ids)
        order = list(dict.fromkeys(group_ids))
        shown = order if int(human_groups) == 0 else order[:int(human_groups)]
        pngs = [to_png(img) for img in images]
        ids = [H.image_id(run, it, i, png) for i, png in enumerate(pngs)]
        groups = [{"group": g, "prompt": prompts[group_ids.index(g)],
                   "images": [ids[i] for i, gi in enumerate(group_ids) if gi == g]} for g in shown]
        req = H.RatingRequest(run_name=run, iteration=it, mode=mode, groups=groups, timeout_s=float(timeout_s),
                              total_groups=len(order))
        req.images = {ids[i]: pngs[i] for i, gi in enumerate(group_ids) if gi in shown}
        if not human_routes.register_with_server():
            status = "no-page"  # headless (no ComfyUI server, e.g. tools/run_demo.py): nobody can rate
            log.warning("PCPO Human Rating: no ComfyUI server to show the images on; unrated groups: %s", unrated)
        else:
            human_routes.issue(req)
            try:
                status = wait_for_rating(req, unique_id)
            finally:
                human_routes.retire(req)
        rated = req.result or {}
        if status == "timeout":
            log.warning("PCPO Human Rating: no rating within %d s; unrated groups: %s", timeout_s, unrated)
        model_values = model_name = None
        # the model reward scores the unrated groups and, for every rated one, tracks whether the
        # rated images get better (human ratings are relative within a group)
        if unrated == "model reward" or reward_model is not None:
            scored, _ = PCPORewardScorer().score(images, trajectory, reward, prompt, reward_model)
            model_values = scored.values.tolist()
            model_name = scored.name
        values, sources = H.combine(group_ids, ids, rated,
                                    model_values if unrated == "model reward" else None, calibration)
        self._record(run, it, req, status, calibration, group_ids, ids, prompts, values, sources, pngs,
                     model_values if unrated == "model reward" else None)
        name = "human" + (f"+{model_name}" if model_values is not None and "model" in sources else "")
        t = torch.tensor(values, dtype=torch.float64)
        log.info("PCPO Human Rating %s iter %d: %s", run, it + 1,
                 ", ".join(f"group {g}: {s}" for g, s in zip(order, sources)))
        counts = {s: sources.count(s) for s in ("human", "model", "skipped")}
        text = (f"iter {it + 1}: {counts['human']} group(s) rated, {counts['model']} by the model, "
                f"{counts['skipped']} skipped ({status})")
        tracking = {"rated_groups": counts["human"], "groups": len(order), "model_reward_name": model_name,
                    "model_reward": H.rated_model_reward(group_ids, sources, model_values)}
        rewards = Rewards(t, name, trajectory.uid, human=tracking, rating_requests=(req.request_id,))
        return {"ui": {"text": [text]}, "result": (rewards, float(t.mean()))}

    @staticmethod
    def _record(run, it, req, status, calibration, group_ids, ids, prompts, values, sources, pngs, model_values):
        run_dir = run_dir_for(run)
        rated_dir = os.path.join(run_dir, "rated")
        os.makedirs(rated_dir, exist_ok=True)
        groups = []
        for g, src in zip(dict.fromkeys(group_ids), sources):
            idx = [i for i, gi in enumerate(group_ids) if gi == g]
            entry = {"group": g, "prompt": prompts[idx[0]], "images": [ids[i] for i in idx], "source": src,
                     "rewards": [values[i] for i in idx]}
            if src == "human":
                entry["rating"] = req.result[g]
                for i in idx:
                    path = os.path.join(rated_dir, f"{ids[i]}.png")  # ids are hex digests made here
                    if not os.path.exists(path):
                        with open(path, "wb") as f:
                            f.write(pngs[i])
            elif src == "model":
                entry["model_rewards"] = [H.finite(float(model_values[i])) for i in idx]
            groups.append(entry)
        H.append_jsonl(os.path.join(run_dir, "ratings.jsonl"), {
            "request_id": req.request_id, "run": run, "iteration": it + 1, "time": time.time(), "mode": req.mode,
            "calibration": calibration, "status": status, "groups": groups})


NODE_CLASS_MAPPINGS = {"PCPOHumanRating": PCPOHumanRating}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOHumanRating": "PCPO Human Rating"}
