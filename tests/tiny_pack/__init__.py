"""Test-only ComfyUI custom-node pack: tiny random stand-ins for ComfyUI's model loaders.

Loaded in tests through ComfyUI's own loader (``nodes.load_custom_node(<this folder>)``, or a
symlink in ``custom_nodes/`` of a real server), it lets the shipped workflows run end to end on a
CPU: a test swaps each loader node of a workflow for its stand-in here, keeping node ids and output
slots, and the rest of the graph runs unchanged.

=========================  ==========================  ==================================
stand-in                   replaces                    outputs
=========================  ==========================  ==================================
PCPOTestCheckpointLoader   CheckpointLoaderSimple      MODEL, CLIP, VAE (same order)
PCPOTestUNETLoader         UNETLoader                  MODEL
PCPOTestCLIPLoader         CLIPLoader/DualCLIPLoader   CLIP
PCPOTestVAELoader          VAELoader                   VAE
=========================  ==========================  ==================================

Each takes a ``family`` (sd15, sdxl, sd2v, sd3, flux): the models come from ``tests/tiny_models.py``
(ComfyUI's own model classes, tiny widths, seeded weights) and are cached per family in this
module, so every queued prompt gets the SAME MODEL object (as ComfyUI's loaders' cache would give)
and a PCPO session keeps training the same run.

Like ComfyUI's own loaders, the stand-ins build their models inside the node function, i.e. under
the executor's ``torch.inference_mode()``: every weight is an inference tensor, exactly as with a
real checkpoint loaded by CheckpointLoaderSimple/UNETLoader.  (Models built outside inference mode,
as tests/test_nodes_training.py does, would hide bugs that real users hit.)

``TinyCLIP`` implements the part of ``comfy.sd.CLIP`` that CLIPTextEncode and PCPO Prompts use
(``tokenize``, ``encode_from_tokens``, ``encode_from_tokens_scheduled``): a deterministic
embedding per text (seeded by a hash of family and text) of the tiny models' context width, plus
the pooled vector SDXL/SD3/FLUX need.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading

import torch

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)  # appended: never shadow ComfyUI's top-level modules

import tiny_models  # noqa: E402  (tests/tiny_models.py)

FAMILIES = list(tiny_models.FAMILIES)
_LOCK = threading.Lock()
_MODELS: dict = {}
_CLIPS: dict = {}


def tiny_model(family: str):
    """The cached ``tiny_models.TinyModel`` of ``family`` (built once per process, seed 0)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    with _LOCK:
        tm = _MODELS.get(family)
        if tm is None:
            tm = _MODELS[family] = tiny_models.build(family, seed=0)
        return tm


class TinyCLIP:
    """A deterministic text encoder stand-in with the CLIP object's encoding API."""

    def __init__(self, family: str, context_dim: int, pooled_dim: int, tokens: int):
        self.family = family
        self.context_dim = int(context_dim)
        self.pooled_dim = int(pooled_dim)
        self.tokens = int(tokens)
        self.layer_idx = None

    # -- what CLIPTextEncode / PCPO Prompts call ----------------------------------------------
    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"tiny": [str(text)]}

    def _text(self, tokens) -> str:
        if isinstance(tokens, dict) and "tiny" in tokens:
            return "\n".join(tokens["tiny"])
        return str(tokens)

    def embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        digest = hashlib.sha256(f"{self.family}\0{text}".encode("utf-8")).digest()
        g = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        with torch.inference_mode(False):
            cond = torch.randn((1, self.tokens, self.context_dim), generator=g)
            pooled = torch.randn((1, self.pooled_dim), generator=g)
        return cond, pooled

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self.embed(self._text(tokens))
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        if return_pooled:
            return cond, pooled
        return cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict: dict | None = None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]

    def encode(self, text):
        return self.encode_from_tokens(self.tokenize(text))

    # -- harmless no-ops other nodes may call ----------------------------------------------------
    def clone(self):
        c = TinyCLIP(self.family, self.context_dim, self.pooled_dim, self.tokens)
        c.layer_idx = self.layer_idx
        return c

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def load_model(self):
        return None


def tiny_clip(family: str) -> TinyCLIP:
    tm = tiny_model(family)
    with _LOCK:
        clip = _CLIPS.get(family)
        if clip is None:
            clip = _CLIPS[family] = TinyCLIP(family, tm.context_dim, tm.pooled_dim, tm.tokens)
        return clip


def _family_input():
    return {"family": (FAMILIES, {"default": "sd15", "tooltip": "Which tiny random model family to load "
                                  "(tests/tiny_models.py)."})}


class PCPOTestCheckpointLoader:
    CATEGORY = "PCPO/tests"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    DESCRIPTION = "Test stand-in for Load Checkpoint: a tiny random model, text encoder and VAE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _family_input()}

    def load(self, family):
        tm = tiny_model(family)
        return (tm.model, tiny_clip(family), tm.vae())


class PCPOTestUNETLoader:
    CATEGORY = "PCPO/tests"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = "Test stand-in for Load Diffusion Model (UNETLoader)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _family_input()}

    def load(self, family):
        return (tiny_model(family).model,)


class PCPOTestCLIPLoader:
    CATEGORY = "PCPO/tests"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "Test stand-in for Load CLIP / DualCLIPLoader."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _family_input()}

    def load(self, family):
        return (tiny_clip(family),)


class PCPOTestVAELoader:
    CATEGORY = "PCPO/tests"
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    DESCRIPTION = "Test stand-in for Load VAE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _family_input()}

    def load(self, family):
        return (tiny_model(family).vae(),)


NODE_CLASS_MAPPINGS = {
    "PCPOTestCheckpointLoader": PCPOTestCheckpointLoader,
    "PCPOTestUNETLoader": PCPOTestUNETLoader,
    "PCPOTestCLIPLoader": PCPOTestCLIPLoader,
    "PCPOTestVAELoader": PCPOTestVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PCPOTestCheckpointLoader": "PCPO Test Checkpoint Loader",
    "PCPOTestUNETLoader": "PCPO Test UNET Loader",
    "PCPOTestCLIPLoader": "PCPO Test CLIP Loader",
    "PCPOTestVAELoader": "PCPO Test VAE Loader",
}
