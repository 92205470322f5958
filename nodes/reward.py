"""PCPO Reward Scorer: IMAGE (+ prompts) -> one reward per sample, from the reward registry or a
PCPO_REWARD (a loader node or the Reward Mix)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from comfyui_pcpo import rewards as R
from comfyui_pcpo.rewards.base import RewardMix

from .reward_models import run_reward


@dataclass
class Rewards:
    values: torch.Tensor  # (B,) float64
    name: str
    trajectory_uid: str
    # a mix's components: label -> mean raw reward of this batch (before normalisation and weighting)
    components: dict = field(default_factory=dict)
    # human ratings (PCPO Human Rating): {"rated_groups", "groups", "model_reward", "model_reward_name"},
    # the model reward being the mean over the rated groups' images (None without a model reward)
    human: dict | None = None
    # the ids of the rating requests (ratings.jsonl) these rewards come from (PCPO Human Rating)
    rating_requests: tuple = ()


def check_images(images, trajectory) -> None:
    """What can be checked of the decoded images against the rollout they should come from: one image
    per sample, and the latent's shape scaled by one whole factor (the VAE's) on both sides."""
    B = trajectory.traj.batch_size
    hint = ("decode the Trajectory Sampler's latent output directly with the model's VAE, without batching, "
            "selecting, cropping or resizing images")
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be an IMAGE batch (B, H, W, C); got shape {tuple(images.shape)}")
    if images.shape[0] != B:
        raise ValueError(f"got {images.shape[0]} images for a trajectory of {B} samples: {hint}")
    h, w = trajectory.latent_shape[-2:]
    H, W = images.shape[1:3]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"images of {H}x{W} pixels do not come from latents of {h}x{w}: every side must be the "
                         f"latent's times the VAE's scale factor: {hint}")


class PCPORewardScorer:
    CATEGORY = "PCPO"
    FUNCTION = "score"
    RETURN_TYPES = ("PCPO_REWARDS", "FLOAT")
    RETURN_NAMES = ("rewards", "reward_mean")
    OUTPUT_TOOLTIPS = ("Per-sample rewards for the PCPO LoRA Update.", "Mean reward of this batch.")
    DESCRIPTION = ("Scores the decoded samples of a rollout (higher is better) with a reward from the list, or with the "
                   "PCPO_REWARD connected to reward_model. For a Reward Mix the rewards are the group-normalised "
                   "weighted sum, and reward_mean is the weighted sum of the components' raw means.")

    @classmethod
    def INPUT_TYPES(cls):
        names = R.reward_names()
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The rollout's final samples, decoded with VAE Decode (same order)."}),
            "trajectory": ("PCPO_TRAJECTORY", {"tooltip": "The rollout these images come from (gives the prompts)."}),
            "reward": (names, {"default": names[0], "tooltip": "; ".join(f"{n}: {R.get_reward(n).description}" for n in names)}),
        }, "optional": {
            "prompt": ("STRING", {"default": "", "tooltip": "Single-prompt runs with plain CONDITIONING: the prompt "
                                  "text, for rewards that read the prompt."}),
            "reward_model": ("PCPO_REWARD", {"tooltip": "A learned reward (aesthetic, PickScore, HPSv2.1, ImageReward, "
                             "CLIP score, OCR) or a PCPO Reward Mix; when connected it replaces the reward list."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def score(self, images, trajectory, reward, prompt="", reward_model=None):
        check_images(images, trajectory)
        prompts = [p if p else prompt for p in trajectory.prompts]
        if not prompts:
            prompts = [prompt] * images.shape[0]
        obj = reward_model if reward_model is not None else R.builtin_reward(reward)
        obj.check_prompts(images.shape[0], prompts)
        images = images.detach().cpu()
        components = {}
        if isinstance(obj, RewardMix):
            mix = obj.score_parts(images, prompts, trajectory.traj.group_ids, run=run_reward)
            values, components, mean = mix.values, mix.component_means(), mix.raw_weighted_mean()
        else:
            values = run_reward(obj, images, prompts)
            mean = float(values.mean())
        if not torch.isfinite(values).all():
            raise ValueError(f"reward {obj.name!r} returned NaN or inf")
        return (Rewards(values, obj.name, trajectory.uid, components), mean)


NODE_CLASS_MAPPINGS = {"PCPORewardScorer": PCPORewardScorer}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPORewardScorer": "PCPO Reward Scorer"}
