"""ComfyUI node classes of the pack (thin shells over ``comfyui_pcpo``)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
