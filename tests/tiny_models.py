"""Tiny random-weight ComfyUI models, built from ComfyUI's own classes.

Every builder goes the way ComfyUI's loaders go (``comfy.supported_models.<Family>(unet_config)``,
``set_inference_dtype``, ``get_model``, wrapped in ``comfy.model_patcher.ModelPatcher``) with
architecture settings small enough to sample and train on one CPU thread in seconds.  ComfyUI's
ops skip weight initialisation (``torch.empty``), so every parameter is initialised here,
deterministically from ``seed``:

* Linear / Conv weights (ndim >= 2): normal, std ``1/sqrt(fan_in)`` (variance preserving, so
  outputs depend on input and conditioning; no layer is zero-initialised),
* biases: normal, std 0.02,
* norm weights / RMSNorm ``scale``: ones, norm biases: zeros,
* SD3's ``pos_embed`` buffer: the 2D sin-cos table.

As with ComfyUI's own loaders, parameters keep ``requires_grad=True`` (ComfyUI relies on
``torch.inference_mode`` instead): a trainer must freeze the base weights itself.

Families (``TinyModel.family``):

=======  ====================  ========  =================================================
family   ComfyUI class         latent    CONDITIONING entry (one entry, batched tensors)
=======  ====================  ========  =================================================
sd15     SD15 (EPS)            4 ch      [ctx (B,8,64), {"pooled_output": (B,32)}]
sdxl     SDXL (EPS)            4 ch      [ctx (B,8,64), {"pooled_output": (B,32), width...}]
sd2v     SD20 (V_PREDICTION)   4 ch      [ctx (B,8,64), {"pooled_output": (B,32)}]
sd3      SD3 (FLOW, shift 3)   16 ch     [ctx (B,8,64), {"pooled_output": (B,32)}]
flux     Flux (FLUX, guidance) 16 ch     [ctx (B,8,64), {"pooled_output": (B,32), "guidance"}]
=======  ====================  ========  =================================================

``tiny_vae(channels)`` gives a ``comfy.sd.VAE`` (ComfyUI's AutoencoderKL, 32 channels wide,
8x up/down-scaling) for 4- or 16-channel latents.

ComfyUI must be importable first: the builders call ``comfy_harness.load_comfy()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

try:  # imported as tests.tiny_models
    from . import comfy_harness as _harness
except ImportError:  # tests/ on sys.path (pytest rootdir insertion, scripts)
    import comfy_harness as _harness

CONTEXT_DIM = 64   # width of the text-encoder hidden states (c_crossattn)
POOLED_DIM = 32    # width of pooled_output (SDXL adm, SD3 y, FLUX vec)
TOKENS = 8         # text tokens per prompt
FAMILIES = ("sd15", "sdxl", "sd2v", "sd3", "flux")

_UNCOND_SEED = 0x5EED_E0E0  # fixed "empty prompt" embedding


def _comfy():
    _harness.load_comfy(extra_nodes=False)


# --------------------------------------------------------------------------- initialisation

def _is_norm(module: torch.nn.Module) -> bool:
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
        return True
    name = type(module).__name__.lower()
    return "norm" in name


def init_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministically initialise every parameter of ``module`` (in place)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            norm = _is_norm(mod)
            for pname, p in mod.named_parameters(recurse=False):
                if norm:
                    if pname == "bias":
                        p.zero_()
                    else:
                        p.fill_(1.0)
                    continue
                if p.ndim >= 2:
                    fan_in = p[0].numel()
                    std = 1.0 / math.sqrt(max(fan_in, 1))
                elif pname == "bias":
                    std = 0.02
                elif pname in ("scale", "weight"):  # stray 1-d scales (e.g. RMSNorm-like)
                    p.fill_(1.0)
                    continue
                else:
                    std = 0.02
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
        # buffers a builder fills afterwards (e.g. MMDiT's pos_embed) start as uninitialised memory
        for _, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return module


# --------------------------------------------------------------------------- the model object

@dataclass
class TinyModel:
    """A tiny ComfyUI model plus conditioning helpers.

    ``model`` is a ``comfy.model_patcher.ModelPatcher`` (what a MODEL socket carries).
    """

    model: Any
    family: str
    latent_channels: int
    latent_format: Any
    model_type: Any
    context_dim: int = CONTEXT_DIM
    pooled_dim: int = POOLED_DIM
    tokens: int = TOKENS
    extra_cond: dict = field(default_factory=dict)

    # -- conditioning -------------------------------------------------------------------
    def embed(self, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctx (B,T,D), pooled (B,P)) with row i a deterministic "prompt" ``seeds[i]``."""
        ctx, pooled = [], []
        for s in seeds:
            g = torch.Generator(device="cpu").manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)
            ctx.append(torch.randn((1, self.tokens, self.context_dim), generator=g))
            pooled.append(torch.randn((1, self.pooled_dim), generator=g))
        return torch.cat(ctx), torch.cat(pooled)

    def _conditioning(self, seeds: Sequence[int]) -> list:
        ctx, pooled = self.embed(seeds)
        extras = {"pooled_output": pooled}
        extras.update(self.extra_cond)
        return [[ctx, extras]]

    def cond(self, batch: int = 1, seed: int | Sequence[int] = 0) -> list:
        """CONDITIONING for ``batch`` rows.

        ``seed`` an int: every row is the same prompt (like CLIPTextEncode + repeat);
        a sequence of ``batch`` ints: row i is prompt ``seed[i]`` (per-sample prompts; a single
        entry with batched tensors, not composition).
        """
        seeds = [int(seed)] * batch if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for batch {batch}")
        return self._conditioning(seeds)

    def uncond(self, batch: int = 1) -> list:
        """Negative/empty-prompt CONDITIONING (a fixed embedding, different from any cond)."""
        return self._conditioning([_UNCOND_SEED] * batch)

    # -- latents / images ---------------------------------------------------------------
    def empty_latent(self, batch: int = 1, height: int = 16, width: int = 16) -> dict:
        """A LATENT dict of zeros (``height``/``width`` in latent pixels)."""
        return {"samples": torch.zeros((batch, self.latent_channels, height, width))}

    def vae(self, seed: int = 0):
        return tiny_vae(self.latent_channels, seed=seed)

    def model_sampling(self):
        return self.model.get_model_object("model_sampling")

    def sigmas(self, steps: int, scheduler: str = "simple", denoise: float = 1.0) -> torch.Tensor:
        import comfy.samplers
        if denoise < 1.0:
            total = int(steps / denoise)
            return comfy.samplers.calculate_sigmas(self.model_sampling(), scheduler, total).cpu()[-(steps + 1):]
        return comfy.samplers.calculate_sigmas(self.model_sampling(), scheduler, steps).cpu()

    def sample(self, positive=None, negative=None, batch: int = 1, height: int = 16, width: int = 16,
               steps: int = 4, cfg: float = 4.0, sampler_name: str = "euler_ancestral",
               scheduler: str = "simple", seed: int = 0, latent: torch.Tensor | None = None,
               sampler=None, sigmas: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Run ``comfy.sample.sample_custom`` (the SamplerCustom path) and return latents."""
        import comfy.sample
        import comfy.samplers
        positive = positive if positive is not None else self.cond(batch, seed=1)
        negative = negative if negative is not None else self.uncond(batch)
        if latent is None:
            latent = self.empty_latent(batch, height, width)["samples"]
        latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        if sampler is None:
            sampler = comfy.samplers.sampler_object(sampler_name)
        if sigmas is None:
            sigmas = self.sigmas(steps, scheduler)
        return comfy.sample.sample_custom(self.model, noise, cfg, sampler, sigmas, positive, negative,
                                          latent, callback=callback, disable_pbar=True, seed=seed)


# --------------------------------------------------------------------------- builders

def _build(config_cls, unet_config: dict, overrides: dict | None = None, model_type=None,
           seed: int = 0):
    _comfy()
    import comfy.model_management as mm
    import comfy.model_patcher

    cfg = config_cls(unet_config)
    for k, v in (overrides or {}).items():  # after unet_extra_config was merged in
        if v is None:
            cfg.unet_config.pop(k, None)
        else:
            cfg.unet_config[k] = v
    cfg.set_inference_dtype(torch.float32, None)
    if model_type is not None:
        cfg.model_type = lambda state_dict, prefix="": model_type
    load_device = mm.get_torch_device()
    base = cfg.get_model({}, device=None)
    init_weights(base.diffusion_model, seed=seed)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device,
                                               offload_device=mm.unet_offload_device())
    return cfg, base, patcher


_UNET_COMMON = dict(
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth_middle=1,
    use_spatial_transformer=True, legacy=False, context_dim=CONTEXT_DIM,
    use_temporal_attention=False, use_temporal_resblock=False,
)


def sd15(seed: int = 0) -> TinyModel:
    """SD1.5-style UNet (eps prediction, 4-channel latents, cross-attention only)."""
    _comfy()
    import comfy.supported_models as sm
    unet = dict(_UNET_COMMON, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                use_linear_in_transformer=False, adm_in_channels=None)
    cfg, base, patcher = _build(sm.SD15, unet, overrides={"num_heads": 2, "num_head_channels": -1}, seed=seed)
    return TinyModel(patcher, "sd15", 4, cfg.latent_format, base.model_type)


def sdxl(seed: int = 0) -> TinyModel:
    """SDXL-style UNet: linear transformers, no attention at level 0, adm = pooled + 6 size embeds."""
    _comfy()
    import comfy.supported_models as sm
    adm = POOLED_DIM + 6 * 256  # sdxl_pooled(pooled_output) + Timestep(256) x 6 size embeddings
    unet = dict(_UNET_COMMON, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                use_linear_in_transformer=True, adm_in_channels=adm, num_classes="sequential")
    cfg, base, patcher = _build(sm.SDXL, unet, overrides={"num_heads": -1, "num_head_channels": 16}, seed=seed)
    extra = {"width": 128, "height": 128, "crop_w": 0, "crop_h": 0, "target_width": 128, "target_height": 128}
    return TinyModel(patcher, "sdxl", 4, cfg.latent_format, base.model_type, extra_cond=extra)


def sd2v(seed: int = 0) -> TinyModel:
    """SD2.x-style v-prediction UNet (ModelType.V_PREDICTION, linear transformers)."""
    _comfy()
    import comfy.model_base
    import comfy.supported_models as sm
    unet = dict(_UNET_COMMON, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                use_linear_in_transformer=True, adm_in_channels=None)
    cfg, base, patcher = _build(sm.SD20, unet, overrides={"num_heads": -1, "num_head_channels": 16},
                                model_type=comfy.model_base.ModelType.V_PREDICTION, seed=seed)
    assert base.model_type == comfy.model_base.ModelType.V_PREDICTION
    return TinyModel(patcher, "sd2v", 4, cfg.latent_format, base.model_type)


def sd3(seed: int = 0) -> TinyModel:
    """SD3-style MMDiT (rectified flow, shift 3): depth 2 -> hidden 128, 2 heads of 64."""
    _comfy()
    import comfy.supported_models as sm
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch
    depth, max_size = 2, 16  # pos-embed grid in patches: latents up to 32x32
    unet = dict(
        in_channels=16, out_channels=16, patch_size=2, depth=depth, input_size=None,
        adm_in_channels=POOLED_DIM,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": CONTEXT_DIM, "out_features": 64 * depth}},
        num_patches=max_size * max_size, pos_embed_max_size=max_size,
        pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
    )
    cfg, base, patcher = _build(sm.SD3, unet, seed=seed)
    with torch.no_grad():
        dm = base.diffusion_model
        dm.pos_embed.copy_(get_2d_sincos_pos_embed_torch(dm.hidden_size, max_size, max_size).reshape(1, -1, dm.hidden_size))
    return TinyModel(patcher, "sd3", 16, cfg.latent_format, base.model_type)


def flux(seed: int = 0, guidance: float = 3.5) -> TinyModel:
    """FLUX.1-dev-style DiT (guidance embedding): hidden 64, 2 heads, 1 double + 1 single block."""
    _comfy()
    import comfy.supported_models as sm
    unet = dict(
        image_model="flux", guidance_embed=True, in_channels=16, out_channels=16,
        vec_in_dim=POOLED_DIM, context_in_dim=CONTEXT_DIM, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
        patch_size=2, qkv_bias=True,
    )
    unet.update(_harness.host().flux1_detection_defaults(unet))
    cfg, base, patcher = _build(sm.Flux, unet, seed=seed)
    return TinyModel(patcher, "flux", 16, cfg.latent_format, base.model_type,
                     extra_cond={"guidance": float(guidance)})


BUILDERS = {"sd15": sd15, "sdxl": sdxl, "sd2v": sd2v, "sd3": sd3, "flux": flux}


def build(family: str, seed: int = 0) -> TinyModel:
    return BUILDERS[family](seed=seed)


# --------------------------------------------------------------------------- VAE

_VAE_CACHE: dict = {}


def tiny_vae_config(latent_channels: int) -> dict:
    ddconfig = {"double_z": True, "z_channels": int(latent_channels), "resolution": 256,
                "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1],
                "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    return {"params": {"ddconfig": ddconfig, "embed_dim": int(latent_channels)}}


def tiny_vae_state_dict(latent_channels: int = 4, seed: int = 0) -> dict:
    """State dict of a tiny ComfyUI AutoencoderKL (deterministic random weights)."""
    _comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ae = AutoencoderKL(**tiny_vae_config(latent_channels)["params"])
    init_weights(ae, seed=seed)
    return {k: v.detach().clone() for k, v in ae.state_dict().items()}


def tiny_vae(latent_channels: int = 4, seed: int = 0, cached: bool = True):
    """A ``comfy.sd.VAE`` for ``latent_channels`` (4: SD1.5/SDXL/SD2, 16: SD3/FLUX).

    Built through ``comfy.sd.VAE(sd=..., config=...)`` (the explicit-config path, which
    constructs ComfyUI's AutoencoderKL); 8x scale like the real ones, decode (B,C,h,w) ->
    IMAGE (B,8h,8w,3) in [0,1].  Cached per (channels, seed) unless ``cached=False``.
    """
    key = (int(latent_channels), int(seed))
    if cached and key in _VAE_CACHE:
        return _VAE_CACHE[key]
    _comfy()
    import comfy.sd
    sd = tiny_vae_state_dict(latent_channels, seed)
    vae = comfy.sd.VAE(sd=sd, config=tiny_vae_config(latent_channels))
    vae.latent_channels = int(latent_channels)  # the config path leaves the default 4
    if cached:
        _VAE_CACHE[key] = vae
    return vae
