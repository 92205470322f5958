"""ComfyUI node classes of the pack (thin shells over ``comfyui_pcpo``)."""
from . import dashboard, demo, export, heldout, irg, human, prompts, reward, reward_models, sampler, session, update

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in (session, prompts, sampler, reward, reward_models, human, update, export, demo, dashboard, heldout, irg):
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
