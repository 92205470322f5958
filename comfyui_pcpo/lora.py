"""LoRA adapters as weight deltas, target-layer selection, and kohya-format export keys.

An adapter holds ``down`` (r, fan_in) and ``up`` (out, r) and adds
``multiplier * (alpha / r) * (up @ down).reshape(W.shape)`` to a frozen weight W of shape
(out, in) or (out, in, kh, kw).  It is a plain callable on the weight, so a host can apply it on
every forward (ComfyUI's weight wrappers) and autograd reaches ``up`` and ``down``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch


class LoRAWeightDelta(torch.nn.Module):
    """W -> W + multiplier * (alpha / rank) * up @ down.  ``up`` starts at zero (identity adapter)."""

    def __init__(self, weight_shape, rank: int, alpha: float, dtype=torch.float32, device=None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.shape = tuple(int(s) for s in weight_shape)
        fan_in = int(math.prod(self.shape[1:]))
        self.rank = min(int(rank), self.shape[0], fan_in)
        self.alpha = float(alpha) * self.rank / int(rank)  # keep alpha / rank when the rank is capped
        down = torch.randn(self.rank, fan_in, generator=generator, dtype=torch.float32) / math.sqrt(fan_in)
        self.down = torch.nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = torch.nn.Parameter(torch.zeros(self.shape[0], self.rank, device=device, dtype=dtype))
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down reshaped to the weight's shape (adapter dtype)."""
        return (self.scale * (self.up @ self.down)).reshape(self.shape)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0.0:
            return weight
        d = self.delta().to(device=weight.device, dtype=weight.dtype)
        return weight + self.multiplier * d if self.multiplier != 1.0 else weight + d

    def bypass(self, x: torch.Tensor, y: torch.Tensor, conv: Optional[dict] = None) -> torch.Tensor:
        """``y`` (the frozen layer's output for input ``x``) plus this adapter's branch
        ``multiplier * (alpha / rank) * up(down(x))``, computed and added in fp32, returned in
        ``y``'s dtype.  Mathematically the output of the merged weight ``W + delta``; used with a
        16-bit compute dtype, where merging would round a small delta away.  ``conv``: stride,
        padding, dilation of a Conv2d layer."""
        if self.multiplier == 0.0:
            return y
        xf = x.to(self.down.device, torch.float32)
        if len(self.shape) == 4:
            h = torch.nn.functional.conv2d(xf, self.down.reshape(self.rank, *self.shape[1:]), **(conv or {}))
            dy = torch.nn.functional.conv2d(h, self.up.reshape(self.shape[0], self.rank, 1, 1))
        elif len(self.shape) == 2:
            dy = torch.nn.functional.linear(torch.nn.functional.linear(xf, self.down), self.up)
        else:
            raise ValueError(f"a LoRA branch supports linear and 2-D conv layers, not weight shape {self.shape}")
        out = y.to(torch.float32) + (self.multiplier * self.scale) * dy.to(y.device)
        return out.to(y.dtype)

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # ComfyUI calls move_to on weight functions when it moves weights on partial (low-VRAM) loads
    # and counts the returned bytes as moved.  The adapter and its optimizer state stay on the load
    # device (the weight is cast to the compute device before the wrapper runs): nothing moves.
    def move_to(self, device=None):
        return 0

    def kohya_tensors(self, dtype=torch.float32) -> dict:
        """{"lora_down.weight", "lora_up.weight", "alpha"} in kohya layout (conv: 4-D down/up)."""
        down = self.down.detach().to(dtype)
        up = self.up.detach().to(dtype)
        if len(self.shape) > 2:  # conv: down (r, in, kh, kw), up (out, r, 1, 1)
            down = down.reshape(self.rank, *self.shape[1:])
            up = up.reshape(self.shape[0], self.rank, *([1] * (len(self.shape) - 2)))
        return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
                "alpha": torch.tensor(self.alpha, dtype=dtype)}


# ----------------------------------------------------------------------------- target selection

# Module-name patterns per preset, over the ldm/ComfyUI names of SD1.x/SD2/SDXL UNets, MMDiT (SD3)
# and FLUX.  Matched against the module path (no ".weight").
_ATTN = [
    r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",          # UNet transformer blocks
    r"\.(img|txt)_attn\.(qkv|proj)$",                    # FLUX double blocks
    r"single_blocks\.\d+\.(linear1|linear2)$",           # FLUX single blocks (fused attn + mlp)
    r"\.(x_block|context_block)\.attn\.(qkv|proj)$",     # SD3 MMDiT
]
_MLP = [
    r"\.ff\.net\.(0\.proj|2)$",
    r"\.(img|txt)_mlp\.[02]$",
    r"\.(x_block|context_block)\.mlp\.fc[12]$",
]
TARGET_PRESETS = {
    "attention": _ATTN,
    "attention+mlp": _ATTN + _MLP,
    "all-linear": None,      # every 2-D weight
    "all-linear+conv": None,  # every 2-D and 4-D weight
}


def select_targets(named_shapes: Iterable[tuple], preset: str = "attention",
                   extra_regex: str = "") -> list[str]:
    """Module names to adapt.  named_shapes: (module_name, weight_shape) pairs of the denoiser."""
    if preset not in TARGET_PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; choose one of {', '.join(TARGET_PRESETS)}")
    pats = TARGET_PRESETS[preset]
    extra = re.compile(extra_regex) if extra_regex else None
    out = []
    for name, shape in named_shapes:
        nd = len(shape)
        if extra is not None and extra.search(name) and nd >= 2:
            out.append(name)
            continue
        if pats is None:
            if nd == 2 or (preset == "all-linear+conv" and nd == 4 and max(shape[2:]) >= 1):
                out.append(name)
        elif nd == 2 and any(re.search(p, name) for p in pats):
            out.append(name)
    return out


def kohya_name(module_name: str, prefix: str = "lora_unet_") -> str:
    """kohya key stem of a denoiser module: "input_blocks.1.1.proj_in" -> "lora_unet_input_blocks_1_1_proj_in"."""
    return prefix + module_name.replace(".", "_")
