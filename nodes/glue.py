"""ComfyUI-side helpers shared by the nodes: model family detection, LoRA attachment through
ComfyUI's weight wrappers, running code inside a CFGGuider (so conditioning is processed by
ComfyUI itself), and the out-of-place residual fix for gradient passes.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers

from comfyui_pcpo.lora import LoRAWeightDelta, select_targets

log = logging.getLogger("comfyui-pcpo")

SUPPORTED = "eps / v-prediction diffusion models (SD1.x, SD2.x, SDXL) and rectified-flow models (SD3, FLUX)"


@dataclass(frozen=True)
class ModelFamily:
    kind: str        # "diffusion" | "flow"
    prediction: str  # "eps" | "v" | "flow"
    arch: str        # the model config class name, e.g. "SD15", "SDXL", "Flux"


def model_family(model) -> ModelFamily:
    """Classify a MODEL (ModelPatcher); raise a clear error for families PCPO cannot train."""
    ms = model.get_model_object("model_sampling")
    arch = type(getattr(model.model, "model_config", None)).__name__
    MS = comfy.model_sampling
    if isinstance(ms, MS.CONST) and isinstance(ms, (MS.ModelSamplingDiscreteFlow, MS.ModelSamplingFlux)):
        return ModelFamily("flow", "flow", arch)
    edm_like = tuple(getattr(MS, n) for n in ("EDM", "X0", "COSMOS_RFLOW") if hasattr(MS, n))
    discrete_bad = tuple(getattr(MS, n) for n in ("ModelSamplingDiscreteEDM", "StableCascadeSampling") if hasattr(MS, n))
    if (isinstance(ms, MS.EPS) and not isinstance(ms, edm_like) and isinstance(ms, MS.ModelSamplingDiscrete)
            and not isinstance(ms, discrete_bad)):
        return ModelFamily("diffusion", "v" if isinstance(ms, MS.V_PREDICTION) else "eps", arch)
    raise ValueError(
        f"PCPO cannot train this MODEL ({arch}, sampling {type(ms).__mro__[1].__name__}/"
        f"{type(ms).__mro__[2].__name__}): supported are {SUPPORTED}. Remove model-sampling "
        "patches such as ModelSamplingContinuousEDM in front of the PCPO LoRA node.")


def denoiser_weights(model) -> list[tuple[str, torch.Size]]:
    """(module name inside diffusion_model, weight shape) for every ComfyUI op with a weight."""
    out = []
    for name, m in model.model.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "weight_function") and isinstance(w, torch.Tensor) and w.ndim >= 2:
            out.append((name, tuple(w.shape)))
    return out


def attach_lora(model, rank: int, alpha: float, preset: str, extra_regex: str = "", seed: int = 0,
                dtype=torch.float32, adapters: dict | None = None):
    """Clone ``model`` and attach trainable LoRA deltas as weight wrappers.

    Returns (patched clone, {module name: LoRAWeightDelta}).  Existing ``adapters`` (a resumed or
    live session) are re-attached instead of creating new ones.  Base weights are frozen; adapters
    live on the model's load device.
    """
    device = model.load_device
    mp = model.clone()
    if adapters is None:
        targets = select_targets(denoiser_weights(model), preset, extra_regex)
        if not targets:
            raise ValueError(f"target layers {preset!r} matched no layer of this {model_family(model).arch} "
                             "model; try 'all-linear'")
        g = torch.Generator().manual_seed(seed)
        shapes = dict(denoiser_weights(model))
        with torch.inference_mode(False):
            adapters = {n: LoRAWeightDelta(shapes[n], rank, alpha, dtype=dtype, device=device, generator=g)
                        for n in targets}
    for name, ad in adapters.items():
        mp.add_weight_wrapper(f"diffusion_model.{name}.weight", ad)
    mp.model.requires_grad_(False)
    return mp, adapters


def clone_conditioning(cond):
    """Deep-copy a CONDITIONING list, cloning tensors made under inference mode so they can take
    part in autograd."""
    def cl(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {k: cl(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(cl(x) for x in v)
        return v
    with torch.inference_mode(False):
        return [[cl(c[0]), cl(dict(c[1]))] for c in cond]


class _CallbackSampler(comfy.samplers.Sampler):
    """A ComfyUI Sampler that hands the prepared guider to ``fn`` (the native trainer's pattern)."""

    def __init__(self, fn):
        self.fn = fn

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.fn(model_wrap, extra_args)
        return torch.zeros_like(noise)


def run_in_guider(model, positive, negative, cfg: float, latent_shape, sigmas, fn, seed: int = 0):
    """Prepare ``model`` and the conditioning exactly as sampling does, then call
    ``fn(predict)`` where ``predict(x, sigma (b,)) -> denoised x0`` is ComfyUI's guidance-combined
    model call.  Returns fn's result."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)

    def inner(model_wrap, extra_args):
        if not torch.is_inference_mode_enabled():  # a gradient pass
            make_weights_trainable(model.model)

        def predict(x, sigma):
            return model_wrap(x, sigma.to(x.device, x.dtype), **extra_args)
        return fn(predict)

    s = _CallbackSampler(inner)
    zeros = torch.zeros(latent_shape)
    guider.sample(zeros, zeros, s, torch.as_tensor(sigmas, dtype=torch.float32), disable_pbar=True, seed=seed)
    return s.result


def make_weights_trainable(module) -> int:
    """Replace parameters and buffers created under torch.inference_mode() (ComfyUI loads models
    inside its executor's inference mode) by normal tensors, one at a time, so a gradient pass can
    save them for backward.  Values are unchanged; returns how many were replaced."""
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                if p.is_inference():
                    setattr(m, name, torch.nn.Parameter(p.clone(), requires_grad=False))
                    n += 1
            for name, b in list(m.named_buffers(recurse=False)):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


def _oop_iadd(self, other):
    return self.add(other)


def _oop_isub(self, other):
    return self.sub(other)


def _oop_imul(self, other):
    return self.mul(other)


@contextlib.contextmanager
def out_of_place_residuals():
    """Make ``x += y`` (and -=, *=) on tensors out of place for the duration.

    FLUX (and MMDiT) blocks update their residual streams in place; autograd then either raises or,
    with checkpointing, silently computes wrong gradients.  Out-of-place adds give the same values,
    so sampling is untouched (this is only entered for gradient passes)."""
    saved = {k: torch.Tensor.__dict__.get(k) for k in ("__iadd__", "__isub__", "__imul__")}
    torch.Tensor.__iadd__, torch.Tensor.__isub__, torch.Tensor.__imul__ = _oop_iadd, _oop_isub, _oop_imul
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                delattr(torch.Tensor, k)
            else:
                setattr(torch.Tensor, k, v)


@contextlib.contextmanager
def lora_multiplier(adapters: dict, value: float):
    """Temporarily scale every adapter (0 = the base model, used by uw-lambda's reference pass)."""
    old = {k: a.multiplier for k, a in adapters.items()}
    for a in adapters.values():
        a.multiplier = value
    try:
        yield
    finally:
        for k, a in adapters.items():
            a.multiplier = old[k]


def interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()
