"""Pure-python description of the embedded demo *flow* model (no ComfyUI import).

The rectified-flow counterpart of :mod:`comfyui_pcpo.demo.model`: an SD3-shaped MMDiT (ComfyUI's
``mmdit.OpenAISignatureMMDITWrapper``, the class ``comfy.model_base.SD3`` builds) at tiny width,
working directly in 32x32 RGB pixel space (values in [-1, 1]; 4x4 patches, an 8x8 token grid),
predicting the velocity v = noise - x0 at time t (x_t = (1 - t) x0 + t noise, t = 1 is noise),
with ComfyUI's ``ModelSamplingDiscreteFlow`` at shift 3 (SD3's).  No pooled text vector (the MMDiT
has no ``y_embedder``).  The text encoder is the diffusion demo's, shipped weights, frozen: the flow
model was trained against its outputs and ships no encoder of its own.

Files in ``weights/`` (written by ``tools/train_demo_flow_model.py``):

* ``demo_flow_mmdit.safetensors`` - MMDiT state dict in ComfyUI key names (no prefix)
* ``demo_flow_config.json`` - everything below plus training facts and the measured base score
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .model import CONTEXT_DIM, IMAGE_SIZE, TEXT_ENCODER_PATH, WEIGHTS_DIR

FLOW_WEIGHTS_PATH = os.path.join(WEIGHTS_DIR, "demo_flow_mmdit.safetensors")
FLOW_CONFIG_PATH = os.path.join(WEIGHTS_DIR, "demo_flow_config.json")

DEPTH = 2          # MMDiT: hidden = 64 * depth = 128, heads = depth = 2 (ComfyUI fixes head size 64)
PATCH_SIZE = 4     # 32x32 px -> 8x8 tokens
GRID = IMAGE_SIZE // PATCH_SIZE

# Keyword arguments of comfy.ldm.modules.diffusionmodules.mmdit.MMDiT (besides dtype/device/operations),
# the shape ComfyUI's model detection gives SD3 (pos_embed buffer, Linear context embedder), tiny.
FLOW_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": PATCH_SIZE,
    "depth": DEPTH,
    "input_size": None,
    "adm_in_channels": None,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": CONTEXT_DIM, "out_features": 64 * DEPTH}},
    "num_patches": GRID * GRID,
    "pos_embed_max_size": GRID,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
    "qkv_bias": True,
}

# comfy.model_sampling.ModelSamplingDiscreteFlow: sigma(t) = shift t / (1 + (shift - 1) t), the
# model's timestep input = 1000 sigma.
FLOW_SAMPLING_SETTINGS: dict[str, Any] = {"shift": 3.0, "multiplier": 1000}
FLOW_PREDICTION_TYPE = "flow"  # comfy.model_base.ModelType.FLOW (velocity, CONST noise scaling)

# Recommended sampling: 16 steps of ComfyUI's "simple" schedule (the shift-3 grid), cfg 4.
FLOW_RECOMMENDED_SAMPLING = {"steps": 16, "cfg": 4.0, "sampler": "euler", "scheduler": "simple"}


def load_flow_config(path: str = FLOW_CONFIG_PATH) -> dict[str, Any]:
    """The shipped ``demo_flow_config.json`` (falls back to the constants above if missing)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"unet_config": FLOW_UNET_CONFIG, "sampling_settings": FLOW_SAMPLING_SETTINGS,
            "prediction_type": FLOW_PREDICTION_TYPE, "image_size": IMAGE_SIZE, "context_dim": CONTEXT_DIM}


def flow_weights_available() -> bool:
    return all(os.path.exists(p) for p in (FLOW_WEIGHTS_PATH, FLOW_CONFIG_PATH, TEXT_ENCODER_PATH))


def load_flow_state_dict(path: str = FLOW_WEIGHTS_PATH) -> dict[str, torch.Tensor]:
    """MMDiT state dict (ComfyUI key names, float32)."""
    from safetensors.torch import load_file

    return load_file(path)


def shift_time(t, shift: float = 3.0):
    """SD3's resolution shift t -> shift t / (1 + (shift - 1) t) (ComfyUI's time_snr_shift)."""
    return shift * t / (1 + (shift - 1) * t)
