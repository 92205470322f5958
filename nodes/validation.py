"""Queue-time checks of this pack's nodes: the node side of ``comfyui_pcpo.validate``.

ComfyUI checks a widget value against its declared min/max and list only when the node's
``VALIDATE_INPUTS`` does not take that input (a ``**kwargs`` one takes them all), and its check
lets NaN through (``nan < min`` and ``nan > max`` are both false).  So every node of this pack
with a FLOAT input, or with a name to check, has a ``VALIDATE_INPUTS`` that takes exactly those
inputs by name and calls :func:`verdict`, which applies the declared range/list to each of them
(the core :func:`~comfyui_pcpo.validate.check_inputs`) plus the node's own rules
(``pcpo_checks``); ComfyUI still checks the other inputs itself.  ComfyUI files a failed
``VALIDATE_INPUTS`` under each input the function takes; every message starts with the name of
the input at fault.

ComfyUI then still runs the outputs whose nodes passed, so a bad value on, say, the Reward Guard
would leave sampling and training running without it.  :func:`check_prompt`, called by the first
node that runs in an iteration (PCPO LoRA, the Trajectory Sampler), applies the same checks to
every node of this pack in the queued prompt and refuses before any work.
"""
from __future__ import annotations

from comfyui_pcpo.validate import check_inputs, input_specs


def _checks(cls, values: dict, run_name=None, lists: bool = True) -> list:
    spec = cls.INPUT_TYPES()
    open_lists = set(getattr(cls, "OPEN_LISTS", ()))
    if not lists:
        open_lists |= {k for k, (t, _) in input_specs(spec).items() if isinstance(t, (list, tuple))}
    errors = check_inputs(spec, values, open_lists)
    extra = getattr(cls, "pcpo_checks", None)
    if extra is not None:
        errors += [e for e in extra(values, run_name=run_name) if e]
    return errors


def verdict(cls, **values):
    """``VALIDATE_INPUTS``'s answer for ``values`` (the inputs it takes; None = linked): True, or
    the messages of every input that fails."""
    errors = _checks(cls, values)
    return True if not errors else "; ".join(errors)


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def constants(cls, inputs: dict) -> dict:
    """The constant widget values of a prompt node's ``inputs``, converted as ComfyUI converts
    them (STRING -> str, BOOLEAN -> bool); linked inputs are left out."""
    specs = input_specs(cls.INPUT_TYPES())
    out = {}
    for name, v in (inputs or {}).items():
        if isinstance(v, dict) and "__value__" in v:
            v = v["__value__"]
        if _is_link(v) or name not in specs:
            continue
        typ = specs[name][0]
        if typ == "STRING" and not isinstance(v, str):
            v = str(v)
        elif typ == "BOOLEAN":
            v = bool(v)
        out[name] = v
    return out


def _pack_classes() -> dict:
    from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    return {k: (c, NODE_DISPLAY_NAME_MAPPINGS.get(k, k)) for k, c in NODE_CLASS_MAPPINGS.items()}


def prompt_errors(prompt, run_name=None) -> list:
    """[(node id, display name, message)] of every node of this pack in ``prompt`` (API format)
    whose constant inputs fail their checks; ``run_name`` fills ``{run}`` in file names.  List
    values are left to ComfyUI here: a list of files (reward weights) may lack a file on a node this
    prompt does not run, and ComfyUI refuses a missing one on every node it runs."""
    if not isinstance(prompt, dict):
        return []
    classes = _pack_classes()
    found = []
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") not in classes:
            continue
        cls, display = classes[node["class_type"]]
        errors = _checks(cls, constants(cls, node.get("inputs")), run_name=run_name, lists=False)
        if errors:
            found.append((str(nid), display, "; ".join(errors)))
    return found


def check_prompt(prompt, run_name=None) -> None:
    """Raise before any work when a node of this pack in the queued ``prompt`` has a bad input."""
    found = prompt_errors(prompt, run_name)
    if found:
        raise ValueError(" | ".join(f"{display} (node {nid}): {msg}" for nid, display, msg in found)
                         + ". Nothing was sampled or trained: fix the input, then queue again")
