"""HPSv2 / HPSv2.1 through ``open_clip_torch`` (not the ``hpsv2`` wheel, which lacks its tokenizer file).

The published checkpoint (``HPS_v2.1_compressed.pt``) is a full open_clip ``ViT-H-14`` state dict
(image and text towers) under ``state_dict``; it is loaded strictly into a model built with
``pretrained=None``.  Score: ``cos(image, text)`` of the L2-normalised embeddings, no logit scale
(HPSv2 ``img_score.py``); images letterboxed to 224 (open_clip ``ResizeMaxSize``).  Spec section 3.
"""
from __future__ import annotations

import torch

from .base import ModelReward
from .clip_models import l2n
from .preprocess import letterbox_preprocess, read_state_dict

HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_URL = "the Hugging Face repository xswu/HPSv2 (file HPS_v2.1_compressed.pt, or HPS_v2_compressed.pt for v2.0)"
OPEN_CLIP_INSTALL = "pip install open_clip_torch"


def import_open_clip():
    """``open_clip``, or an ImportError with the install hint: when it is missing, and when importing it fails
    in any other way (e.g. a RuntimeError from a torchvision built for another torch)."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"the HPSv2 reward needs open_clip_torch, which is not installed ({e}); in ComfyUI's Python "
                          f"environment run: {OPEN_CLIP_INSTALL}  (or pip install 'comfyui-pcpo[rewards]')") from None
    except Exception as e:  # noqa: BLE001 - installed but broken: say so instead of a raw traceback
        raise ImportError(f"the HPSv2 reward needs open_clip_torch, which is installed but fails to import "
                          f"({type(e).__name__}: {str(e)[:300]}); often its torchvision was built for another torch "
                          f"version. In ComfyUI's Python environment reinstall it: {OPEN_CLIP_INSTALL} "
                          f"(with torchvision matching torch; or pip install 'comfyui-pcpo[rewards]')") from None
    return open_clip


def load_hps(path: str, arch: str = "ViT-H-14", dtype: torch.dtype = torch.float32, where: str = ""):
    """(model, tokenizer, image size, mean, std) for an open_clip checkpoint of architecture ``arch``."""
    open_clip = import_open_clip()
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"{where}open_clip knows no architecture {arch!r}")
    sd = read_state_dict(path, where)
    with torch.device("meta"):  # no random init of 1B parameters: the checkpoint's tensors are assigned
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    want = set(model.state_dict())
    missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or extra:
        raise ValueError(f"{where}{path} is not an open_clip {arch} checkpoint (missing {len(missing)} keys, e.g. "
                         f"{missing[:3]}; unexpected {len(extra)}, e.g. {extra[:3]}). HPSv2.1 is {HPS_FILE} from "
                         f"{HPS_URL}")
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{where}{path} does not fit open_clip {arch}: {str(e)[:300]}") from None
    _materialise_buffers(model)
    vis = model.visual
    size = vis.image_size[0] if isinstance(vis.image_size, (tuple, list)) else int(vis.image_size)
    mean = getattr(vis, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(vis, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    return model.to(dtype).eval(), open_clip.get_tokenizer(arch), int(size), tuple(mean), tuple(std)


def _materialise_buffers(model) -> None:
    """Non-persistent buffers (the text tower's causal mask) are not in the checkpoint: rebuild them."""
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "attn_mask" and buf.ndim == 2 and buf.shape[0] == buf.shape[1]:
                # open_clip's build_causal_mask: additive mask, -inf above the diagonal
                mod._buffers[name] = torch.full(tuple(buf.shape), float("-inf")).triu_(1)
            else:
                raise RuntimeError(f"open_clip model buffer {name!r} of {type(mod).__name__} is not in the checkpoint")


class HPSReward(ModelReward):
    needs_prompt = True

    def __init__(self, model, tokenizer, size: int = 224, mean=None, std=None, batch_size: int = 8,
                 name: str = "hpsv2.1"):
        self.module, self.tokenizer, self.size, self.batch_size, self.name = model, tokenizer, size, batch_size, name
        self.mean, self.std = mean, std
        self.description = "HPSv2.1 human preference: cosine of image and prompt embeddings (about 0.2-0.35)"

    def _score_batch(self, images, prompts):
        m = self.module
        dtype = next(m.parameters()).dtype
        kw = {} if self.mean is None else {"mean": self.mean, "std": self.std}
        px = letterbox_preprocess(images, self.size, **kw).to(dtype)
        tok = self.tokenizer(list(prompts)).to(px.device)
        img = l2n(m.encode_image(px).float())
        txt = l2n(m.encode_text(tok).float())
        return (img * txt).sum(-1)
