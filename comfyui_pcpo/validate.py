"""Checks of a node's inputs before any work: numbers, lists, names and memory (no ComfyUI import).

* :func:`check_inputs` checks constant widget values against a node's ``INPUT_TYPES`` spec: every
  INT/FLOAT finite and inside its declared min/max (an INT without one inside int64; none above
  2**64 - 1, the largest seed a generator takes), every list (combo) value in its list.  A host
  that skips its own range checks for an input (ComfyUI does for every input a node's
  ``VALIDATE_INPUTS`` takes) still gets them, and NaN, which passes a ``min <= v <= max`` test
  written as two comparisons, is refused.
* :func:`name_error` is the one name rule of run names and file names (export, best LoRA).
* :func:`memory_estimate` / :func:`memory_error` bound the memory one iteration needs, so sizes
  that cannot fit are refused before sampling with the inputs named.

Every message names the input, the value and what to do.
"""
from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
UINT64_MAX = 2 ** 64 - 1
NAME_MAX = 128  # characters of a run name or of a file name (subfolders included, before ".safetensors")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DRIVE = re.compile(r"[A-Za-z]:")
_RESERVED = set('<>:"|?*')  # not allowed in Windows file names
_LIST_SHOWN = 20


def input_specs(input_types: Mapping) -> dict:
    """{name: (type, options)} of the required and optional inputs of an ``INPUT_TYPES`` dict."""
    out = {}
    for cat in ("required", "optional"):
        for name, spec in dict(input_types.get(cat) or {}).items():
            spec = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
            typ = spec[0] if spec else None
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            out[name] = (typ, opts)
    return out


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range(opts: Mapping, lo_default=None, hi_default=None) -> str:
    lo, hi = opts.get("min", lo_default), opts.get("max", hi_default)
    if lo is not None and hi is not None:
        return f"from {_fmt(lo)} to {_fmt(hi)}"
    if lo is not None:
        return f"at least {_fmt(lo)}"
    if hi is not None:
        return f"at most {_fmt(hi)}"
    return "a finite number"


def check_value(name: str, typ, opts: Mapping, value, open_list: bool = False) -> Optional[str]:
    """Why ``value`` cannot be input ``name`` of type ``typ`` (a type name or a list of choices)
    with options ``opts`` (min/max), or None when it can.  ``None`` (a linked input: its value is
    not known yet) passes.  ``open_list``: a list input whose value is checked elsewhere."""
    if value is None:
        return None
    if typ == "FLOAT":
        if isinstance(value, bool):
            return f"{name} {value!r} is not a number: set a number {_range(opts)}"
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            return f"{name} {value!r} is not a number: set a number {_range(opts)}"
        if not math.isfinite(v):
            return f"{name} is {v}: it must be a finite number {_range(opts)}"
        if "min" in opts and v < opts["min"]:
            return f"{name} {v:g} is below its minimum {_fmt(opts['min'])}: set a value {_range(opts)}"
        if "max" in opts and v > opts["max"]:
            return f"{name} {v:g} is above its maximum {_fmt(opts['max'])}: set a value {_range(opts)}"
        return None
    if typ == "INT":
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                return f"{name} {value!r} is not a whole number: set an integer {_range(opts, INT64_MIN, INT64_MAX)}"
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value).strip())
            except (TypeError, ValueError):
                return f"{name} {value!r} is not a whole number: set an integer {_range(opts, INT64_MIN, INT64_MAX)}"
        lo = max(opts.get("min", INT64_MIN), INT64_MIN)
        hi = min(opts.get("max", INT64_MAX), UINT64_MAX)
        if value < lo:
            return f"{name} {value} is below its minimum {lo}: set an integer from {lo} to {hi}"
        if value > hi:
            return f"{name} {value} is above its maximum {hi}: set an integer from {lo} to {hi}"
        return None
    if isinstance(typ, (list, tuple)) and not open_list:
        if value not in typ:
            shown = ", ".join(repr(c) for c in list(typ)[:_LIST_SHOWN])
            more = f" (and {len(typ) - _LIST_SHOWN} more)" if len(typ) > _LIST_SHOWN else ""
            return f"{name} {value!r} is not one of the choices: pick one of {shown}{more}"
        return None
    if typ == "STRING" and not isinstance(value, str):
        return f"{name} must be text, got {type(value).__name__}"
    return None


def check_inputs(input_types: Mapping, values: Mapping, open_lists: Iterable[str] = ()) -> list:
    """Messages for every input in ``values`` (constant values by name; None = linked) that its
    ``INPUT_TYPES`` spec refuses (see :func:`check_value`); inputs not in the spec are ignored."""
    specs = input_specs(input_types)
    open_lists = set(open_lists)
    errors = []
    for name, value in values.items():
        if name in specs:
            typ, opts = specs[name]
            err = check_value(name, typ, opts, value, open_list=name in open_lists)
            if err:
                errors.append(err)
    return errors


# ----------------------------------------------------------------------------- names

def _control(text: str) -> Optional[str]:
    for ch in text:
        if unicodedata.category(ch).startswith("C"):  # control, format, unassigned, private use
            return ch
    return None


def name_error(label: str, value, kind: str = "file", allow_empty: bool = False,
               max_len: int = NAME_MAX) -> Optional[str]:
    """Why ``value`` cannot be the name ``label`` (None when it can): the one rule of run names
    (``kind="run"``: letters, digits, '_', '-', '.', starting with a letter or digit, no '..') and
    file names (``kind="file"``: a relative path, subfolders with '/', no '..', no absolute path
    or drive letter, none of ``<>:"|?*``, no leading or trailing space).  Both: no control
    character, at most ``max_len`` characters.  The whole value must match: a trailing newline is
    refused too."""
    if kind == "run":
        hint = "use letters, digits, '_', '-' or '.' (starting with a letter or digit; no spaces, slashes or '..'), e.g. 'pcpo_run'"
    else:
        hint = ("use a relative name such as 'pcpo/my_lora' (subfolders with '/', no '..', no leading '/' or "
                "drive letter)")
    if not isinstance(value, str):
        return f"{label} must be text, got {type(value).__name__}: {hint}"
    if value == "":
        return None if allow_empty else f"{label} {value!r} is empty: {hint}"
    shown = value if len(value) <= 60 else value[:60] + "..."
    if len(value) > max_len:
        return f"{label} {shown!r} is {len(value)} characters long, more than {max_len}: {hint}, shorter"
    bad = _control(value)
    if bad is not None:
        return f"{label} {shown!r} contains the control character {bad!r} (a newline or tab?): remove it; {hint}"
    if kind == "run":
        if not _RUN_NAME.fullmatch(value) or ".." in value:
            return f"{label} {shown!r} is not valid: {hint}"
        return None
    norm = value.replace("\\", "/")
    if os.path.isabs(value) or norm.startswith("/") or _DRIVE.match(norm):
        return f"{label} {shown!r} is an absolute path: {hint}"
    if any(p.strip() == ".." for p in norm.split("/")):
        return f"{label} {shown!r} contains '..': {hint}"
    reserved = sorted(set(value) & _RESERVED)
    if reserved:
        return f"{label} {shown!r} contains {''.join(reserved)!r}, which file names cannot hold: {hint}"
    if norm.strip() != norm:
        return f"{label} {shown!r} starts or ends with a space: {hint}"
    if norm.endswith("/") or not norm.strip("/. "):
        return f"{label} {shown!r} names a folder, not a file: {hint}"
    return None


# ----------------------------------------------------------------------------- memory

GiB = 2 ** 30
# activations one sample keeps for the gradient pass, as a multiple of the denoiser's size in
# bytes, at a latent of REF_LATENT_ELEMENTS (SD1.5 at 512x512: 4 x 64 x 64); they grow with the
# latent's size.  A low figure on purpose: the estimate refuses sizes that cannot fit, not sizes
# that might.  Gradient checkpointing keeps about a quarter of them.
ACTIVATION_FACTOR = 1.0
CHECKPOINTED_FACTOR = 0.25
REF_LATENT_ELEMENTS = 4 * 64 * 64
RECORD_COPIES = 2  # the per-group records and their concatenation into one trajectory


@dataclass(frozen=True)
class MemoryEstimate:
    rollout_bytes: int      # the recorded rollout, kept in host memory
    gradient_bytes: int     # activations of one micro-batch in the gradient pass, on the device

    def describe(self) -> str:
        return (f"recorded rollout {self.rollout_bytes / GiB:.3g} GiB (host memory), gradient pass "
                f"{self.gradient_bytes / GiB:.3g} GiB per micro-batch")


def memory_estimate(samples: int, steps: int, latent_elements: int, model_bytes: int = 0,
                    micro_batch: Optional[int] = None, guided: bool = True, checkpointing: bool = False,
                    storage_bytes: int = 4) -> MemoryEstimate:
    """A lower bound of the memory of one iteration.

    rollout  = RECORD_COPIES x samples x (3 steps + 1) x latent_elements x storage_bytes
               (every sample records steps + 1 latents, steps noises and steps predictions, fp32);
    gradient = micro_batch x (2 if guided else 1) x model_bytes x latent_elements / REF_LATENT_ELEMENTS
               x ACTIVATION_FACTOR (x CHECKPOINTED_FACTOR with gradient checkpointing): the guided
               prediction runs the conditional and unconditional halves of each sample.
    """
    rollout = RECORD_COPIES * int(samples) * (3 * int(steps) + 1) * int(latent_elements) * int(storage_bytes)
    gradient = 0
    if micro_batch:
        factor = ACTIVATION_FACTOR * (CHECKPOINTED_FACTOR if checkpointing else 1.0)
        rows = int(micro_batch) * (2 if guided else 1)
        gradient = int(rows * model_bytes * factor * int(latent_elements) / REF_LATENT_ELEMENTS)
    return MemoryEstimate(rollout, gradient)


def memory_error(est: MemoryEstimate, host_available: Optional[int], device_available: Optional[int],
                 sizes: str, same_memory: bool = False) -> Optional[str]:
    """Why ``est`` cannot fit (None when it may): ``host_available`` / ``device_available`` bytes
    (None: unknown, not checked); ``same_memory``: the device computes in host memory (a CPU), so
    both parts share it.  ``sizes`` names the inputs and their values, for the message."""
    fix_rollout = "lower group_size, the number of groups (groups / prompts_per_iteration), steps or width/height"
    fix_grad = "lower micro_batch (PCPO LoRA Update), width/height, or turn gradient_checkpointing on"
    if same_memory:
        need = est.rollout_bytes + est.gradient_bytes
        if host_available is not None and need > host_available:
            return (f"this iteration needs at least {need / GiB:.3g} GiB of memory ({est.describe()}; {sizes}) but "
                    f"{host_available / GiB:.3g} GiB are available: {fix_rollout}, or {fix_grad}")
        return None
    if host_available is not None and est.rollout_bytes > host_available:
        return (f"the recorded rollout needs at least {est.rollout_bytes / GiB:.3g} GiB of host memory ({sizes}) but "
                f"{host_available / GiB:.3g} GiB are available: {fix_rollout}")
    if device_available is not None and est.gradient_bytes > device_available:
        return (f"the gradient pass needs at least {est.gradient_bytes / GiB:.3g} GiB of device memory per "
                f"micro-batch ({sizes}) but {device_available / GiB:.3g} GiB are free: {fix_grad}")
    return None
