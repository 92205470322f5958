"""ComfyUI entry point of the comfyui-pcpo node pack.

ComfyUI imports this folder as a package; the node classes live in ``nodes/`` and call the
headless core ``comfyui_pcpo`` (which never imports ComfyUI).
"""
import importlib.util
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_CORE = os.path.join(_HERE, "comfyui_pcpo")


def _use_own_core() -> None:
    """Import the core from this folder, even when another copy (an older ``pip install``) is on
    ``sys.path``: the nodes must run with the core they were written with.  The folder itself is
    never put in front of ``sys.path`` (our ``nodes`` package must not shadow ComfyUI's)."""
    loaded = sys.modules.get("comfyui_pcpo")
    if loaded is not None:
        if os.path.realpath(os.path.dirname(getattr(loaded, "__file__", "") or "")) == os.path.realpath(_CORE):
            return
        logging.getLogger("comfyui-pcpo").warning(
            "comfyui-pcpo: replacing the core imported from %s by this pack's own (%s)",
            os.path.dirname(loaded.__file__ or "?"), _CORE)
        for name in [n for n in sys.modules if n == "comfyui_pcpo" or n.startswith("comfyui_pcpo.")]:
            del sys.modules[name]
    spec = importlib.util.spec_from_file_location("comfyui_pcpo", os.path.join(_CORE, "__init__.py"),
                                                  submodule_search_locations=[_CORE])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_pcpo"] = module
    spec.loader.exec_module(module)


_use_own_core()

try:
    import folder_paths  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:  # imported outside ComfyUI (e.g. by a test collector): no nodes to offer
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

# the page-side extension (rating panel, stats on the nodes): plain JS the ComfyUI frontend loads
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
