"""CLIP-based learned rewards: LAION aesthetic predictor v2, PickScore v1, CLIP score.

Backbones are Hugging Face CLIP folders (``config.json`` + weights + tokenizer files) read with
transformers, which the host (ComfyUI) already requires; it is imported only when a model loads.
Facts and sources for every formula: ``shared/spec/rewards.md`` sections 1, 2 and 5.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import torch

from .base import ModelReward
from .preprocess import OPENAI_MEAN, OPENAI_STD, check_keys, clip_preprocess, read_state_dict

# ----------------------------------------------------------------------------- aesthetic head

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor (file "
                 f"{AESTHETIC_FILE}, 3.7 MB)")
HEAD_DIMS = (1024, 128, 64, 16, 1)


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP: Linear layers at ``layers.{0,2,4,6,7}``, dropouts between,
    no activations.  ImageReward uses the same head (at ``mlp.layers.*``) on 768-d BLIP text features."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        d = (in_dim,) + HEAD_DIMS
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d[0], d[1]), torch.nn.Dropout(0.2),
            torch.nn.Linear(d[1], d[2]), torch.nn.Dropout(0.2),
            torch.nn.Linear(d[2], d[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(d[3], d[4]),
            torch.nn.Linear(d[4], d[5]),
        )

    def forward(self, x):
        return self.layers(x)

    @staticmethod
    def expected_shapes(in_dim: int = 768, prefix: str = "") -> dict:
        d = (in_dim,) + HEAD_DIMS
        out = {}
        for i, idx in enumerate((0, 2, 4, 6, 7)):
            out[f"{prefix}layers.{idx}.weight"] = (d[i + 1], d[i])
            out[f"{prefix}layers.{idx}.bias"] = (d[i + 1],)
        return out


V1_URL = "https://github.com/LAION-AI/aesthetic-predictor"
RELU_KEYS = frozenset(f"layers.{i}.{p}" for i in (0, 3, 6, 9, 11) for p in ("weight", "bias"))


def other_aesthetic_head(sd: dict) -> Optional[str]:
    """What ``sd`` is when it is another published LAION aesthetic head rather than the v2 linear MLP (None
    otherwise).  The key sets tell them apart: v1 is one ``Linear(768, 1)`` (``weight``, ``bias``); the ReLU
    variant of improved-aesthetic-predictor has ReLUs between its Linears, which moves them to
    ``layers.{0,3,6,9,11}`` (the v2 linear head: ``layers.{0,2,4,6,7}``)."""
    keys = set(sd)
    w = sd.get("weight")
    if keys == {"weight", "bias"} and torch.is_tensor(w) and w.ndim == 2 and w.shape[0] == 1:
        return (f"LAION's aesthetic predictor v1 linear head (one Linear {w.shape[1]}->1, e.g. "
                f"sa_0_4_vit_l_14_linear.pth of {V1_URL})")
    if keys == RELU_KEYS:
        return ("the ReLU variant of the improved-aesthetic-predictor head (ReLUs between its Linears, keys "
                "layers.0/3/6/9/11, e.g. ava+logos-l14-reluMSE.pth)")
    return None


def load_aesthetic_head(path: str) -> AestheticHead:
    """The head file as published (768 inputs: CLIP ViT-L/14); the input width is read from the file.
    Another LAION aesthetic head (v1, the ReLU variant) is refused naming what it is."""
    sd = read_state_dict(path, "aesthetic head: ")
    other = other_aesthetic_head(sd)
    if other is not None:
        raise ValueError(f"aesthetic head: {path} is {other}, not the v2 MLP head this loader needs (linear, keys "
                         f"layers.0/2/4/6/7); download {AESTHETIC_FILE} from {AESTHETIC_URL}")
    w0 = sd.get("layers.0.weight")
    in_dim = int(w0.shape[1]) if w0 is not None and w0.ndim == 2 else 768
    check_keys(sd, AestheticHead.expected_shapes(in_dim), path,
               f"The aesthetic head is {AESTHETIC_FILE} from {AESTHETIC_URL}.")
    head = AestheticHead(in_dim)
    head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return head.eval()


# ----------------------------------------------------------------------------- HF CLIP folders

def is_hf_clip_folder(folder: str) -> bool:
    cfg = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("model_type") in ("clip", "clip_vision_model")
    except (OSError, ValueError):
        return False


def image_settings(folder: str) -> dict:
    """Resize/crop size and mean/std from the folder's ``preprocessor_config.json`` (CLIP defaults
    when the folder has none)."""
    out = {"size": 224, "crop": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD}
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    size, crop = cfg.get("size"), cfg.get("crop_size")
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height"))
    if isinstance(crop, dict):
        crop = crop.get("height")
    out["size"] = int(size or out["size"])
    out["crop"] = int(crop or out["size"])
    out["mean"] = tuple(cfg.get("image_mean") or out["mean"])
    out["std"] = tuple(cfg.get("image_std") or out["std"])
    return out


def load_hf_clip(folder: str, dtype: torch.dtype, vision_only: bool = False, where: str = ""):
    """``CLIPModel`` from a local HF folder, eval mode, ``dtype`` (``vision_only``: without its text tower)."""
    if not is_hf_clip_folder(folder):
        raise FileNotFoundError(f"{where}{folder} is not a Hugging Face CLIP folder (it needs config.json with "
                                "model_type 'clip' beside model.safetensors or pytorch_model.bin)")
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    if vision_only:  # drop the text tower (CLIPVisionModelWithProjection misreads projection_dim in transformers 5)
        model.text_model, model.text_projection = torch.nn.Identity(), torch.nn.Identity()
    return model.to(dtype).eval()


def load_clip_tokenizer(folder: str, where: str = ""):
    from transformers import AutoTokenizer
    for cand in (folder, os.path.join(folder, "tokenizer")):
        if any(os.path.isfile(os.path.join(cand, f)) for f in ("tokenizer.json", "vocab.json")):
            return AutoTokenizer.from_pretrained(cand, local_files_only=True)
    raise FileNotFoundError(
        f"{where}{folder} has no CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt, with "
        "tokenizer_config.json and special_tokens_map.json). Copy them from the model's Hugging Face repository "
        "(PickScore_v1 uses the tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K) into the folder or its "
        "tokenizer/ subfolder")


def features(out) -> torch.Tensor:
    """transformers < 5 returns the projected embedding; 5 returns an output object (``.pooler_output``)."""
    if torch.is_tensor(out):
        return out
    emb = getattr(out, "image_embeds", None)
    if emb is None:
        emb = getattr(out, "text_embeds", None)
    return emb if emb is not None else out.pooler_output


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- rewards

class AestheticReward(ModelReward):
    """LAION aesthetic predictor v2: ``head(e / |e|)`` with ``e`` the CLIP ViT-L/14 image embedding."""

    needs_prompt = False

    def __init__(self, head: AestheticHead, backbone: Optional[torch.nn.Module] = None,
                 embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, image: Optional[dict] = None,
                 batch_size: int = 8, name: str = "aesthetic"):
        if (backbone is None) == (embed is None):
            raise ValueError("the aesthetic reward needs exactly one backbone: an HF CLIP folder or CLIP_VISION")
        self.name, self.batch_size, self.image = name, batch_size, image or image_settings("")
        self.description = "LAION aesthetic predictor v2 (DDPO/Flow-GRPO aesthetic score, about 1-10)"
        self.embed = embed
        mods = {"head": head}
        if backbone is not None:
            dim = backbone.config.projection_dim
            if dim != head.layers[0].in_features:
                raise ValueError(f"the aesthetic head takes {head.layers[0].in_features}-d CLIP embeddings but the "
                                 f"backbone gives {dim}-d ones: use the OpenAI CLIP ViT-L/14 (768-d)")
            mods["backbone"] = backbone
        self.module = torch.nn.ModuleDict(mods)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            return self.embed(images)
        bb = self.module["backbone"]
        px = clip_preprocess(images, self.image["size"], self.image["crop"], self.image["mean"], self.image["std"])
        return features(bb.get_image_features(pixel_values=px.to(bb.dtype)))

    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The head part of the reward, which :meth:`score` ends in: (B, D) CLIP image embeddings (any norm)
        -> (B,) ``head(e / |e|)``, float32 on the head's device (grad mode: the caller's)."""
        head = self.module["head"]
        e = torch.as_tensor(embeddings)
        if e.shape[-1] != head.layers[0].in_features:
            raise ValueError(f"the CLIP vision model gives {e.shape[-1]}-d embeddings but the aesthetic head takes "
                             f"{head.layers[0].in_features}-d ones: use the OpenAI CLIP ViT-L/14 (768-d)")
        if e.ndim != 2:
            raise ValueError(f"image embeddings must be (batch, {head.layers[0].in_features}), got shape "
                             f"{tuple(e.shape)}")
        return head(l2n(e.to(head.layers[0].weight))).squeeze(1)

    def _score_batch(self, images, prompts):
        return self.score_embeddings(self.image_embeddings(images))


PICKSCORE_CONVENTIONS = {
    "pickscore (logit_scale.exp() * cos)": ("scale", 1.0),
    "flow-grpo (logit_scale.exp() * cos / 26)": ("scale", 1.0 / 26.0),
    "cosine (DanceGRPO)": ("cos", 1.0),
}
CLIPSCORE_CONVENTIONS = {
    "torchmetrics (max(100 * cos, 0))": ("100-clamp", 1.0),
    "flow-grpo (logit_scale.exp() * cos / 30)": ("scale", 1.0 / 30.0),
    "cosine": ("cos", 1.0),
}


class ClipAlignmentReward(ModelReward):
    """Prompt-image agreement of a CLIP model (PickScore v1, CLIP score): cosine of the L2-normalised
    projected embeddings, scaled by the chosen convention."""

    needs_prompt = True

    def __init__(self, model, tokenizer, convention: tuple, image: dict, name: str, description: str,
                 batch_size: int = 8, max_length: int = 77):
        self.module, self.tokenizer, self.convention, self.image = model, tokenizer, convention, image
        self.name, self.description, self.batch_size, self.max_length = name, description, batch_size, max_length

    def cosines(self, images, prompts: Sequence[str]) -> torch.Tensor:
        m = self.module
        px = clip_preprocess(images, self.image["size"], self.image["crop"], self.image["mean"], self.image["std"])
        img = l2n(features(m.get_image_features(pixel_values=px.to(m.dtype))).float())
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(px.device)
        txt = l2n(features(m.get_text_features(input_ids=tok["input_ids"],
                                               attention_mask=tok.get("attention_mask"))).float())
        return (img * txt).sum(-1)

    def _score_batch(self, images, prompts):
        cos = self.cosines(images, prompts)
        kind, factor = self.convention
        if kind == "cos":
            return cos
        if kind == "100-clamp":
            return (100.0 * cos).clamp_min(0.0)
        return self.module.logit_scale.float().exp() * cos * factor
