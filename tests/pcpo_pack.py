"""Load this repository as a ComfyUI custom-node pack (through ComfyUI's own loader) for tests."""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
from types import SimpleNamespace

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-pcpo"
_STATE: dict = {}


def load(harness) -> SimpleNamespace:
    """Load the pack once via ``nodes.load_custom_node`` from a folder named like a user's clone.
    Returns a namespace: ``ok`` (the loader's verdict), ``nodes`` (our NODE_CLASS_MAPPINGS entries),
    ``mod(name)`` (a submodule of the loaded pack, e.g. "nodes.glue")."""
    if "ns" in _STATE:
        return _STATE["ns"]
    root = pathlib.Path(tempfile.mkdtemp(prefix="pcpo-custom-nodes-"))
    link = root / PACK_NAME
    os.symlink(REPO_ROOT, link, target_is_directory=True)
    ok = harness.load_pack(link)
    import nodes as comfy_nodes
    def from_pack(cls) -> bool:
        mod = sys.modules.get(cls.__module__)
        return str(getattr(mod, "__file__", "")).startswith(str(link))

    ours = {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("PCPO") and from_pack(v)}

    def mod(name: str):
        # ComfyUI names the pack module after its path (0.3.75) or folder name (older versions)
        for key, m in list(sys.modules.items()):
            if key.endswith(f"{PACK_NAME}.{name}") and str(getattr(m, "__file__", "")).startswith(str(link)):
                return m
        raise KeyError(f"submodule {name!r} of the loaded pack not found")

    ns = SimpleNamespace(ok=ok, nodes=ours, mod=mod, path=link,
                         display=dict(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS))
    _STATE["ns"] = ns
    return ns
