"""ComfyUI node classes of the pack (thin shells over ``comfyui_pcpo``)."""
from . import prompts, reward, sampler, session, update

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
_MODULES = [session, prompts, sampler, reward, update]
try:
    from . import export
    _MODULES.append(export)
except ImportError as e:  # pragma: no cover - export arrives with its own module
    import logging
    logging.getLogger("comfyui-pcpo").warning("PCPO export node unavailable: %s", e)
for _m in _MODULES:
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
