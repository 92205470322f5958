"""Training precision: which dtype the model computes in during rollout and gradient pass, and
whether gradients are scaled (fp16).

LoRA parameters and optimizer state always stay fp32.  With a 16-bit compute dtype the LoRA branch
is computed in fp32 beside the layer (``LoRAWeightDelta.bypass``) instead of being merged into the
16-bit weight, where ``W + dW`` would round a small delta away; fp16 scales the loss before
backward (per-element gradients of real workflows, 1e-7..5e-7, sit at fp16's subnormal quantum)
and skips a step whose gradients overflowed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str              # "fp32" | "bf16" | "fp16"
    dtype: torch.dtype     # compute dtype of the model
    grad_scaling: bool     # loss scaling with skip-on-overflow (fp16)

    @property
    def is_16bit(self) -> bool:
        return self.dtype != torch.float32


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported())
        except Exception:
            return False
    return device.type in ("cpu", "xpu")


def resolve_precision(choice: str, device) -> Precision:
    """``auto``: bf16 on a CUDA device that supports it, else fp16 with gradient scaling on CUDA;
    fp32 anywhere else (CPU, MPS).  ``fp16`` always scales gradients."""
    if choice not in PRECISIONS:
        raise ValueError(f"training_precision {choice!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if bf16_supported(device) else "fp16"
        else:
            choice = "fp32"
    if choice == "bf16" and device.type == "cuda" and not bf16_supported(device):
        raise ValueError(f"training_precision bf16 is not supported on this GPU ({device}); use fp16 or auto")
    return Precision(choice, _DTYPES[choice], choice == "fp16")


def new_grad_scaler(device) -> "torch.amp.GradScaler":
    return torch.amp.GradScaler(torch.device(device).type)
