"""Image preprocessing of the reward models, in torch on the scoring device, and weight-file reading.

All reference implementations receive 8-bit images (DDPO converts with ``(x*255).round()`` to uint8;
the others read PIL images), so every path first rounds to 8-bit levels.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, H, W) float32 holding k/255 (what an 8-bit image decodes to)."""
    x = (images[..., :3].float() * 255.0).round().clamp(0, 255) / 255.0
    return x.permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def clip_preprocess(images: torch.Tensor, size: int = 224, crop: int = 224,
                    mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """CLIP / BLIP evaluation transform: resize the shortest side to ``size`` (bicubic, antialiased), centre
    crop ``crop`` x ``crop``, OpenAI mean/std.  (B, H, W, 3) in [0, 1] -> (B, 3, crop, crop) float32."""
    x = to_uint8_levels(images)
    H, W = x.shape[-2:]
    if H <= W:
        h, w = size, max(1, int(W * size / H))  # torchvision/HF: the long side truncated
    else:
        h, w = max(1, int(H * size / W)), size
    x = _resize(x, h, w)
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    if top < 0 or left < 0:
        x = F.pad(x, (max(0, -left), max(0, -left), max(0, -top), max(0, -top)))
        top, left = max(0, top), max(0, left)
    x = x[..., top:top + crop, left:left + crop]
    return normalise(x, mean, std)


def letterbox_preprocess(images: torch.Tensor, size: int = 224,
                         mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """open_clip ``ResizeMaxSize`` (HPSv2's evaluation transform): the longest side to ``size`` (bicubic),
    zero-padded to ``size`` x ``size`` around the centre (no crop), then mean/std."""
    x = to_uint8_levels(images)
    H, W = x.shape[-2:]
    scale = size / max(H, W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    x = _resize(x, h, w)
    ph, pw = size - h, size - w
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return normalise(x, mean, std)


# --------------------------------------------------------------------------- weight files

PT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(path: str, where: str = "") -> dict:
    """A state dict from ``.safetensors`` (read directly) or ``.pt/.pth/.bin/.ckpt`` (``torch.load`` with
    ``weights_only=True`` only: no pickled code runs).  A ``{"state_dict": ...}`` wrapper is unwrapped and
    a ``module.`` prefix (DataParallel) dropped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    elif path.endswith(PT_EXTENSIONS):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a pickle that needs code, or a broken file
            raise ValueError(f"{where}cannot read {path} with torch.load(weights_only=True) ({type(e).__name__}: "
                             f"{e}); use the published file as it is, or convert it to .safetensors") from None
    else:
        raise ValueError(f"{where}{path}: expected a .safetensors or .pt/.pth/.bin/.ckpt file")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{where}{path} does not hold a plain state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_keys(sd: dict, expected: dict, path: str, hint: str) -> None:
    """``expected``: key -> shape.  Raises naming the missing keys and wrong shapes."""
    missing = [k for k in expected if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:4])}")
        if wrong:
            parts.append(f"wrong shapes: {', '.join(wrong[:4])}")
        raise ValueError(f"{path} is not the expected file ({'; '.join(parts)}). {hint}")
