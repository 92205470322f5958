"""PCPO Export LoRA: write a training session's adapters as a kohya LoRA (loads in ComfyUI's
LoraLoader, A1111/Forge and diffusers) into ComfyUI's ``loras`` folder, optionally plus a
diffusers/PEFT file for SD1.x/SD2.x/SDXL UNets."""
from __future__ import annotations

import logging
import os

import torch

import comfy.utils
import folder_paths

from comfyui_pcpo import distributed
from comfyui_pcpo.export import (
    DTYPES,
    diffusers_output_path,
    kohya_name_map,
    kohya_state_dict,
    lora_metadata,
    module_map_from_diffusers_keys,
    network_dim_alpha,
    peft_metadata,
    peft_state_dict,
    safe_output_path,
    write_lora,
)

from .validation import verdict

log = logging.getLogger("comfyui-pcpo")


def _is_sdxl(model) -> bool:
    import comfy.model_base as mb
    classes = tuple(getattr(mb, n) for n in ("SDXL", "SDXLRefiner") if hasattr(mb, n))
    return isinstance(getattr(model, "model", None), classes)


def lora_name_maps(model) -> tuple[dict, dict]:
    """(kohya name map, diffusers module map) for a MODEL (ModelPatcher), both {ldm module: name}.

    The diffusers map is empty for models that are not diffusers ``UNet2DConditionModel``-shaped
    (SD3, FLUX, ...); the kohya map follows ``comfyui_pcpo.export.kohya_name_map``."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    try:
        d2l = comfy.utils.unet_to_diffusers(unet_config)
    except Exception:  # an unusual UNet layout: ldm names only
        d2l = {}
    sdxl = _is_sdxl(model)
    embedding = "add_embedding" if sdxl else "class_embedding"  # label_emb's diffusers name
    module_map = module_map_from_diffusers_keys(d2l, embedding=embedding) if d2l else {}
    return kohya_name_map(module_map, sdxl=sdxl), module_map


def _session_metadata(session) -> dict:
    md = session.metadata() if callable(getattr(session, "metadata", None)) else {}
    return {str(k): (v if isinstance(v, str) else str(v)) for k, v in dict(md or {}).items()}


def _clear_lora_list_cache() -> None:
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
    helper = getattr(folder_paths, "cache_helper", None)
    if helper is not None and isinstance(getattr(helper, "cache", None), dict):
        helper.cache.pop("loras", None)


RUN_TOKEN = "{run}"  # in an export name: replaced by the run name


def filename_error(filename, label: str = "filename", run_name: str | None = None) -> str | None:
    """Why ``filename`` cannot be an export name in the loras folder (the message starts with
    ``label``), or None when it can (or is not a constant).  ``{run}`` becomes ``run_name`` (when
    not known yet: a stand-in name; the run name has its own check)."""
    if not isinstance(filename, str):
        return None
    try:
        safe_output_path(folder_paths.get_folder_paths("loras")[0], filename.replace(RUN_TOKEN, run_name or "run"),
                         label=label)
    except ValueError as e:
        return str(e)
    return None


class PCPOExportLoRA:
    """Save the session's LoRA as a kohya-format .safetensors in the loras folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "session": ("PCPO_SESSION", {
                    "tooltip": "The PCPO training session whose LoRA to save (its current adapters)."}),
                "filename": ("STRING", {
                    "default": "pcpo/{run}",
                    "tooltip": "File name relative to ComfyUI's first loras folder; subfolders allowed "
                               "(e.g. 'pcpo/run1'), '.safetensors' is appended, {run} becomes the run name "
                               "(the default 'pcpo/{run}' gives every run its own file). Absolute paths and '..' "
                               "are rejected. An existing file of that name is replaced."}),
                "dtype": (["fp16", "bf16", "fp32"], {
                    "default": "fp16",
                    "tooltip": "Precision of the saved LoRA weights. fp16 is the common choice and loads "
                               "everywhere; fp32 keeps the trained values exactly."}),
                "also_diffusers": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also write a diffusers/PEFT copy for SD1.x/SD2.x/SDXL UNets into ComfyUI's "
                               "output folder (FILENAME_diffusers/pytorch_lora_weights.safetensors, for "
                               "pipe.load_lora_weights); skipped with a warning for other models. The main "
                               "kohya file already loads in diffusers too."}),
            },
            "optional": {
                "stats": ("STRING", {
                    "forceInput": True,
                    "tooltip": "Wire the PCPO LoRA Update's stats here so the export runs after this "
                               "iteration's update (otherwise it may save the LoRA from before it)."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the saved kohya LoRA file.",)
    FUNCTION = "export"
    CATEGORY = "PCPO"
    OUTPUT_NODE = True
    DESCRIPTION = ("Save the PCPO session's LoRA as a kohya-format safetensors file (loads in ComfyUI's "
                   "LoraLoader, A1111/Forge and diffusers) with training provenance in its metadata.")

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the session is mutable state: always write its current adapters

    @classmethod
    def VALIDATE_INPUTS(cls, filename=None):
        """A bad file name is refused when the prompt is queued (see nodes/validation.py)."""
        return verdict(cls, filename=filename)

    @classmethod
    def pcpo_checks(cls, values: dict, run_name=None) -> list:
        return [filename_error(values.get("filename"), "filename", run_name)]

    def export(self, session, filename, dtype="fp16", also_diffusers=False, stats=None):
        if dtype not in DTYPES:
            raise ValueError(f"PCPO Export LoRA: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        session = session.live() if callable(getattr(session, "live", None)) else session
        adapters = getattr(session, "adapters", None)
        if not adapters:
            raise ValueError("PCPO Export LoRA: the session has no LoRA adapters to save")
        root = folder_paths.get_folder_paths("loras")[0]
        if RUN_TOKEN in filename:  # run names are checked by PCPO LoRA
            run_name = getattr(session, "run_name", "")
            if not run_name:
                raise ValueError(f"PCPO Export LoRA: {RUN_TOKEN} in the file name needs a session with a run name")
            filename = filename.replace(RUN_TOKEN, run_name)
        path = safe_output_path(root, filename, label="filename")
        tdtype = DTYPES[dtype]
        if not distributed.is_writer():  # several processes: rank 0 writes the file
            return {"ui": {"text": [f"rank {distributed.context()[0]}: rank 0 writes {path}"]}, "result": (path,)}
        family = session.family
        kohya_map, diffusers_map = lora_name_maps(session.model)

        rank, alpha = network_dim_alpha(adapters)
        smd = _session_metadata(session)

        def pick(key):
            return smd.get(f"pcpo_{key}", smd.get(key, ""))

        extra = {k: v for k, v in smd.items()
                 if k not in {f"pcpo_{n}" for n in ("reward", "objective", "steps", "settings")}
                 and k not in ("reward", "objective", "steps", "settings")}
        md = lora_metadata(arch=family.arch, rank=rank, alpha=alpha, prediction=family.prediction,
                           reward=pick("reward"), objective=pick("objective"), steps=pick("steps") or 0,
                           settings=pick("settings") or None,
                           title=os.path.splitext(os.path.basename(path))[0], extra=extra)

        with torch.inference_mode(False), torch.no_grad():
            tensors = kohya_state_dict(adapters, tdtype, kohya_map)
            write_lora(path, tensors, md)
            lines = [f"saved {len(adapters)} LoRA layers (rank {rank}, alpha {alpha:g}, {dtype}) to {path}"]
            if also_diffusers:
                unmapped = [m for m in adapters if m not in diffusers_map]
                if not diffusers_map or unmapped:
                    msg = (f"diffusers copy skipped: a diffusers/PEFT file is only written for SD1.x/SD2.x/SDXL "
                           f"UNets (this model is {family.arch}"
                           + (f"; {len(unmapped)} layers have no diffusers name, e.g. {unmapped[0]!r}" if unmapped and diffusers_map else "")
                           + "). The kohya file above is the one to use.")
                    log.warning("PCPO Export LoRA: %s", msg)
                    lines.append(msg)
                else:
                    dpath = diffusers_output_path(folder_paths.get_output_directory(), filename)
                    write_lora(dpath, peft_state_dict(adapters, diffusers_map, tdtype),
                               {**{k: v for k, v in md.items() if not k.startswith("ss_")},  # not kohya
                                **peft_metadata(adapters, diffusers_map)})
                    lines.append(f"diffusers copy: {dpath}")
        _clear_lora_list_cache()
        for ln in lines:
            log.info("PCPO Export LoRA: %s", ln)
        return {"ui": {"text": lines}, "result": (path,)}


NODE_CLASS_MAPPINGS = {"PCPOExportLoRA": PCPOExportLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOExportLoRA": "PCPO Export LoRA"}
