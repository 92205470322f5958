"""Reward loader nodes (PCPO_REWARD objects), the Reward Mix, and scoring through ComfyUI's model management.

Files come from ComfyUI model folders: ``models/pcpo_rewards`` (registered here), and for Hugging Face
CLIP folders also ``models/clip`` and ``models/clip_vision``.  A learned reward's weights are wrapped
in a ``ModelPatcher``: loaded to ComfyUI's torch device with ``load_models_gpu`` just before scoring
and, unless ``keep_loaded`` is on, unloaded right after, so they never sit next to a training run.
"""
from __future__ import annotations

import os

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from comfyui_pcpo import rewards as R
from comfyui_pcpo.rewards.base import RewardMix

from .validation import verdict

FOLDER = "pcpo_rewards"
HF_FOLDERS = (FOLDER, "clip", "clip_vision")
WEIGHT_EXTS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
NONE = "(none)"


def register_folder() -> None:
    """``models/pcpo_rewards`` for reward weights (kept if extra_model_paths.yaml already names it)."""
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    exts = set(folder_paths.supported_pt_extensions) | {".pth", ".bin"}
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], exts)
    elif not entry[1]:
        folder_paths.folder_names_and_paths[FOLDER] = (entry[0], exts)


register_folder()


def _in_hf_model_folder(name: str, roots: list, seen: dict) -> bool:
    """True when the file ``name`` (relative to one of ``roots``) lies inside a Hugging Face model folder: a
    folder below the root, or one of its parents up to the root, with a ``config.json``."""
    parts = name.replace("\\", "/").split("/")
    for root in roots:
        if not os.path.isfile(os.path.join(root, *parts)):
            continue
        for i in range(1, len(parts)):
            d = os.path.join(root, *parts[:i])
            if d not in seen:
                seen[d] = os.path.isfile(os.path.join(d, "config.json"))
            if seen[d]:
                return True
        return False
    return False


def weight_files() -> list:
    """The weight files in models/pcpo_rewards (and its subfolders) offered as heads/checkpoints, without those
    inside a Hugging Face model folder (e.g. ``PickScore_v1/model.safetensors``: that folder is picked whole)."""
    roots, seen = folder_paths.get_folder_paths(FOLDER), {}
    return [f for f in folder_paths.get_filename_list(FOLDER)
            if f.lower().endswith(WEIGHT_EXTS) and not _in_hf_model_folder(f, roots, seen)] or [NONE]


def _unknown(name: str) -> bool:
    """True when ComfyUI has no folder ``name`` ("clip" is "text_encoders" on newer versions)."""
    legacy = getattr(folder_paths, "map_legacy", lambda n: n)
    return legacy(name) not in folder_paths.folder_names_and_paths


def hf_clip_folders() -> list:
    """``<model folder>/<relative path>`` of every Hugging Face CLIP folder (config.json with model_type
    clip) up to three levels below the pcpo_rewards, clip and clip_vision folders."""
    from comfyui_pcpo.rewards.clip_models import is_hf_clip_folder
    out = []
    for name in HF_FOLDERS:
        if _unknown(name):
            continue
        for root in folder_paths.get_folder_paths(name):
            if not os.path.isdir(root):
                continue
            for dirpath, dirnames, _ in os.walk(root, followlinks=True):
                rel = os.path.relpath(dirpath, root)
                depth = 0 if rel == "." else rel.count(os.sep) + 1
                if depth >= 3:
                    dirnames[:] = []
                if depth and is_hf_clip_folder(dirpath):
                    out.append(f"{name}/{rel.replace(os.sep, '/')}")
                    dirnames[:] = []
    return sorted(set(out)) or [NONE]


def _where(kind: str, expected: str, source: str) -> str:
    roots = folder_paths.get_folder_paths(FOLDER)
    return (f"{kind}: put {expected} into ComfyUI's models/{FOLDER} folder ({', '.join(roots)}); get it from "
            f"{source}. ")


def resolve_file(name: str, kind: str, expected: str, source: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name) if name and name != NONE else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(_where(kind, expected, source) + f"{name!r} was not found")
    return path


def resolve_hf_folder(name: str, kind: str, source: str) -> str:
    if name and name != NONE and "/" in name:
        folder_name, rel = name.split("/", 1)
        if folder_name in HF_FOLDERS and ".." not in rel.split("/") and not _unknown(folder_name):
            for root in folder_paths.get_folder_paths(folder_name):
                path = os.path.join(root, *rel.split("/"))
                if os.path.isdir(path):
                    return path
    raise FileNotFoundError(f"{kind}: put the Hugging Face folder of {source} (config.json, model.safetensors and the "
                            f"tokenizer/preprocessor files) into models/{FOLDER} or models/clip; {name!r} was not found")


def compute_dtype(precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    dev = mm.get_torch_device()
    if dev.type == "cpu" or not mm.should_use_fp16(dev, prioritize_performance=True):
        return torch.float32
    return torch.float16


def manage(reward, keep_loaded: bool = False):
    """Attach a ModelPatcher over the reward's weights so ComfyUI loads, evicts and frees them."""
    if getattr(reward, "module", None) is not None:
        holder = torch.nn.Module()  # ModelPatcher sets attributes (device, ...) that HF models define as properties
        holder.add_module("weights", reward.module)
        reward.patcher = comfy.model_patcher.ModelPatcher(holder, load_device=mm.get_torch_device(),
                                                          offload_device=mm.unet_offload_device())
    reward.keep_loaded = bool(keep_loaded)
    return reward


def release(patcher) -> None:
    """Unload ``patcher``'s weights to the offload device and drop it from ComfyUI's loaded models."""
    models = mm.current_loaded_models
    for i in reversed(range(len(models))):
        if models[i].model is patcher and models[i].model_unload():
            models.pop(i)
    mm.soft_empty_cache()


def run_reward(reward, images, prompts):
    """Score with ``reward``: weights on ComfyUI's device for the call, given back after."""
    patcher = getattr(reward, "patcher", None)
    if patcher is not None:
        mm.load_models_gpu([patcher], force_full_load=True)
    try:
        return reward.score(images, prompts)
    finally:
        if patcher is not None and not getattr(reward, "keep_loaded", False):
            release(patcher)


# --------------------------------------------------------------------------- loader nodes

def _common(required: dict, convention=None) -> dict:
    req = dict(required)
    if convention is not None:
        names = list(convention)
        req["convention"] = (names, {"default": names[0], "tooltip": "Score scale of the code base you compare "
                                     "against: " + "; ".join(names)})
    req["precision"] = (PRECISIONS, {"default": "auto", "tooltip": "auto: fp16 on a GPU that supports it, fp32 "
                                     "otherwise (heads always run in fp32)."})
    req["batch_size"] = ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Images per forward pass."})
    req["keep_loaded"] = ("BOOLEAN", {"default": False, "tooltip": "Keep the weights on the GPU between iterations "
                                      "(off: given back to ComfyUI after every scoring; on: ComfyUI still evicts "
                                      "them when it needs the memory)."})
    return {"required": req}


class _Loader:
    CATEGORY = "PCPO/rewards"
    FUNCTION = "load"
    RETURN_TYPES = ("PCPO_REWARD",)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("A reward for the PCPO Reward Scorer or the PCPO Reward Mix.",)


class PCPOAestheticReward(_Loader):
    DESCRIPTION = ("LAION improved aesthetic predictor v2 (the DDPO / Flow-GRPO aesthetic reward): an MLP on the "
                   "normalised CLIP ViT-L/14 image embedding. Score as in DDPO: the raw MLP output, about 1-10.")

    @classmethod
    def INPUT_TYPES(cls):
        from comfyui_pcpo.rewards.clip_models import AESTHETIC_FILE
        t = _common({
            "head": (weight_files(), {"tooltip": f"{AESTHETIC_FILE} (as published) in models/{FOLDER}."}),
            "backbone": ([NONE] + [f for f in hf_clip_folders() if f != NONE], {"tooltip":
                         "HF folder of openai/clip-vit-large-patch14 (in models/pcpo_rewards or models/clip); or "
                         "(none) and connect a CLIP_VISION of the OpenAI ViT-L/14."}),
        })
        t["optional"] = {"clip_vision": ("CLIP_VISION", {"tooltip": "OpenAI CLIP ViT-L/14 vision model (Load CLIP "
                                         "Vision); used when backbone is (none)."})}
        return t

    def load(self, head, backbone, precision, batch_size, keep_loaded, clip_vision=None):
        from comfyui_pcpo.rewards import clip_models as C
        head_path = resolve_file(head, "aesthetic head", C.AESTHETIC_FILE, C.AESTHETIC_URL)
        mlp = C.load_aesthetic_head(head_path)
        if backbone and backbone != NONE:
            folder = resolve_hf_folder(backbone, "aesthetic backbone", "openai/clip-vit-large-patch14")
            bb = C.load_hf_clip(folder, compute_dtype(precision), vision_only=True, where="aesthetic backbone: ")
            reward = C.AestheticReward(mlp, backbone=bb, image=C.image_settings(folder), batch_size=batch_size)
        elif clip_vision is not None:
            reward = C.AestheticReward(mlp, embed=lambda im: clip_vision.encode_image(im.cpu()).image_embeds,
                                       batch_size=batch_size)
        else:
            raise ValueError("aesthetic reward: pick an HF CLIP ViT-L/14 folder as backbone, or connect a CLIP_VISION "
                             "(OpenAI ViT-L/14) to clip_vision")
        return (manage(reward, keep_loaded),)


def _clip_alignment(model, convention, precision, batch_size, keep_loaded, kind, source, conventions, name, desc):
    from comfyui_pcpo.rewards import clip_models as C
    folder = resolve_hf_folder(model, kind, source)
    where = f"{kind}: "
    clip = C.load_hf_clip(folder, compute_dtype(precision), where=where)
    reward = C.ClipAlignmentReward(clip, C.load_clip_tokenizer(folder, where), conventions[convention],
                                   C.image_settings(folder), name, desc, batch_size)
    return (manage(reward, keep_loaded),)


class PCPOPickScoreReward(_Loader):
    DESCRIPTION = "PickScore v1: human preference from a CLIP ViT-H/14 fine-tuned on Pick-a-Pic (reads the prompt)."

    @classmethod
    def INPUT_TYPES(cls):
        from comfyui_pcpo.rewards.clip_models import PICKSCORE_CONVENTIONS
        return _common({"model": (hf_clip_folders(), {"tooltip": "HF folder of yuvalkirstain/PickScore_v1 (with the "
                        "tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."})}, PICKSCORE_CONVENTIONS)

    def load(self, model, convention, precision, batch_size, keep_loaded):
        from comfyui_pcpo.rewards.clip_models import PICKSCORE_CONVENTIONS
        return _clip_alignment(model, convention, precision, batch_size, keep_loaded, "PickScore",
                               "yuvalkirstain/PickScore_v1", PICKSCORE_CONVENTIONS, "pickscore",
                               f"PickScore v1, {convention}")


class PCPOCLIPScoreReward(_Loader):
    DESCRIPTION = "CLIP score: prompt-image cosine of any CLIP model (reads the prompt)."

    @classmethod
    def INPUT_TYPES(cls):
        from comfyui_pcpo.rewards.clip_models import CLIPSCORE_CONVENTIONS
        return _common({"model": (hf_clip_folders(), {"tooltip": "Any HF CLIP folder, e.g. "
                        "openai/clip-vit-large-patch14."})}, CLIPSCORE_CONVENTIONS)

    def load(self, model, convention, precision, batch_size, keep_loaded):
        from comfyui_pcpo.rewards.clip_models import CLIPSCORE_CONVENTIONS
        return _clip_alignment(model, convention, precision, batch_size, keep_loaded, "CLIP score",
                               "a CLIP model, e.g. openai/clip-vit-large-patch14", CLIPSCORE_CONVENTIONS,
                               "clip-score", f"CLIP score, {convention}")


class PCPOHPSReward(_Loader):
    DESCRIPTION = ("HPSv2.1 human preference (open_clip ViT-H-14): cosine of image and prompt embeddings, no scale, "
                   "as in HPSv2 / DanceGRPO / Flow-GRPO (about 0.2-0.35). Needs pip install open_clip_torch.")

    @classmethod
    def INPUT_TYPES(cls):
        return _common({
            "checkpoint": (weight_files(), {"tooltip": f"HPS_v2.1_compressed.pt (as published) in models/{FOLDER}."}),
            "architecture": (["ViT-H-14"], {"tooltip": "open_clip architecture of the checkpoint."}),
        })

    def load(self, checkpoint, architecture, precision, batch_size, keep_loaded):
        from comfyui_pcpo.rewards import hps
        path = resolve_file(checkpoint, "HPSv2.1", hps.HPS_FILE, hps.HPS_URL)
        model, tok, size, mean, std = hps.load_hps(path, architecture, compute_dtype(precision), where="HPSv2.1: ")
        return (manage(hps.HPSReward(model, tok, size, mean, std, batch_size), keep_loaded),)


class PCPOImageRewardReward(_Loader):
    DESCRIPTION = ("ImageReward v1.0 (BLIP + MLP), standardised as in the ImageReward package (mean 0, std 1 on "
                   "its data). Needs med_config.json and a bert-base-uncased/ tokenizer folder beside the checkpoint.")

    @classmethod
    def INPUT_TYPES(cls):
        return _common({"checkpoint": (weight_files(), {"tooltip": "ImageReward.pt in models/pcpo_rewards (or a "
                        "subfolder), with med_config.json and bert-base-uncased/vocab.txt beside it."})})

    def load(self, checkpoint, precision, batch_size, keep_loaded):
        from comfyui_pcpo.rewards import imagereward as IR
        path = resolve_file(checkpoint, "ImageReward", IR.IR_FILE, IR.IR_URL)
        model, tok = IR.load_imagereward(path, compute_dtype(precision), where="ImageReward: ")
        return (manage(IR.ImageRewardReward(model, tok, batch_size), keep_loaded),)


class PCPOOCRReward(_Loader):
    DESCRIPTION = ("OCR text accuracy (Flow-GRPO): 1 - edit distance / length between the prompt's text in double "
                   "quotes and what RapidOCR reads (PP-OCR weights inside the rapidocr wheel, CPU). "
                   "Needs pip install rapidocr onnxruntime.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"threads": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                                                 "onnxruntime CPU threads (0: its default)."})}}

    def load(self, threads):
        from comfyui_pcpo.rewards.ocr import OCRReward, make_engine
        return (manage(OCRReward(make_engine(threads), threads)),)


class PCPOBuiltinReward(_Loader):
    DESCRIPTION = "A weight-free reward of the registry (JPEG size, brightness, ...) as a PCPO_REWARD, e.g. for a mix."

    @classmethod
    def INPUT_TYPES(cls):
        names = R.reward_names()
        return {"required": {"reward": (names, {"default": names[0], "tooltip": "; ".join(
            f"{n}: {R.get_reward(n).description}" for n in names)})}}

    def load(self, reward):
        return (manage(R.builtin_reward(reward)),)


MIX_SLOTS = 4


class PCPORewardMix:
    CATEGORY = "PCPO/rewards"
    FUNCTION = "mix"
    RETURN_TYPES = ("PCPO_REWARD",)
    RETURN_NAMES = ("reward",)
    OUTPUT_TOOLTIPS = ("The weighted mix, for the PCPO Reward Scorer.",)
    DESCRIPTION = ("Weighted sum of rewards, each normalised within its group (samples sharing a prompt and noise) "
                   "before weighting, so no reward's scale drowns another. The scorer reports every component's mean.")

    @classmethod
    def INPUT_TYPES(cls):
        opt = {}
        for i in range(1, MIX_SLOTS + 1):
            opt[f"reward_{i}"] = ("PCPO_REWARD", {"tooltip": f"Component {i}."})
            opt[f"weight_{i}"] = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05,
                                            "tooltip": f"Weight of component {i} (0 leaves it out)."})
        return {"required": {}, "optional": opt}

    @classmethod
    def VALIDATE_INPUTS(cls, weight_1=None, weight_2=None, weight_3=None, weight_4=None):
        """The weights, checked when the prompt is queued (finite and in range: see nodes/validation.py)."""
        return verdict(cls, weight_1=weight_1, weight_2=weight_2, weight_3=weight_3, weight_4=weight_4)

    def mix(self, **kw):
        parts = [(kw.get(f"reward_{i}"), kw.get(f"weight_{i}", 1.0)) for i in range(1, MIX_SLOTS + 1)]
        return (RewardMix(parts),)


NODE_CLASS_MAPPINGS = {
    "PCPOAestheticReward": PCPOAestheticReward,
    "PCPOPickScoreReward": PCPOPickScoreReward,
    "PCPOHPSReward": PCPOHPSReward,
    "PCPOImageRewardReward": PCPOImageRewardReward,
    "PCPOCLIPScoreReward": PCPOCLIPScoreReward,
    "PCPOOCRReward": PCPOOCRReward,
    "PCPOBuiltinReward": PCPOBuiltinReward,
    "PCPORewardMix": PCPORewardMix,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PCPOAestheticReward": "PCPO Aesthetic Reward (LAION v2)",
    "PCPOPickScoreReward": "PCPO PickScore Reward",
    "PCPOHPSReward": "PCPO HPSv2.1 Reward",
    "PCPOImageRewardReward": "PCPO ImageReward Reward",
    "PCPOCLIPScoreReward": "PCPO CLIP Score Reward",
    "PCPOOCRReward": "PCPO OCR Reward",
    "PCPOBuiltinReward": "PCPO Built-in Reward",
    "PCPORewardMix": "PCPO Reward Mix",
}
