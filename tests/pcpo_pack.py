"""Load this repository as a ComfyUI custom-node pack (through ComfyUI's own loader) for tests."""
from __future__ import annotations

import pathlib
import tempfile
from types import SimpleNamespace

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-pcpo"
_STATE: dict = {}


def load(harness) -> SimpleNamespace:
    """Load the pack once via ``nodes.load_custom_node`` from a folder named like a user's clone
    (``comfyui_host.load_pack_folder``).  Returns a namespace: ``ok`` (the loader's verdict),
    ``nodes`` (our NODE_CLASS_MAPPINGS entries), ``mod(name)`` (a submodule of the loaded pack,
    e.g. "nodes.model_hooks"), ``path`` (the pack folder) and ``display`` (NODE_DISPLAY_NAME_MAPPINGS)."""
    if "ns" in _STATE:
        return _STATE["ns"]
    harness.load_comfy()
    root = pathlib.Path(tempfile.mkdtemp(prefix="pcpo-custom-nodes-"))
    pack = harness.host().load_pack_folder(REPO_ROOT, root, PACK_NAME)
    import nodes as comfy_nodes
    ns = SimpleNamespace(ok=pack.ok, nodes=pack.node_classes("PCPO"), mod=pack.module, path=pack.path,
                         display=dict(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS))
    _STATE["ns"] = ns
    return ns
