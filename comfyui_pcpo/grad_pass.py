"""What a gradient pass through a host's diffusion model needs and the host does not give (torch
only, no host import): residual streams updated out of place, gradient checkpointing that
recomputes a block on a snapshot of the arguments it saw, the LoRA's fp32 bypass branch on a
16-bit layer, and scaling every adapter at once (0 = the base model).
"""
from __future__ import annotations

import contextlib
import threading

import torch


_OOP_NAMES = {"__iadd__": torch.Tensor.add, "__isub__": torch.Tensor.sub, "__imul__": torch.Tensor.mul}
_oop_state = threading.local()
_oop_lock = threading.Lock()
_oop_installed = {"depth": 0, "saved": {}}


def _oop_dunder(name: str, op):
    orig = getattr(torch._C.TensorBase, name)

    def dunder(self, other):
        if getattr(_oop_state, "active", 0):
            return op(self, other)
        return orig(self, other)
    dunder.pcpo_out_of_place = True
    return dunder


@contextlib.contextmanager
def out_of_place_residuals():
    """Make ``x += y`` (and -=, *=) out of place on THIS thread for the duration.

    FLUX (and MMDiT) blocks update their residual streams in place; autograd then either raises or,
    with checkpointing, silently computes wrong gradients.  ``x = x + y`` gives the same values.
    The trainable model enters this only inside its diffusion-model call during a gradient pass
    (the node layer's model-function wrapper): ComfyUI's own code around the model call (cond
    batching, which adds into views in place), the optimizer step, other threads and other packs
    keep the normal in-place semantics."""
    with _oop_lock:
        if _oop_installed["depth"] == 0:
            _oop_installed["saved"] = {k: torch.Tensor.__dict__.get(k) for k in _OOP_NAMES}
            for k, op in _OOP_NAMES.items():
                setattr(torch.Tensor, k, _oop_dunder(k, op))
        _oop_installed["depth"] += 1
    _oop_state.active = getattr(_oop_state, "active", 0) + 1
    try:
        yield
    finally:
        _oop_state.active -= 1
        with _oop_lock:
            _oop_installed["depth"] -= 1
            if _oop_installed["depth"] == 0:
                for k, v in _oop_installed["saved"].items():
                    if v is None:
                        delattr(torch.Tensor, k)
                    else:
                        setattr(torch.Tensor, k, v)


def checkpoint_blocks(diffusion_model) -> list[str]:
    """The blocks whose activations gradient checkpointing recomputes: every element of the model's
    block lists (FLUX double/single blocks, MMDiT joint blocks) and, for a UNet, every layer of its
    input, middle and output blocks.  (ComfyUI runs a UNet block's layers one by one through
    ``forward_timestep_embed``, never through the block's own forward, so the layers are the units
    whose forward is called.)"""
    names = []
    for cname, child in diffusion_model.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
            blocks = [(f"{cname}.{i}", m) for i, m in enumerate(child)]
        elif cname == "middle_block":
            blocks = [(cname, child)]
        else:
            continue
        for name, block in blocks:
            if isinstance(block, torch.nn.Sequential):  # a UNet's TimestepEmbedSequential
                names += [f"{name}.{j}" for j, _ in block.named_children()]
            else:
                names.append(name)
    return names


def _snapshot(value):
    """A copy of the dicts among a block's arguments (``transformer_options``), one level deep: the
    host writes the current block's id into that shared dict (``block``, ``block_index``) before each
    block, so by the time backward recomputes a block the dict names a later one."""
    if isinstance(value, dict):
        return {k: dict(v) if isinstance(v, dict) else v for k, v in value.items()}
    return value


def checkpointed_forward(block):
    """``block``'s forward under gradient checkpointing while grad is on (recomputed in backward, out
    of place, on a snapshot of its arguments); its plain forward otherwise."""
    forward = type(block).forward.__get__(block)

    def run(*args, **kwargs):  # the recomputation in backward also adds residuals out of place
        with out_of_place_residuals():
            return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            seen = ([_snapshot(a) for a in args], {k: _snapshot(v) for k, v in kwargs.items()})
            calls = []

            def replay(*a, **kw):
                # the forward runs on the caller's arguments (its writes into them stay visible to
                # later blocks); the recomputation on a copy of them as the forward saw them
                if calls:
                    a, kw = [_snapshot(x) for x in seen[0]], {k: _snapshot(v) for k, v in seen[1].items()}
                calls.append(1)
                return run(*a, **kw)
            return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return checkpointed_forward


def lora_branch_forward(module, adapter):
    """``module``'s forward plus the adapter's fp32 branch (an object patch of the trainable clone:
    present only while that clone is loaded)."""
    forward = type(module).forward.__get__(module)
    conv = None
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"a LoRA on a grouped or non-zero-padded convolution is not supported at 16-bit "
                             f"training precision ({type(module).__name__}); use training_precision fp32 or "
                             "target_layers all-linear")
        conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}

    def lora_forward(x, *args, **kwargs):
        return adapter.bypass(x, forward(x, *args, **kwargs), conv)
    return lora_forward


@contextlib.contextmanager
def lora_multiplier(adapters: dict, value: float):
    """Temporarily scale every adapter (0 = the base model, used by uw-lambda's reference pass)."""
    old = {k: a.multiplier for k, a in adapters.items()}
    for a in adapters.values():
        a.multiplier = value
    try:
        yield
    finally:
        for k, a in adapters.items():
            a.multiplier = old[k]
