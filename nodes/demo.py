"""PCPO Demo loaders: the embedded tiny text-to-image model as a normal MODEL, CLIP and VAE.

The model is an SD1.5-shaped ComfyUI UNet at tiny width working in 32x32 RGB pixel space
(v-prediction, DDPM linear schedule); the VAE is ComfyUI's identity pixel-space VAE; the CLIP is a
small word-level text encoder that CLIPTextEncode and PCPO Prompts use like any other CLIP.

The flow counterpart (``load_demo_flow``, PCPO Demo Flow Model Loader) is an SD3-shaped rectified-flow
MMDiT (comfy.model_base.SD3, ModelType.FLOW, shift 3) at tiny width in the same pixel space, with the
same text encoder and VAE.
"""
from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base

from comfyui_pcpo.demo import flow_model as demo_flow
from comfyui_pcpo.demo import model as demo
from comfyui_pcpo.demo.shapes import all_specs

_CACHE: dict = {}


class DemoPixelLatent(comfy.latent_formats.LatentFormat):
    """3-channel identity 'latent' (the image in [-1, 1]) at full resolution."""
    latent_channels = 3
    spacial_downscale_ratio = 1
    latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    latent_rgb_factors_bias = [0.0, 0.0, 0.0]

    def process_in(self, latent):
        return latent

    def process_out(self, latent):
        return latent


class DemoPixelUNet(comfy.supported_models_base.BASE):
    unet_config = dict(demo.UNET_CONFIG)
    unet_extra_config: dict = {}
    sampling_settings = dict(demo.SAMPLING_SETTINGS)
    latent_format = DemoPixelLatent
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION


class DemoCLIP:
    """Duck-typed CLIP: tokenize / encode_from_tokens(_scheduled) over the demo text encoder."""

    def __init__(self):
        self.encoder, self.tokenizer = demo.load_text_encoder()
        self.encoder.eval().requires_grad_(False)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"demo": self.tokenizer([text])}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        with torch.no_grad():
            cond = self.encoder(tokens["demo"]).float()
        if return_dict:
            return {"cond": cond, "pooled_output": None}
        return (cond, None) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        return [[self.encode_from_tokens(tokens), dict(add_dict or {})]]

    def clone(self):
        return self


def load_demo():
    """(MODEL, CLIP, VAE) of the embedded model, built once per process."""
    if "objs" not in _CACHE:
        if not demo.weights_available():
            raise FileNotFoundError(f"the demo weights are missing from {demo.WEIGHTS_DIR}; reinstall the pack")
        _CACHE["objs"] = _pixel_space_model(DemoPixelUNet(dict(DemoPixelUNet.unet_config)),
                                            demo.load_unet_state_dict())
    return _CACHE["objs"]


def _pixel_space_model(model_config, state_dict: dict):
    """(MODEL, CLIP, VAE): ``model_config``'s model in fp32 with ``state_dict`` loaded, the demo's text
    encoder and the identity pixel-space VAE."""
    model_config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        m = model_config.get_model({}, device=comfy.model_management.unet_offload_device())
        m.diffusion_model.load_state_dict(state_dict, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(m, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, DemoCLIP(), comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


DEMO_PROMPTS = "\n".join(s.text for s in all_specs())  # the 90 captions the model knows


class PCPODemoModelLoader:
    CATEGORY = "PCPO/demo"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("Tiny 32x32 pixel-space text-to-image model (v-prediction).",
                       "Its word-level text encoder (works with CLIPTextEncode and PCPO Prompts).",
                       "Identity pixel-space VAE (VAE Decode turns samples into images).")
    DESCRIPTION = ("The embedded demo model: draws coloured shapes on coloured backgrounds from prompts like 'a red "
                   "circle on a blue background'. Runs on a CPU; use 32x32 images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return load_demo()


# --------------------------------------------------------------------------- the flow counterpart

class DemoFlowSD3Model(comfy.model_base.SD3):
    """comfy.model_base.SD3 without a pooled vector: the demo text encoder has none (the MMDiT has no
    y_embedder), so a conditioning without ``pooled_output`` is accepted instead of a KeyError."""

    def encode_adm(self, **kwargs):
        return kwargs.get("pooled_output", None)


class DemoFlowMMDiT(comfy.supported_models.SD3):
    """SD3's model config (rectified flow, ModelSamplingDiscreteFlow, shift 3) at the demo flow model's
    tiny MMDiT shape, in the 3-channel pixel 'latent' space."""
    unet_config = dict(demo_flow.FLOW_UNET_CONFIG)
    unet_extra_config: dict = {}
    sampling_settings = dict(demo_flow.FLOW_SAMPLING_SETTINGS)
    latent_format = DemoPixelLatent
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        return DemoFlowSD3Model(self, device=device)


def load_demo_flow():
    """(MODEL, CLIP, VAE) of the embedded flow model (ModelType.FLOW, shift 3), built once per process;
    the CLIP is the diffusion demo's text encoder."""
    if "flow" not in _CACHE:
        if not demo_flow.flow_weights_available():
            raise FileNotFoundError(f"the demo flow weights are missing from {demo.WEIGHTS_DIR}; reinstall the pack")
        cfg = demo_flow.load_flow_config()
        _CACHE["flow"] = _pixel_space_model(DemoFlowMMDiT(dict(cfg.get("unet_config", demo_flow.FLOW_UNET_CONFIG))),
                                            demo_flow.load_flow_state_dict())
    return _CACHE["flow"]


class PCPODemoFlowModelLoader:
    CATEGORY = "PCPO/demo"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("Tiny 32x32 pixel-space rectified-flow model (SD3-shaped MMDiT, shift 3): PCPO trains it "
                       "with the flow sampler (flow_noise_rule constant or flow-grpo).",
                       "The demo's word-level text encoder (works with CLIPTextEncode and PCPO Prompts).",
                       "Identity pixel-space VAE (VAE Decode turns samples into images).")
    DESCRIPTION = ("The embedded demo flow model: the rectified-flow counterpart of the demo model, drawing coloured "
                   "shapes on coloured backgrounds from prompts like 'a red circle on a blue background'. Runs on a "
                   "CPU; use 32x32 images, 16 steps, the simple scheduler.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return load_demo_flow()


NODE_CLASS_MAPPINGS = {"PCPODemoModelLoader": PCPODemoModelLoader, "PCPODemoFlowModelLoader": PCPODemoFlowModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPODemoModelLoader": "PCPO Demo Model Loader",
                              "PCPODemoFlowModelLoader": "PCPO Demo Flow Model Loader"}
