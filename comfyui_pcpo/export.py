"""LoRA export: kohya-format safetensors that ComfyUI, A1111/Forge and diffusers all load, an
optional diffusers/PEFT file, safe output paths, atomic writes and metadata.  No ComfyUI import.

Key naming (one kohya file that loads everywhere)
-------------------------------------------------
Every adapter becomes ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(explicit alpha tensors, conv weights 4-D: down (r, in, kh, kw), up (out, r, 1, 1)).  ``<module>``
is a module path with ``.`` -> ``_``, in the naming each family's kohya files use:

* SD1.x / SD2.x UNets: the *diffusers* module path (``down_blocks_0_attentions_0_...``), kohya's
  own SD1.x naming.  diffusers' SD1.x loader converts kohya keys by string replacement and never
  remaps ldm block numbers (only the SDXL pipeline passes a unet_config to
  ``_maybe_map_sgm_blocks_to_diffusers``), so ldm names (``input_blocks_1_1_...``) load into the
  wrong or no layers there.  ComfyUI maps the diffusers names through
  ``comfy.utils.unet_to_diffusers`` and A1111 through ``convert_diffusers_name_to_compvis``.
* SDXL UNets: the ldm/sgm module path (``input_blocks_4_1_...``), kohya's SDXL naming.  diffusers'
  SDXL loader remaps sgm blocks; A1111 uses the names as they are (its diffusers-name converter
  assumes the SD1.x up-block layout and misplaces SDXL's first upsampler).
* Everything else (SD3 MMDiT, FLUX, ...): the ldm/BFL module path as ComfyUI names it (ComfyUI
  maps ``lora_unet_<ldm>`` for every model; diffusers converts kohya-FLUX keys).
* ``label_emb`` (SDXL / unCLIP adm MLP) always keeps its ldm name: diffusers' kohya converter
  mangles ``add_embedding_linear_1`` but maps ``label_emb_0_0``.

The node layer computes the ldm -> diffusers module map from ComfyUI's
``comfy.utils.unet_to_diffusers(unet_config)`` (``module_map_from_diffusers_keys``) and picks the
kohya names with ``kohya_name_map``; this module never imports ComfyUI.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import torch

from .lora import LoRAWeightDelta, kohya_name
from .atomic import atomic_save_safetensors
from .validate import name_error

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Modules that keep their ldm name in kohya files even when a diffusers name exists.
KOHYA_KEEP_LDM_PREFIXES = ("label_emb.",)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name

# kohya ``ss_base_model_version`` / modelspec architecture per ComfyUI model-config class name.
_BASE_VERSION = {
    "SD15": ("sd_v1", "stable-diffusion-v1"),
    "SD15_instructpix2pix": ("sd_v1", "stable-diffusion-v1"),
    "SD20": ("sd_v2", "stable-diffusion-v2-512"),
    "SD21UnclipL": ("sd_v2", "stable-diffusion-v2-512"),
    "SD21UnclipH": ("sd_v2", "stable-diffusion-v2-512"),
    "SDXL": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "SDXLRefiner": ("sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner"),
    "SSD1B": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "Segmind_Vega": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "SD3": ("sd3", "stable-diffusion-3-medium"),
    "Flux": ("flux1", "flux-1-dev"),
    "FluxSchnell": ("flux1", "flux-1-schnell"),
}


# ----------------------------------------------------------------------------- key names

def module_map_from_diffusers_keys(diffusers_to_ldm: Mapping[str, str],
                                   embedding: str = "add_embedding") -> dict[str, str]:
    """Invert ComfyUI's ``unet_to_diffusers`` key map ({diffusers key: ldm key}) into
    {ldm module: diffusers module} over ``.weight`` entries.

    ``label_emb`` has two diffusers spellings; ``embedding`` picks ``"add_embedding"`` (SDXL's
    text-time MLP) or ``"class_embedding"`` (SD2 unCLIP).
    """
    out: dict[str, str] = {}
    for dk, lk in diffusers_to_ldm.items():
        if not (dk.endswith(".weight") and lk.endswith(".weight")):
            continue
        dmod, lmod = dk[:-len(".weight")], lk[:-len(".weight")]
        if dmod.startswith(("add_embedding.", "class_embedding.")) and not dmod.startswith(embedding + "."):
            continue
        out[lmod] = dmod
    return out


def kohya_name_map(module_map: Mapping[str, str], sdxl: bool = False) -> dict[str, str]:
    """{ldm module: name used in kohya keys} from an ldm -> diffusers module map (module doc):
    diffusers names for SD1.x/SD2.x UNets, none (ldm names) for SDXL, never for ``label_emb``."""
    if sdxl:
        return {}
    return {k: v for k, v in module_map.items() if not k.startswith(KOHYA_KEEP_LDM_PREFIXES)}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown export dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _pad_rank(down: torch.Tensor, up: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad kohya-layout down (k, ...) / up (out, k, ...) to rank r (same product)."""
    k = down.shape[0]
    if k >= r:
        return down, up
    down = torch.cat([down, down.new_zeros((r - k, *down.shape[1:]))], dim=0)
    up = torch.cat([up, up.new_zeros((up.shape[0], r - k, *up.shape[2:]))], dim=1)
    return down, up


def kohya_state_dict(adapters: Mapping[str, LoRAWeightDelta], dtype=torch.float16,
                     module_name_map: Optional[Mapping[str, str]] = None,
                     uniform: bool = True) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` in ``dtype``
    and ``.alpha`` (fp32 scalar; fp16/bf16 would round alpha / rank, and every loader reads it
    with ``.item()``).

    ``adapters``: {module name inside diffusion_model (ldm/ComfyUI naming): LoRAWeightDelta}.
    ``module_name_map``: optional {ldm module: name to use in the key} (diffusers names for UNets,
    from ``kohya_name_map``); modules missing from it keep their ldm name.
    ``uniform``: write one rank R and one alpha A for every layer (``network_dim_alpha``): layers
    whose rank was capped at min(out, in) are zero-padded to R and any differing alpha / rank is
    folded into ``lora_up``.  Same weights in every loader, and it sidesteps diffusers' kohya
    loader, which drops per-layer alphas of attention layers (its ``alpha_pattern`` keys keep the
    old ``processor.to_q_lora`` names and match no module), loading them at the wrong strength.
    """
    dt = _dtype(dtype)
    names = module_name_map or {}
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    if uniform and adapters:
        r_ref, a_ref = network_dim_alpha(adapters)
        s_ref = a_ref / r_ref
    for module, ad in adapters.items():
        stem = kohya_name(names.get(module, module))
        if stem in seen:
            raise ValueError(f"modules {seen[stem]!r} and {module!r} both export as {stem!r}")
        seen[stem] = module
        kt = ad.kohya_tensors(torch.float32)
        down, up, alpha = kt["lora_down.weight"], kt["lora_up.weight"], float(ad.alpha)
        if uniform:
            if ad.scale != s_ref:
                up = up * (ad.scale / s_ref)
            down, up = _pad_rank(down, up, r_ref)
            alpha = a_ref
        out[f"{stem}.lora_down.weight"] = down.to(dt).cpu().contiguous()
        out[f"{stem}.lora_up.weight"] = up.to(dt).cpu().contiguous()
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def peft_state_dict(adapters: Mapping[str, LoRAWeightDelta], module_name_map: Mapping[str, str],
                    dtype=torch.float16, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA tensors: ``<prefix>.<diffusers module>.lora_A.weight`` (= down) and
    ``.lora_B.weight`` (= up * alpha / rank: PEFT keeps alpha outside the tensors, so the scale is
    folded into B and the file loads at full strength with lora_alpha = r, see ``peft_metadata``).
    Conv adapters are 4-D (A: (r, in, kh, kw), B: (out, r, 1, 1)).  Layers whose rank was capped
    below the others are zero-padded to the common rank (same product), so one ``r`` describes
    the file and no per-layer ``rank_pattern`` is needed.  Every adapter must have a diffusers name
    in ``module_name_map`` ({ldm module: diffusers module})."""
    dt = _dtype(dtype)
    missing = [m for m in adapters if m not in module_name_map]
    if missing:
        raise ValueError(f"{len(missing)} adapted layer(s) have no diffusers name (e.g. {missing[0]!r}); "
                         "the diffusers/PEFT export supports SD1.x/SD2.x/SDXL UNets only")
    r = max((int(ad.rank) for ad in adapters.values()), default=1)
    out: dict[str, torch.Tensor] = {}
    pre = f"{prefix}." if prefix else ""
    for module, ad in adapters.items():
        kt = ad.kohya_tensors(torch.float32)
        down, up = _pad_rank(kt["lora_down.weight"], kt["lora_up.weight"] * ad.scale, r)
        name = pre + module_name_map[module]
        out[f"{name}.lora_A.weight"] = down.to(dt).cpu().contiguous()
        out[f"{name}.lora_B.weight"] = up.to(dt).cpu().contiguous()
    return out


def peft_adapter_config(adapters: Mapping[str, LoRAWeightDelta], module_name_map: Mapping[str, str]) -> dict:
    """PEFT ``LoraConfig`` kwargs matching ``peft_state_dict``: r = the common (max) rank and
    lora_alpha = r (the alpha / rank scale is folded into lora_B)."""
    r = max((int(ad.rank) for ad in adapters.values()), default=1)
    return {"r": r, "lora_alpha": r, "target_modules": sorted(module_name_map[m] for m in adapters),
            "lora_dropout": 0.0, "bias": "none", "use_dora": False}


def peft_metadata(adapters: Mapping[str, LoRAWeightDelta], module_name_map: Mapping[str, str],
                  prefix: str = "unet") -> dict[str, str]:
    """safetensors metadata diffusers reads as the adapter config (``lora_adapter_metadata``:
    JSON of ``<prefix>.<LoraConfig field>``, as diffusers' own ``save_lora_weights`` writes it)."""
    cfg = peft_adapter_config(adapters, module_name_map)
    packed = {f"{prefix}.{k}": v for k, v in cfg.items()}
    return {"lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def diffusers_output_path(root: str, name: str) -> str:
    """Where the optional diffusers file for LoRA ``name`` goes under ``root``:
    ``<root>/<name>_diffusers/pytorch_lora_weights.safetensors`` (diffusers' own layout, so
    ``pipe.load_lora_weights("<root>/<name>_diffusers")`` finds it).  The node passes ComfyUI's
    output folder as root, not the loras folder: ComfyUI's LoraLoader would list the PEFT file and
    load only part of it (its key map lacks the PEFT attention names)."""
    stem = safe_output_path(root, name)[:-len(".safetensors")]
    return os.path.join(stem + "_diffusers", DIFFUSERS_WEIGHT_NAME)


# ----------------------------------------------------------------------------- paths and files

def safe_output_path(root: str, name: str, suffix: str = ".safetensors", label: str = "LoRA file name") -> str:
    """Resolve a user-supplied file name (may contain subfolders, e.g. ``"pcpo/run1"``) inside
    ``root``; append ``suffix`` when missing.  Refuses what :func:`comfyui_pcpo.validate.name_error`
    refuses (empty, too long, control characters, absolute paths, ``..`` components, ...), a
    path that is an existing folder, and anything whose real path (symlinks resolved) leaves
    ``root``.  ``label`` names the input in the messages."""
    hint = ("use a relative name such as 'pcpo/my_lora' (subfolders allowed, no '..', no leading "
            f"'/' or drive letter); it is saved inside {root!r}")
    err = name_error(label, name, kind="file")
    if err:
        raise ValueError(f"{err}; it is saved inside {root!r}")
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"{label} {name!r} names a folder, not a file: {hint}")
    if suffix and not parts[-1].lower().endswith(suffix.lower()):
        parts[-1] += suffix
    if parts[-1] == suffix:
        raise ValueError(f"{label} {name!r} has no name before {suffix!r}: {hint}")
    root_abs = os.path.abspath(root)
    path = os.path.join(root_abs, *parts)
    real_root = os.path.realpath(root_abs)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise ValueError(f"{label} {name!r} resolves to {real!r}, outside {real_root!r} "
                         f"(a symlink?): {hint}")
    if os.path.isdir(path):
        raise ValueError(f"{label} {name!r} is the existing folder {path!r}, not a file: use another name, "
                         "or remove that folder")
    return path


def write_lora(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write ``tensors`` + string ``metadata`` to ``path`` atomically (temp file + rename: an
    interrupted write leaves any previous file intact and no temp file behind).  Returns path."""
    md = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must be str -> str, got {k!r}: {type(v).__name__}")
        md[k] = v
    ts = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    atomic_save_safetensors(ts, path, metadata=md)
    return path


# ----------------------------------------------------------------------------- metadata

def network_dim_alpha(adapters: Mapping[str, LoRAWeightDelta]) -> tuple[int, float]:
    """(rank, alpha) of the export (``ss_network_dim`` / ``ss_network_alpha``, and every layer's
    rank / alpha in a uniform kohya file): those of the first highest-rank adapter (ranks are
    capped per layer at min(out, in); the adapter keeps alpha / rank when it caps)."""
    if not adapters:
        raise ValueError("no LoRA adapters to export")
    ad = max(adapters.values(), key=lambda a: a.rank)
    return int(ad.rank), float(ad.alpha)


def _fmt_num(x) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def lora_metadata(*, arch: str, rank: int, alpha: float, prediction: str = "eps", reward: str = "",
                  objective: str = "", steps=0, settings=None, title: str = "",
                  extra: Optional[Mapping[str, object]] = None) -> dict[str, str]:
    """safetensors metadata: kohya ``ss_*`` keys (read by A1111/Forge UIs), a minimal modelspec,
    and our provenance ``pcpo_*`` (base model arch, reward, objective, steps, settings JSON,
    version).  ``extra`` entries are added (stringified) without overriding these keys."""
    from . import __version__
    base_version, spec_arch = _BASE_VERSION.get(arch, (arch.lower(), arch.lower()))
    if isinstance(settings, str):
        settings_json = settings
    else:
        settings_json = json.dumps(settings or {}, sort_keys=True, default=str)
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _fmt_num(alpha),
        "ss_base_model_version": base_version,
        "ss_v2": str(base_version.startswith("sd_v2")),
        "ss_v_parameterization": str(prediction == "v"),
        "ss_training_comment": "trained with comfyui-pcpo (PCPO reinforcement learning)",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_arch}/lora",
        "modelspec.implementation": ("https://github.com/black-forest-labs/flux" if base_version == "flux1"
                                     else "https://github.com/Stability-AI/generative-models"),
        "modelspec.title": title or "PCPO LoRA",
        "pcpo_base_model": str(arch),
        "pcpo_prediction": str(prediction),
        "pcpo_reward": str(reward),
        "pcpo_objective": str(objective),
        "pcpo_steps": str(steps),
        "pcpo_settings": settings_json,
        "pcpo_version": __version__,
    }
    for k, v in (extra or {}).items():
        if k not in md:
            md[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return md
