"""Pure-python description of the embedded demo model (no ComfyUI import).

The model is a tiny SD1.5-shaped UNet (ComfyUI's ``openaimodel.UNetModel``) working directly
in 32x32 RGB pixel space (values in [-1, 1], as ComfyUI's pixel-space VAE produces), with a
DDPM discrete schedule and v-prediction, conditioned by :class:`TinyTextEncoder`.

Files in ``weights/`` (written by ``tools/train_demo_model.py``):

* ``demo_unet.safetensors`` - UNet state dict in ComfyUI ``UNetModel`` key names (no prefix)
* ``demo_text_encoder.safetensors`` - :class:`TinyTextEncoder` state dict
* ``demo_config.json`` - everything below plus training facts and the measured base score

How to build the ComfyUI objects is described in :func:`comfy_build_notes` (the node layer
does it; this module must stay importable without ComfyUI).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from .text import MAX_LENGTH, VOCAB, TinyTextEncoder, WordTokenizer

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
UNET_PATH = os.path.join(WEIGHTS_DIR, "demo_unet.safetensors")
TEXT_ENCODER_PATH = os.path.join(WEIGHTS_DIR, "demo_text_encoder.safetensors")
CONFIG_PATH = os.path.join(WEIGHTS_DIR, "demo_config.json")

IMAGE_SIZE = 32
CONTEXT_DIM = 64

# Keyword arguments of comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel (besides
# device/operations).  SD1.5 layout (res blocks + spatial transformers with cross-attention)
# at a tiny width: 3 levels (32, 16, 8 px), one res block per level, cross-attention at 8x8
# and in the middle block (attention at 16x16 halves CPU throughput).
UNET_CONFIG: dict[str, Any] = {
    "image_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 0, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 0, 1, 1],
    "context_dim": CONTEXT_DIM,
    "num_heads": -1,
    "num_head_channels": 32,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "use_checkpoint": False,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": len(VOCAB),
    "context_dim": CONTEXT_DIM,
    "num_layers": 2,
    "num_heads": 4,
    "ff_mult": 2,
    "max_length": MAX_LENGTH,
}

# ComfyUI model_config.sampling_settings reproducing the training schedule with
# comfy.model_sampling.ModelSamplingDiscrete: make_beta_schedule("sqrt_linear", ...) is the
# original DDPM linear beta schedule 1e-4 .. 2e-2 over 1000 steps (sigma_max ~ 157).
SAMPLING_SETTINGS: dict[str, Any] = {
    "beta_schedule": "sqrt_linear",
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "timesteps": 1000,
}
PREDICTION_TYPE = "v_prediction"  # comfy.model_base.ModelType.V_PREDICTION

# Recommended sampling for the demo.  Base model (400 training steps) with these settings on the
# 90-caption evaluation set: prompt-colour-agreement 0.58, dominant colour correct 56%,
# background correct 100% (ComfyUI KSampler euler_ancestral/normal gives the same: 57%).
RECOMMENDED_SAMPLING = {"steps": 20, "cfg": 4.0, "sampler": "ddim", "eta": 1.0}


def load_config(path: str = CONFIG_PATH) -> dict[str, Any]:
    """The shipped ``demo_config.json`` (falls back to the constants above if missing)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {
        "unet_config": UNET_CONFIG,
        "text_encoder_config": TEXT_ENCODER_CONFIG,
        "sampling_settings": SAMPLING_SETTINGS,
        "prediction_type": PREDICTION_TYPE,
        "image_size": IMAGE_SIZE,
        "context_dim": CONTEXT_DIM,
        "vocab": list(VOCAB),
    }


def weights_available() -> bool:
    return all(os.path.exists(p) for p in (UNET_PATH, TEXT_ENCODER_PATH, CONFIG_PATH))


def load_unet_state_dict(path: str = UNET_PATH) -> dict[str, torch.Tensor]:
    """UNet state dict (ComfyUI ``UNetModel`` key names, float32)."""
    from safetensors.torch import load_file

    return load_file(path)


def load_text_encoder(path: str = TEXT_ENCODER_PATH, device: Optional[torch.device] = None,
                      config: Optional[dict] = None) -> tuple[TinyTextEncoder, WordTokenizer]:
    """The trained text encoder (eval mode, frozen) and its tokenizer."""
    from safetensors.torch import load_file

    cfg = config if config is not None else load_config()
    enc_cfg = dict(cfg.get("text_encoder_config", TEXT_ENCODER_CONFIG))
    encoder = TinyTextEncoder(**enc_cfg)
    encoder.load_state_dict(load_file(path))
    encoder.eval().requires_grad_(False)
    if device is not None:
        encoder.to(device)
    tokenizer = WordTokenizer(cfg.get("vocab", VOCAB), max_length=enc_cfg["max_length"])
    return encoder, tokenizer


def comfy_build_notes() -> str:
    return (
        "MODEL: subclass comfy.supported_models_base.BASE with unet_config=UNET_CONFIG, "
        "unet_extra_config={}, latent_format=comfy.latent_formats.ChromaRadiance, "
        "sampling_settings=SAMPLING_SETTINGS, model_type() -> ModelType.V_PREDICTION; "
        "model = config.get_model({}); model.diffusion_model.load_state_dict(unet_sd); "
        "comfy.model_patcher.ModelPatcher(model, load_device, offload_device). "
        "VAE: comfy.sd.VAE(sd={'pixel_space_vae': torch.tensor(1.0)}). "
        "CONDITIONING: [[encoder(tokenizer(prompt)), {}]]."
    )
