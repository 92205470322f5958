"""ComfyUI-side helpers shared by the nodes: model family detection, LoRA attachment through
ComfyUI's weight wrappers, running code inside a CFGGuider (so conditioning is processed by
ComfyUI itself), and routing gradient passes through the out-of-place residuals of
``comfyui_pcpo.grad_pass``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers

from comfyui_pcpo.grad_pass import (checkpoint_blocks, checkpointed_forward, lora_branch_forward,  # noqa: F401
                                    lora_multiplier, out_of_place_residuals)
from comfyui_pcpo.lora import LoRAWeightDelta, select_targets

from . import host_caps

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


def _needs_private_weights(model) -> bool:
    """True when the diffusion model cannot join an autograd graph as it is: weights created under
    ``torch.inference_mode()`` (every model ComfyUI loads inside its executor) cannot be saved for
    backward, and base weights that require grad would collect gradients of their own."""
    for t in model.model.parameters():
        if t.is_inference() or t.requires_grad:
            return True
    return any(b.is_inference() for b in model.model.buffers())


def is_dynamic(model) -> bool:
    """ComfyUI 0.33+ Dynamic VRAM patcher (weights staged by comfy-aimdo, not resident)."""
    fn = getattr(model, "is_dynamic", None)
    return bool(fn()) if callable(fn) else False


def _clone_params(model) -> set:
    import inspect
    try:
        return set(inspect.signature(model.clone).parameters)
    except (TypeError, ValueError):
        return set()


def copy_strategy(model) -> str:
    """How the trainable model is made from a MODEL without touching the one other nodes use:

    * ``share``: weights are ordinary frozen tensors and the patcher is not dynamic: a plain clone;
    * ``host-deepcopy``: the host re-creates fresh weights outside inference mode
      (``clone(force_deepcopy=True, disable_dynamic=True)``, ComfyUI 0.33+ with a loader that
      registered ``cached_patcher_init``), as ComfyUI's own trainer does;
    * ``own-copy``: a private copy of the (unpatched) weights, outside inference mode, in a new
      non-dynamic patcher (older hosts, custom loaders, dynamic patchers without a loader cache).
    """
    if not _needs_private_weights(model) and not is_dynamic(model):
        return "share"
    if "force_deepcopy" in _clone_params(model) and getattr(model, "cached_patcher_init", None) is not None:
        return "host-deepcopy"
    return "own-copy"


def _copy_module(module: torch.nn.Module, fresh: dict, done: dict | None = None) -> torch.nn.Module:
    """A structural copy of ``module``: new module objects (with their own containers: hooks, weight
    function lists, ...) holding the tensors of ``fresh`` ({id(old tensor): new tensor}); other
    attributes (configs, latent formats) are shared, never deep-copied."""
    done = {} if done is None else done
    if id(module) in done:
        return done[id(module)]
    new = copy.copy(module)
    done[id(module)] = new
    for k, v in list(new.__dict__.items()):
        if isinstance(v, (dict, list, set)) and k not in ("_parameters", "_buffers", "_modules"):
            new.__dict__[k] = copy.copy(v)
    new._parameters = {k: (None if p is None else fresh[id(p)]) for k, p in module._parameters.items()}
    new._buffers = {k: (None if b is None else fresh[id(b)]) for k, b in module._buffers.items()}
    new._modules = {k: (None if c is None else _copy_module(c, fresh, done)) for k, c in module._modules.items()}
    return new


def _private_model(model):
    """Deep copy of ``model.model`` with the ORIGINAL (unpatched) weights as fresh, frozen tensors on
    the offload device, and none of the loaded state of the source (lowvram weight functions,
    patch ids, loaded-memory counters)."""
    base = model.model
    backup = getattr(model, "backup", {}) or {}
    offload = model.offload_device
    fresh = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, p in base.named_parameters():
            src = backup[name].weight if name in backup else p
            fresh[id(p)] = torch.nn.Parameter(src.detach().to(offload, copy=True), requires_grad=False)
        for name, b in base.named_buffers():
            if b is not None:
                src = backup[name].weight if name in backup else b
                fresh[id(b)] = src.detach().to(offload, copy=True)
    new = _copy_module(base, fresh)
    for m in new.modules():
        if hasattr(m, "weight_function"):
            m.weight_function = []
        if hasattr(m, "bias_function"):
            m.bias_function = []
        for attr in ("comfy_patched_weights", "prev_comfy_cast_weights"):
            if attr in m.__dict__:
                delattr(m, attr)
    new.model_loaded_weight_memory = 0
    new.model_offload_buffer_memory = 0
    new.lowvram_patch_counter = 0
    new.model_lowvram = False
    new.current_weight_patches_uuid = None
    new.device = offload
    return new


def trainable_patcher(model):
    """A clone of the MODEL ``model`` whose diffusion model can be trained through weight wrappers,
    leaving ``model`` (its patcher, module and every tensor) exactly as other nodes use it."""
    import comfy.model_patcher
    strategy = copy_strategy(model)
    with torch.inference_mode(False):
        if strategy == "share":
            mp = model.clone()
        elif strategy == "host-deepcopy":
            mp = model.clone(disable_dynamic=True, force_deepcopy=True)
        else:
            new = _private_model(model)
            if "model_override" in _clone_params(model):  # 0.33+: the host's own clone path
                tmp = comfy.model_patcher.ModelPatcher(new, model.load_device, model.offload_device)
                mp = model.clone(disable_dynamic=True, model_override=tmp.get_clone_model_override())
            else:  # older hosts: a clone re-pointed at the copy, with backups of its own
                mp = model.clone()
                mp.model = new
                for attr in ("backup", "backup_buffers", "object_patches_backup", "hook_backup"):
                    if isinstance(getattr(mp, attr, None), dict):
                        setattr(mp, attr, {})
                if isinstance(getattr(mp, "pinned", None), set):
                    mp.pinned = set()
                mp.size = 0
        if strategy != "share":
            mp.model.requires_grad_(False)
    mp.pcpo_copy_strategy = strategy
    _install_out_of_place_wrapper(mp)
    return mp


def attach_lora(model, rank: int, alpha: float, preset: str, extra_regex: str = "", seed: int = 0,
                dtype=torch.float32, adapters: dict | None = None, compute_dtype=None,
                checkpointing: bool = False):
    """A trainable clone of ``model`` (:func:`trainable_patcher`) with LoRA adapters attached.

    Returns (patched clone, {module name: LoRAWeightDelta}).  Existing ``adapters`` (a resumed or
    live session) are re-attached instead of creating new ones.  Base weights are frozen; adapters
    live on the model's load device in fp32.  ``compute_dtype`` (None: the model's own) is the
    dtype every layer computes in, in rollout and gradient pass alike; at fp32 the adapters are
    weight wrappers (``W + delta``), at 16 bits a branch computed in fp32 beside the layer (see
    ``LoRAWeightDelta.bypass``).  ``checkpointing`` recomputes each block's activations in the
    backward pass instead of keeping them (:func:`checkpoint_blocks`).
    """
    from comfyui_pcpo.run_state import new_adapters
    if adapters is None:
        shapes = dict(denoiser_weights(model))
        targets = select_targets(list(shapes.items()), preset, extra_regex)
        if not targets:
            raise ValueError(f"target layers {preset!r} matched no layer of this {model_family(model).arch} "
                             "model; try 'all-linear'")
        adapters = new_adapters(shapes, targets, rank, alpha, seed, device=model.load_device, dtype=dtype)
        capped = sorted((ad.rank, n) for n, ad in adapters.items() if ad.rank < int(rank))
        if capped:  # a LoRA's rank cannot exceed its layer's size: said, never silent
            log.warning(
                "PCPO: rank %d is larger than %d of %d target layers; they train at their own size (smallest: %s "
                "at rank %d), with alpha scaled to keep alpha / rank", int(rank), len(capped), len(adapters),
                capped[0][1], capped[0][0])
    mp = trainable_patcher(model)
    if compute_dtype is not None:
        mp.set_model_compute_dtype(compute_dtype)
    dm = mp.model.diffusion_model
    branch = compute_dtype is not None and compute_dtype != torch.float32
    for name, ad in adapters.items():
        if branch:
            mp.add_object_patch(f"diffusion_model.{name}.forward", lora_branch_forward(dm.get_submodule(name), ad))
        else:
            mp.add_weight_wrapper(f"diffusion_model.{name}.weight", ad)
    if checkpointing:
        for name in checkpoint_blocks(dm):
            mp.add_object_patch(f"diffusion_model.{name}.forward", checkpointed_forward(dm.get_submodule(name)))
    mp.pcpo_compute_dtype, mp.pcpo_checkpointing = compute_dtype, bool(checkpointing)
    return mp, adapters


def load_for_training(mp, latent_shape, batch: int) -> None:
    """Load the trainable clone whole for a gradient pass, with a training-sized memory estimate
    (backward keeps activations: several times inference's, less with checkpointing); refuse a
    partial (low-VRAM) load, under which offloaded weights' copies would stay alive for backward."""
    mm = comfy.model_management
    try:
        per_pass = float(mp.model.memory_required([2 * int(batch), *latent_shape]))
    except Exception:
        per_pass = 0.0
    factor = 2.0 if getattr(mp, "pcpo_checkpointing", False) else 6.0
    mm.load_models_gpu([mp], memory_required=per_pass * factor, force_full_load=True)
    loaded, size = mp.loaded_size(), mp.model_size()
    if getattr(mp.model, "model_lowvram", False) or (size > 0 and loaded < size):
        gb = 1024 ** 3
        raise RuntimeError(
            f"PCPO training needs the whole model on {mp.load_device} for the gradient pass, but ComfyUI could "
            f"load only {loaded / gb:.1f} of {size / gb:.1f} GB (low-VRAM mode or too little free memory). Turn "
            "gradient_checkpointing on, lower micro_batch, use an fp8 checkpoint, close other models, or start "
            "ComfyUI without --lowvram/--novram.")


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
    model call.  ``predict.k_model`` and ``predict.extra_args`` are that call as ComfyUI's
    k-diffusion sampler functions take it (``k_sample`` runs one of them).  Returns fn's result."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)

    def inner(model_wrap, extra_args):
        def predict(x, sigma):
            return model_wrap(x, sigma.to(x.device, x.dtype), **extra_args)
        wrap = getattr(comfy.samplers, "KSamplerX0Inpaint", None)  # as KSAMPLER wraps the guider
        predict.k_model = wrap(model_wrap, torch.as_tensor(sigmas)) if wrap is not None else model_wrap
        predict.extra_args = dict(extra_args, denoise_mask=None)
        return fn(predict)

    s = _CallbackSampler(inner)
    zeros = torch.zeros(latent_shape)
    guider.sample(zeros, zeros, s, torch.as_tensor(sigmas, dtype=torch.float32), disable_pbar=True, seed=seed)
    return s.result


def _install_out_of_place_wrapper(mp) -> None:
    """Route the diffusion-model call of ``mp`` through :func:`out_of_place_residuals` whenever it
    runs with grad (a gradient pass); sampling is untouched.  Chains an existing wrapper."""
    previous = mp.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        call = (lambda: previous(apply_model, args)) if previous is not None else \
            (lambda: apply_model(args["input"], args["timestep"], **args["c"]))
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            with out_of_place_residuals():
                return call()
        return call()
    wrapper.pcpo_out_of_place = True
    if previous is not None and getattr(previous, "pcpo_out_of_place", False):
        return
    mp.set_model_unet_function_wrapper(wrapper)


@contextlib.contextmanager
def training_flag():
    """ComfyUI's ``in_training`` flag (0.33+; absent before): set, the host takes differentiable code
    paths (e.g. FLUX's eager RoPE instead of the comfy-kitchen kernel, which has no backward).  Where
    the host's FLUX RoPE is still not differentiable (releases with the kernel but without the flag),
    :func:`host_caps.differentiable_flux_rope` puts a torch RoPE in its place for the duration.
    The rollout enters this too, so that rollout and gradient pass run the same numerics."""
    mm = comfy.model_management
    has_flag = hasattr(mm, "in_training")
    old = mm.in_training if has_flag else None
    if has_flag:
        mm.in_training = True
    try:
        with host_caps.differentiable_flux_rope():
            yield
    finally:
        if has_flag:
            mm.in_training = old


@contextlib.contextmanager
def training_mode():
    """A gradient pass: grad on, inference mode off, and :func:`training_flag`, as ComfyUI's own
    trainer does."""
    with torch.inference_mode(False), torch.enable_grad(), training_flag():
        yield


def interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()
