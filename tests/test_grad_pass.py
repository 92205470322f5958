"""comfyui_pcpo.grad_pass without a host: out-of-place residuals, checkpointed blocks that recompute
on a snapshot of their arguments, the LoRA bypass branch and adapter scaling."""
import threading

import torch

from comfyui_pcpo.grad_pass import (checkpoint_blocks, checkpointed_forward, lora_branch_forward,
                                    lora_multiplier, out_of_place_residuals)


def test_out_of_place_residuals_only_inside_and_only_on_this_thread():
    x = torch.zeros(3)
    alias = x
    with out_of_place_residuals():
        x += 1
        seen = {}

        def other():
            y = torch.zeros(2)
            ref = y
            y += 1
            seen["same"] = y is ref
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert x is not alias and torch.equal(x, torch.ones(3)) and torch.equal(alias, torch.zeros(3))
    assert seen["same"]  # another thread kept in-place semantics
    z = torch.zeros(2)
    ref = z
    z += 1
    assert z is ref  # restored after the block
    assert not hasattr(torch.Tensor.__iadd__, "pcpo_out_of_place")


class _Block(torch.nn.Module):
    """A block whose output depends on the shared options dict the host rewrites before each block
    (a block-index-keyed patch), and which updates its residual in place."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(4, 4, generator=g))

    def forward(self, x, transformer_options):
        scale = 1.0 + transformer_options["patches"]["block_index"]
        h = x.clone()
        h += torch.tanh(self.lin(x) * scale)  # the saved tanh output depends on the patch
        return h


def _run(blocks, x, wrap):
    opts = {"patches": {"block_index": 0}}
    fwd = [checkpointed_forward(b) if wrap else b.forward for b in blocks]
    for i, f in enumerate(fwd):
        opts["patches"]["block_index"] = i  # the host writes the current block into the shared dict
        x = f(x, opts)
    return x.square().sum()


def test_checkpointed_blocks_give_the_unchecked_gradient_with_a_block_keyed_patch():
    blocks = [_Block(s) for s in range(3)]
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(9))
    grads = []
    for wrap in (False, True):
        for b in blocks:
            b.zero_grad()
        _run(blocks, x, wrap).backward()
        grads.append(torch.cat([b.lin.weight.grad.flatten() for b in blocks]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_checkpoint_blocks_names_the_block_lists_and_unet_layers():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
            self.input_blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
                                                     for _ in range(2)])
            self.middle_block = torch.nn.Sequential(torch.nn.Linear(2, 2))
            self.final = torch.nn.Linear(2, 2)
    assert checkpoint_blocks(M()) == ["double_blocks.0", "double_blocks.1", "input_blocks.0.0", "input_blocks.0.1",
                                      "input_blocks.1.0", "input_blocks.1.1", "middle_block.0"]


def test_lora_branch_adds_the_adapter_bypass_and_multiplier_scales_it():
    class Adapter:
        multiplier = 1.0

        def bypass(self, x, y, conv):
            assert conv is None
            return y + self.multiplier * x.sum(-1, keepdim=True)
    lin = torch.nn.Linear(3, 2)
    a = Adapter()
    f = lora_branch_forward(lin, a)
    x = torch.randn(4, 3)
    assert torch.allclose(f(x), lin(x) + x.sum(-1, keepdim=True))
    with lora_multiplier({"l": a}, 0.0):
        assert torch.equal(f(x), lin(x))
    assert a.multiplier == 1.0
