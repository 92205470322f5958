"""PCPO Implicit Reward Guidance: a MODEL patch that samples with
eps = eps_ref + sum_k lambda_k (eps_lora_k - eps_ref), exactly, with any ComfyUI sampler.

Each model call runs once on a batch holding the input K + 1 times (``comfyui_pcpo.irg``): forward
hooks on the layers a LoRA patches replace, in that LoRA's block of rows, the layer's output by the
output of the LoRA-merged weight (merged as ComfyUI's LoRA loader merges it), so block 0 is the
MODEL as wired and block k that MODEL with LoRA k at strength 1.  The hooks exist only during this
patch's model call, on the sampling thread.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths

from comfyui_pcpo.irg import block_rows, combine, repeat_batch
from comfyui_pcpo.validate import name_error

from .validation import verdict

try:
    import comfy.lora_convert as _lora_convert
except ImportError:  # older ComfyUI: LoRA keys need no conversion
    _lora_convert = None

NONE = "None"
MAX_LORAS = 3


def _string_to_seed(key: str) -> int:
    fn = getattr(comfy.utils, "string_to_seed", None)
    if fn is None:
        import comfy.model_patcher
        fn = comfy.model_patcher.string_to_seed
    return fn(key)


def lora_patches(model, path: str) -> dict:
    """{weight key: [ModelPatcher patch entries]} of the LoRA file at ``path`` on ``model`` (the
    MODEL's own patches first, as ComfyUI applies them)."""
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if _lora_convert is not None:
        sd = _lora_convert.convert_lora(sd)
    loaded = comfy.lora.load_lora(sd, key_map)
    scratch = model.clone()
    applied = set(scratch.add_patches(loaded, 1.0))
    if not applied:
        raise ValueError(f"PCPO Implicit Reward Guidance: the LoRA {path} patches no layer of this model: it was "
                         "trained for another model")
    keys = {k[0] if isinstance(k, tuple) else k for k in applied}
    return {k: list(scratch.patches[k]) for k in keys}


def _original_weight(model, key: str) -> torch.Tensor:
    """The unpatched weight of ``key`` (ComfyUI patches loaded weights in place and keeps a backup)."""
    for lm in getattr(comfy.model_management, "current_loaded_models", []):
        patcher = getattr(lm, "model", None)
        if patcher is not None and getattr(patcher, "model", None) is model.model:
            bk = getattr(patcher, "backup", {}).get(key)
            if bk is not None:
                return bk.weight
    return comfy.utils.get_attr(model.model, key)


def merged_weight(model, key: str, patches: list, device) -> torch.Tensor:
    """The weight of ``key`` with ``patches`` applied exactly as ModelPatcher.patch_weight_to_device does."""
    w = _original_weight(model, key)
    temp = w.to(device=device, dtype=torch.float32, copy=True)
    out = comfy.lora.calculate_weight(patches, temp, key)
    if w.dtype == torch.float32:
        return out
    return comfy.float.stochastic_rounding(out, w.dtype, seed=_string_to_seed(key))


class IRGPatch:
    """The ``model_function_wrapper`` of an IRG model."""

    def __init__(self, model, loras: list, lambdas: list):
        self.model = model
        self.loras = loras            # per LoRA: {weight key: patches}
        self.lambdas = [float(l) for l in lambdas]
        self.previous = model.model_options.get("model_function_wrapper")
        self._merged: dict = {}       # (lora index, key, device) -> merged weight
        self._local = threading.local()

    # the hooks ----------------------------------------------------------------------------
    def _hook(self, key, module):
        modules = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)

        def hook(mod, args, output):
            batch = getattr(self._local, "batch", None)
            if batch is None or not args:
                return None
            x = args[0]
            n = batch * (len(self.loras) + 1)
            if x.shape[0] != n or output.shape[0] != n:
                raise RuntimeError(f"PCPO Implicit Reward Guidance: layer {key} sees a batch of {x.shape[0]} rows, "
                                   f"not the {n} rows of the batched model call; this model reshapes its batch "
                                   "inside and cannot be guided this way")
            out = output.clone()
            bias = getattr(mod, "bias", None)
            bias = None if bias is None else bias.to(x.device, x.dtype)
            for k, patches in enumerate(self.loras):
                if key not in patches:
                    continue
                mk = (k, key, x.device)
                if mk not in self._merged:
                    self._merged[mk] = merged_weight(self.model, key, patches[key], x.device)
                w = self._merged[mk].to(x.dtype)
                rows = block_rows(k + 1, batch)
                if isinstance(mod, modules):
                    out[rows] = mod._conv_forward(x[rows], w, bias)
                else:
                    out[rows] = F.linear(x[rows], w, bias)
            return out

        if not isinstance(module, (torch.nn.Linear,) + modules):
            raise ValueError(f"PCPO Implicit Reward Guidance: the LoRA patches {key} ({type(module).__name__}); "
                             "only linear and convolution layers can be guided")
        return module.register_forward_hook(hook)

    # the wrapper ---------------------------------------------------------------------------
    def __call__(self, apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        batch, copies = x.shape[0], len(self.loras) + 1
        keys = sorted({k for p in self.loras for k in p})
        handles = [self._hook(k, comfy.utils.get_attr(self.model.model, k[:-len(".weight")] if k.endswith(".weight")
                                                       else k)) for k in keys]
        self._local.batch = batch
        try:
            xx, tt = repeat_batch(x, batch, copies), repeat_batch(t, batch, copies)
            cc = repeat_batch(c, batch, copies)
            inner = {"input": xx, "timestep": tt, "c": cc,
                     "cond_or_uncond": list(args.get("cond_or_uncond", [])) * copies}
            if self.previous is not None:
                out = self.previous(apply_model, inner)
            else:
                out = apply_model(xx, tt, **cc)
        finally:
            self._local.batch = None
            for h in handles:
                h.remove()
        return combine(list(out.chunk(copies, 0)), self.lambdas)


def irg_model(model, lora_paths: list, lambdas: list):
    """A clone of ``model`` that samples with Implicit Reward Guidance of the given LoRA files."""
    loras = [lora_patches(model, p) for p in lora_paths]
    m = model.clone()
    m.set_model_unet_function_wrapper(IRGPatch(model, loras, lambdas))
    return m


class PCPOImplicitRewardGuidance:
    CATEGORY = "PCPO"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, sampling with eps_ref + lambda (eps_lora - eps_ref) (use it with any sampler).",)
    DESCRIPTION = ("Implicit Reward Guidance: samples with eps = eps_ref + lambda (eps_lora - eps_ref), computed "
                   "exactly from the base model and the LoRA model in one batched call per step. lambda 0 = base, "
                   "1 = the tuned model, above 1 extrapolates the reward. Unlike LoRA strength (which scales the weights "
                   "and is only a first-order approximation of this), the guidance acts on the prediction itself; "
                   "it costs one more model evaluation per LoRA.")

    @classmethod
    def INPUT_TYPES(cls):
        loras = folder_paths.get_filename_list("loras")
        opt = [NONE] + loras
        inputs = {"required": {
            "model": ("MODEL", {"tooltip": "The base model (the reference of the guidance)."}),
            "lora_name": (loras, {"tooltip": "The PCPO-trained LoRA (from models/loras)."}),
            "guidance": ("FLOAT", {"default": 1.5, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip":
                                   "lambda: 0 = base model, 1 = the LoRA model, 1.5-3 extrapolates the reward "
                                   "(stronger alignment; too high over-saturates)."}),
        }, "optional": {}}
        for i in range(2, MAX_LORAS + 1):
            inputs["optional"][f"lora_name_{i}"] = (opt, {"default": NONE, "tooltip": f"LoRA {i} (optional), with "
                                                          "its own lambda; the guidance terms add up."})
            inputs["optional"][f"guidance_{i}"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                                             "tooltip": f"lambda of LoRA {i}."})
        return inputs

    # whether a LoRA is in models/loras is checked when the node runs, with an error that says where
    # the file comes from (a shipped workflow names the LoRA another workflow trains)
    OPEN_LISTS = ("lora_name", "lora_name_2", "lora_name_3")

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name=None, guidance=None, lora_name_2=None, guidance_2=None, lora_name_3=None,
                        guidance_3=None):
        """Checked when the prompt is queued (see nodes/validation.py): lambdas finite and in range,
        LoRA names relative file names."""
        return verdict(cls, lora_name=lora_name, guidance=guidance, lora_name_2=lora_name_2, guidance_2=guidance_2,
                       lora_name_3=lora_name_3, guidance_3=guidance_3)

    @classmethod
    def pcpo_checks(cls, values: dict, run_name=None) -> list:
        return [name_error(n, values[n], kind="file") for n in cls.OPEN_LISTS
                if values.get(n) is not None and values[n] != NONE]

    def patch(self, model, lora_name, guidance, **kw):
        names, lambdas = [lora_name], [guidance]
        for i in range(2, MAX_LORAS + 1):
            name = kw.get(f"lora_name_{i}", NONE)
            if name and name != NONE:
                names.append(name)
                lambdas.append(kw.get(f"guidance_{i}", 1.0))
        paths = []
        for n in names:
            p = folder_paths.get_full_path("loras", n)
            if p is None:
                raise ValueError(f"PCPO Implicit Reward Guidance: LoRA {n!r} is not in models/loras: train it first "
                                 "(the demo workflow writes pcpo/demo_tiny_pcpo.safetensors) or pick another LoRA")
            paths.append(p)
        return (irg_model(model, paths, lambdas),)


NODE_CLASS_MAPPINGS = {"PCPOImplicitRewardGuidance": PCPOImplicitRewardGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOImplicitRewardGuidance": "PCPO Implicit Reward Guidance"}
