"""FLUX's RoPE is differentiable inside the pack's training flag on every host, by probing the host's
function (not its version) and swapping in the torch RoPE only where backward fails."""
from __future__ import annotations

import pytest
import torch

from comfyui_pcpo import rope as torch_rope


def _inputs(seed=0, dtype=torch.float32, heads=3, seq=5, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(2, heads, seq, dim, generator=g).to(dtype)
    return q, k


def _freqs(fm, seq=5, dim=8, extra=0):
    """FLUX's own frequencies (EmbedND: rope per axis, concatenated, one head axis)."""
    pos = torch.arange(seq + extra, dtype=torch.float32)[None]
    return fm.rope(pos, dim, 10000).unsqueeze(1)


class _NoBackward(torch.autograd.Function):
    """Stands in for a kernel op without an autograd formula (comfy-kitchen's apply_rope)."""
    @staticmethod
    def forward(ctx, q, k, freqs):
        return torch_rope.apply_rope(q, k, freqs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("Trying to backward through fake.apply_rope but no autograd formula was registered")


@pytest.fixture
def caps(pcpo):
    mod = pcpo.mod("nodes.host_caps")
    mod._probed.clear()
    yield mod
    mod._probed.clear()


def test_flux_rope_backward_works_inside_the_training_flag(pcpo):
    """On hosts whose FLUX RoPE is comfy-kitchen's kernel (ComfyUI ~0.7-0.12) this raised "no autograd
    formula was registered"; the gradient must equal the torch RoPE's."""
    import comfy.ldm.flux.math as fm
    hooks = pcpo.mod("nodes.model_hooks")
    host_fn = fm.apply_rope
    q, k = _inputs()
    freqs = _freqs(fm)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), hooks.training_flag():  # as ComfyUI's executor runs the nodes
        with torch.inference_mode(False), torch.enable_grad():
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            oq, ok = fm.apply_rope(qg, kg, freqs)
            ((oq * w).sum() + (ok * w).sum()).backward()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    rq, rk = torch_rope.apply_rope(qr, kr, freqs)
    ((rq * w).sum() + (rk * w).sum()).backward()
    assert torch.allclose(oq, rq, atol=1e-6) and torch.allclose(ok, rk, atol=1e-6)
    assert torch.allclose(qg.grad, qr.grad, atol=1e-6) and torch.allclose(kg.grad, kr.grad, atol=1e-6)
    assert fm.apply_rope is host_fn  # the host's function is back after the flag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_rope_equals_the_hosts_forward(comfy, dtype):
    """The fallback computes what the host's FLUX RoPE computes (the kernel where there is one)."""
    import comfy.ldm.flux.math as fm
    q, k = _inputs(1, dtype)
    for extra in (0, 3):  # frequencies for a longer sequence are trimmed as the host trims them
        freqs = _freqs(fm, extra=extra)
        if extra and not _host_trims(fm):
            continue
        with torch.inference_mode():
            hq, hk = fm.apply_rope(q, k, freqs)
            tq, tk = torch_rope.apply_rope(q, k, freqs)
            t1 = torch_rope.apply_rope1(q, freqs)
        assert tq.dtype == hq.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(tq.float(), hq.float(), atol=tol) and torch.allclose(tk.float(), hk.float(), atol=tol)
        assert torch.equal(t1, tq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_rope_equals_comfy_kitchens_kernel(comfy, dtype):
    """The fallback against comfy-kitchen's op itself (on the CPU), where the host ships it."""
    import comfy.ldm.flux.math as fm
    ck = pytest.importorskip("comfy_kitchen")
    q, k = _inputs(2, dtype)
    freqs = _freqs(fm)
    with torch.inference_mode():
        kq, kk = ck.apply_rope(q, k, freqs)
        tq, tk = torch_rope.apply_rope(q, k, freqs)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(tq.float(), kq.float(), atol=tol) and torch.allclose(tk.float(), kk.float(), atol=tol)


def _host_trims(fm) -> bool:
    q, k = _inputs()
    try:
        fm.apply_rope(q, k, _freqs(fm, extra=3))
        return True
    except RuntimeError:  # 0.3.x: the host needs frequencies of the exact length
        return False


def test_a_rope_without_backward_is_swapped_for_the_pack_calls_only(pcpo, caps, monkeypatch):
    """Capability, not version: whatever the host, a FLUX RoPE whose backward fails is replaced by the
    torch RoPE inside the training flag (rollout and gradient pass alike) and restored after it,
    also when the pass raises; a differentiable one is left alone.  The probe runs once (per
    ``in_training`` value)."""
    import comfy.ldm.flux.math as fm
    hooks = pcpo.mod("nodes.model_hooks")
    calls = []

    def kernel(q, k, freqs):
        calls.append(1)
        return _NoBackward.apply(q, k, freqs)

    monkeypatch.setattr(fm, "apply_rope", kernel)
    assert not caps.flux_rope_differentiable(fm)
    with hooks.training_flag():
        probes = len(calls)
        assert fm.apply_rope is torch_rope.apply_rope and fm.apply_rope1 is torch_rope.apply_rope1
        with hooks.training_mode():  # nested: the gradient pass inside a rollout's flag
            assert fm.apply_rope is torch_rope.apply_rope
        assert fm.apply_rope is torch_rope.apply_rope
    assert fm.apply_rope is kernel
    with pytest.raises(KeyError):
        with hooks.training_mode():
            assert fm.apply_rope is torch_rope.apply_rope
            raise KeyError("interrupted")
    assert fm.apply_rope is kernel and len(calls) == probes  # probed once, cached
    assert caps._installed["depth"] == 0

    differentiable = lambda q, k, f: torch_rope.apply_rope(q, k, f)  # noqa: E731
    monkeypatch.setattr(fm, "apply_rope", differentiable)
    with hooks.training_mode():
        assert fm.apply_rope is differentiable
