"""Tests' view of a real ComfyUI run in-process: a thin wrapper over ``tools/comfyui_host.py``.

    import comfy_harness as H
    H.load_comfy()                      # fetch/install if needed, import nodes + comfy_extras
    H.load_pack("/path/to/pack")        # nodes.load_custom_node(path) -> bool
    res = H.execute_prompt({"1": {"class_type": "EmptyLatentImage", "inputs": {...}}, ...})
    res.outputs["3"]                    # the node's return tuple, e.g. (latent_dict,)
    res.ui["9"]                         # UI output of an output node (history "outputs")

The tree is ``$PCPO_COMFYUI_DIR`` (any ComfyUI version) or the cached ComfyUI 0.3.75.  Loading,
validation and execution live in ``comfyui_host`` (``load``, ``validate_prompt``,
``execute_prompt``); this module adds the shared executor that tests reuse and the module lookup.
A failure raises ``PromptError`` carrying the executor's error message and traceback.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_PATH = REPO_ROOT / "tools" / "comfyui_host.py"

_STATE: dict = {"executor": None}


def host():
    """The ``tools/comfyui_host.py`` module (loaded by file path, cached in sys.modules)."""
    mod = sys.modules.get("comfyui_host")
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "")) == str(HOST_PATH):
        return mod
    spec = importlib.util.spec_from_file_location("comfyui_host", HOST_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_host"] = mod
    spec.loader.exec_module(mod)
    return mod


_host = host()
PromptError = _host.PromptError
PromptResult = _host.PromptResult


def load_comfy(extra_nodes: bool = True, install: bool | None = None) -> pathlib.Path:
    """``comfyui_host.load``: make ComfyUI importable, import ``nodes``/``execution`` and (with
    ``extra_nodes``) the comfy_extras nodes; returns the tree (idempotent, cheap after once)."""
    return host().load(extra_nodes=extra_nodes, install=install, quiet=True)  # conftest names the tree


def comfyui_version() -> str | None:
    """The loaded tree's ComfyUI version."""
    return host().comfyui_version(load_comfy(extra_nodes=False))


def set_base_dirs(base) -> dict:
    """See ``comfyui_host.set_base_dirs``: redirect output/input/temp/user/loras to ``base``."""
    load_comfy(extra_nodes=False)
    return host().set_base_dirs(base)


def load_pack(path) -> bool:
    """Load a custom-node pack folder (or .py file) the way ComfyUI does; True on success."""
    load_comfy()
    return host().load_pack(path)


def new_executor(fresh: bool = False):
    """A PromptExecutor with a stub server (shared between calls unless ``fresh``)."""
    load_comfy()
    if fresh:
        return host().new_executor()
    if _STATE["executor"] is None:
        _STATE["executor"] = host().new_executor()
    return _STATE["executor"]


def validate_prompt(api_prompt: dict, prompt_id: str | None = None):
    """``execution.validate_prompt``: returns (ok, error, good_outputs, node_errors)."""
    load_comfy()
    return host().validate_prompt(api_prompt, prompt_id)


def execute_prompt(api_prompt: dict, fresh: bool = True, extra_data: dict | None = None,
                   executor=None) -> PromptResult:
    """Validate and execute an API-format prompt; return every executed node's outputs.

    ``fresh``: a new executor (empty caches) for this call (default); False reuses a shared
    executor, so unchanged nodes come from its cache as they would across queued prompts.
    Raises ``PromptError`` on validation or execution failure.
    """
    ex = executor if executor is not None else new_executor(fresh=fresh)
    return host().execute_prompt(api_prompt, executor=ex, extra_data=extra_data)
