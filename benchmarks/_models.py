"""Random-weight diffusion models of real size (or tiny, for a CPU dry run) built through ComfyUI's
own classes (``comfy.supported_models``), loaded the way ComfyUI's loaders load a checkpoint (inside
``torch.inference_mode()``, weights stored in the given dtype), with matching conditioning.

The real-size UNet/DiT configs are what ComfyUI's model detection produces for the published SD1.5,
SDXL base and FLUX.1-dev checkpoints.  ComfyUI must be importable first.
"""
from __future__ import annotations

import math

import torch

REAL = {
    "sd15": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_attention=False, use_temporal_resblock=False),
    "sdxl": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 use_temporal_attention=False, use_temporal_resblock=False),
    "flux": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                 axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2),
}
TINY = {
    "sd15": dict(REAL["sd15"], model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                 transformer_depth_output=[1, 1, 1, 1], context_dim=64, num_heads=2),
    "sdxl": dict(REAL["sdxl"], model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                 transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1], context_dim=64,
                 num_head_channels=16, adm_in_channels=32 + 6 * 256),
    "flux": dict(REAL["flux"], vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=2, depth=1,
                 depth_single_blocks=1, axes_dim=[8, 12, 12]),
}
# text width, pooled width and tokens of each family's conditioning (real, tiny)
COND = {"sd15": ((768, None, 77), (64, None, 8)), "sdxl": ((2048, 1280, 77), (64, 32, 8)),
        "flux": ((4096, 768, 256), (64, 32, 8))}
CLASSES = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux"}
RESOLUTION = {"sd15": 512, "sdxl": 1024, "flux": 1024}  # pixels, real size


def _init(module: torch.nn.Module, seed: int) -> None:
    """Variance-preserving random weights (ComfyUI's ops leave them uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            norm = "norm" in type(m).__name__.lower()
            for name, p in m.named_parameters(recurse=False):
                if norm or name == "scale":
                    p.fill_(0.0 if name == "bias" else 1.0)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g).mul_(1 / math.sqrt(p[0].numel())))
                else:
                    p.copy_(torch.randn(p.shape, generator=g).mul_(0.02))


def build(family: str, tiny: bool = False, dtype=torch.float32, seed: int = 0, dynamic: bool = False,
          as_loaded: bool = True):
    """(MODEL patcher, positive, negative) for ``family``; weights stored in ``dtype``.
    ``dynamic``: wrap in ComfyUI's Dynamic VRAM patcher where the host has one enabled.
    ``as_loaded``: create the weights inside inference mode, as ComfyUI's loaders do (training then
    works on a copy); otherwise as ordinary frozen tensors that training can share (no second copy
    of the weights: what a memory measurement of the gradient pass alone wants)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    unet = dict((TINY if tiny else REAL)[family])
    if family == "flux":
        import comfyui_host  # tools/ (on sys.path for the benchmarks)
        unet.update(comfyui_host.flux1_detection_defaults(unet))
    cfg = getattr(sm, CLASSES[family])(unet)
    cfg.set_inference_dtype(dtype, None)
    with torch.inference_mode(as_loaded):
        model = cfg.get_model({}, device=None)
        _init(model.diffusion_model, seed)
        if not as_loaded:
            model.requires_grad_(False)
    cls = comfy.model_patcher.ModelPatcher
    if dynamic and hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        cls = comfy.model_patcher.ModelPatcherDynamic
    patcher = cls(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    width, pooled, tokens = COND[family][1 if tiny else 0]
    g = torch.Generator().manual_seed(seed + 1)

    def cond(seed_):
        g.manual_seed(seed_)
        extra = {}
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=g)
        if family == "sdxl":
            px = 8 * 128
            extra.update(width=px, height=px, crop_w=0, crop_h=0, target_width=px, target_height=px)
        if family == "flux":
            extra["guidance"] = 3.5
        return [[torch.randn(1, tokens, width, generator=g), extra]]
    return patcher, cond(1), cond(2)


def latent_size(family: str, tiny: bool) -> int:
    """Latent side in pixels/8: real resolutions, or 8x8 latents for a tiny dry run."""
    return 8 if tiny else RESOLUTION[family] // 8
