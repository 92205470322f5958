"""Implicit Reward Guidance (host-free part).

A LoRA trained by RL is an implicit reward model: its prediction differs from the base model's by
a term proportional to the reward's gradient.  IRG samples with

    eps = eps_ref + sum_k lambda_k (eps_k - eps_ref)

(``eps_ref`` the base model's prediction, ``eps_k`` the model with LoRA ``k``): lambda 0 is the base
model, 1 the tuned model, > 1 extrapolates along the reward direction, < 0 moves away from it.  All
models are evaluated in one batched call: the input is repeated K + 1 times along the batch and
each LoRA acts only on its own block of rows (:func:`repeat_batch`, :func:`block_rows`).

The combination is written as ``(1 - sum lambda) out_ref + sum lambda_k out_k`` so that lambda 0 and 1
give the base and the tuned prediction bit for bit.  Because the weights sum to one, combining the
denoised outputs that ComfyUI's model call returns (``x - sigma eps`` for eps models, ``x - sigma v``
for flow models) is the same as combining eps / v.

LoRA strength s instead scales the weight delta inside every layer: W + s dW.  Its prediction is
eps(W + s dW) = eps_ref + s J dW + O(s^2) -- the first-order (linearised) version of IRG with
lambda = s; IRG is exact in the model's output for any lambda, at the cost of one more model
evaluation per LoRA and step.
"""
from __future__ import annotations

from typing import Sequence

import torch


def combine(outputs: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """``(1 - sum lambda) outputs[0] + sum_k lambda_k outputs[k + 1]`` (outputs[0]: the base)."""
    if len(outputs) != len(lambdas) + 1:
        raise ValueError(f"IRG needs the base output plus one per LoRA: got {len(outputs)} outputs for "
                         f"{len(lambdas)} lambdas")
    base_w = 1.0 - float(sum(float(l) for l in lambdas))
    out = outputs[0] * base_w
    for o, lam in zip(outputs[1:], lambdas):
        out = out + o * float(lam)
    return out


def repeat_batch(value, batch: int, copies: int):
    """``value`` with every tensor whose first dimension is ``batch`` repeated ``copies`` times along
    it (recursively through dicts, lists and tuples); ComfyUI's per-chunk ``cond_or_uncond`` list is
    repeated too (the batch now holds its chunks ``copies`` times, in the same order); other values
    are kept as they are."""
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == batch:
            return torch.cat([value] * copies, 0)
        return value
    if isinstance(value, dict):
        return {k: (list(v) * copies if k == "cond_or_uncond" and isinstance(v, list)
                    else repeat_batch(v, batch, copies)) for k, v in value.items()}
    if isinstance(value, list):
        return [repeat_batch(v, batch, copies) for v in value]
    if isinstance(value, tuple):
        return tuple(repeat_batch(v, batch, copies) for v in value)
    return value


def block_rows(block: int, batch: int) -> slice:
    """Rows of block ``block`` (0 = base) in a batch repeated by :func:`repeat_batch`."""
    return slice(block * batch, (block + 1) * batch)
