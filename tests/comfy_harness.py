"""Run a real ComfyUI 0.3.75 in-process: load it, load a node pack, execute API prompts.

    import comfy_harness as H
    H.load_comfy()                      # fetch/install if needed, import nodes + comfy_extras
    H.load_pack("/path/to/pack")        # asyncio.run(nodes.load_custom_node(path)) -> bool
    res = H.execute_prompt({"1": {"class_type": "EmptyLatentImage", "inputs": {...}}, ...})
    res.outputs["3"]                    # the node's return tuple, e.g. (latent_dict,)
    res.ui["9"]                         # UI output of an output node (history "outputs")

The prompt is validated with ``execution.validate_prompt`` and run by
``execution.PromptExecutor(stub_server).execute(copy.deepcopy(prompt), ...)`` (the executor
writes IS_CHANGED values into the prompt, so it gets a copy).  A failure raises
``PromptError`` carrying the executor's error message and traceback.
"""
from __future__ import annotations

import asyncio
import copy
import importlib.util
import os
import pathlib
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_PATH = REPO_ROOT / "tools" / "comfyui_host.py"

_STATE: dict = {"comfy_dir": None, "extra_nodes": False, "executor": None}


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


def load_comfy(extra_nodes: bool = True, install: bool | None = None) -> pathlib.Path:
    """Make ComfyUI importable and import ``nodes``/``execution`` (idempotent, cheap after once).

    ``extra_nodes``: also run ``nodes.init_extra_nodes(init_custom_nodes=False,
    init_api_nodes=False)`` (the comfy_extras nodes: SamplerCustom, KSamplerSelect, ...).
    ``install``: pip-install ComfyUI's requirements when missing (default: yes unless
    ``$PCPO_COMFYUI_NO_INSTALL`` is set; a no-op when a marker says they are satisfied).
    """
    h = host()
    if _STATE["comfy_dir"] is None:
        comfy_dir = h.ensure_comfyui()
        if install is None:
            install = not os.environ.get("PCPO_COMFYUI_NO_INSTALL")
        if install:
            h.install_requirements(comfy_dir)
        _STATE["comfy_dir"] = comfy_dir
    comfy_dir = h.prepare_import(_STATE["comfy_dir"])
    import nodes  # noqa: F401  (ComfyUI's nodes.py; inserts <tree>/comfy into sys.path)
    import execution  # noqa: F401
    if extra_nodes and not _STATE["extra_nodes"]:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _STATE["extra_nodes"] = True
    return comfy_dir


def set_base_dirs(base) -> dict:
    """See ``comfyui_host.set_base_dirs``: redirect output/input/temp/user/loras to ``base``."""
    load_comfy(extra_nodes=False)
    return host().set_base_dirs(base)


def load_pack(path) -> bool:
    """Load a custom-node pack folder (or .py file) the way ComfyUI does; True on success."""
    load_comfy()
    import nodes
    path = os.path.abspath(os.fspath(path))
    return bool(asyncio.run(nodes.load_custom_node(path)))


# --------------------------------------------------------------------------- executing prompts

class PromptError(RuntimeError):
    """Validation or execution failure; ``details`` holds ComfyUI's error dict/messages."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


@dataclass
class PromptResult:
    prompt_id: str
    outputs: dict = field(default_factory=dict)   # node id -> return tuple (one item per output)
    raw_outputs: dict = field(default_factory=dict)  # node id -> executor's per-output lists
    ui: dict = field(default_factory=dict)        # node id -> UI dict (history "outputs")
    history: dict = field(default_factory=dict)   # executor.history_result
    messages: list = field(default_factory=list)  # (event, data) status messages
    executor: Any = None

    def __getitem__(self, node_id):
        return self.outputs[str(node_id)]


def _raw_outputs(entry):
    """The output lists of an output-cache entry (CacheEntry(ui, outputs) in 0.3.7x)."""
    if entry is None:
        return None
    raw = getattr(entry, "outputs", None)
    if raw is None and isinstance(entry, (list, tuple)):  # 0.3.6x caches store the output lists directly
        raw = entry
    return raw


def _unwrap(raw, class_type):
    """One value per output socket: ordinary nodes run once, so each output list holds one
    item; outputs flagged in OUTPUT_IS_LIST stay lists."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", ()) or ())
    out = []
    for i, o in enumerate(raw):
        listy = i < len(is_list) and is_list[i]
        out.append(o[0] if (not listy and isinstance(o, list) and len(o) == 1) else o)
    return tuple(out)


def new_executor(fresh: bool = False):
    """A PromptExecutor with a stub server (shared between calls unless ``fresh``)."""
    load_comfy()
    if fresh or _STATE["executor"] is None:
        ex = host().new_executor()
        if fresh:
            return ex
        _STATE["executor"] = ex
    return _STATE["executor"]


def validate_prompt(api_prompt: dict, prompt_id: str | None = None):
    """``execution.validate_prompt``: returns (ok, error, good_outputs, node_errors)."""
    load_comfy()
    return host().validate_prompt(api_prompt, prompt_id or str(uuid.uuid4()))


def execute_prompt(api_prompt: dict, fresh: bool = True, extra_data: dict | None = None,
                   executor=None) -> PromptResult:
    """Validate and execute an API-format prompt; return every executed node's outputs.

    ``fresh``: a new executor (empty caches) for this call (default); False reuses a shared
    executor, so unchanged nodes come from its cache as they would across queued prompts.
    Raises ``PromptError`` on validation or execution failure.
    """
    load_comfy()
    prompt = copy.deepcopy(api_prompt)
    prompt_id = str(uuid.uuid4())
    ok, error, good_outputs, node_errors = validate_prompt(prompt, prompt_id)
    if not ok:
        lines = [f"{error.get('message')}: {error.get('details')}"]
        for nid, ne in (node_errors or {}).items():
            for e in ne.get("errors", []):
                lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        raise PromptError("prompt failed validation:\n" + "\n".join(lines), {"error": error, "node_errors": node_errors})
    ex = executor if executor is not None else new_executor(fresh=fresh)
    ex.server.last_prompt_id = prompt_id
    ex.server.messages = []
    ex.execute(copy.deepcopy(prompt), prompt_id, extra_data or {}, list(good_outputs))
    messages = list(ex.status_messages)
    if not ex.success or any(ev == "execution_error" for ev, _ in messages):
        err = next((d for ev, d in messages if ev in ("execution_error",)), {})
        msg = (f"node {err.get('node_id')} ({err.get('node_type')}) raised "
               f"{err.get('exception_type')}: {err.get('exception_message')}")
        tb = "".join(err.get("traceback", []) or [])
        raise PromptError(f"prompt execution failed: {msg}\n{tb}", err)
    if any(ev == "execution_interrupted" for ev, _ in messages):
        raise PromptError("prompt execution was interrupted", dict(messages))
    outputs, raw_outputs = {}, {}
    for node_id in prompt:
        try:
            raw = _raw_outputs(ex.caches.outputs.get(node_id))
        except Exception:
            raw = None
        if raw is not None:
            raw_outputs[node_id] = raw
            outputs[node_id] = _unwrap(raw, prompt[node_id]["class_type"])
    history = getattr(ex, "history_result", {}) or {}
    return PromptResult(prompt_id=prompt_id, outputs=outputs, raw_outputs=raw_outputs, ui=dict(history.get("outputs", {})),
                        history=history, messages=messages, executor=ex)
