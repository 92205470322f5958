"""ComfyUI entry point of the comfyui-pcpo node pack.

ComfyUI imports this folder as a package; the node classes live in ``nodes/`` and call the
headless core ``comfyui_pcpo`` (which never imports ComfyUI).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
try:  # a clone in custom_nodes/ is not pip-installed: make the core importable from here
    import comfyui_pcpo  # noqa: F401
except ImportError:
    sys.path.append(_HERE)  # appended, never prepended: our ``nodes`` folder must not shadow ComfyUI's

try:
    import folder_paths  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:  # imported outside ComfyUI (e.g. by a test collector): no nodes to offer
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
