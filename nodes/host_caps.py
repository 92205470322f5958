"""What the running ComfyUI can do where the pack's gradient pass depends on it, found out by trying
it (never by version number), with the pack's fallback where it cannot.

FLUX's RoPE.  From early 2026 ``comfy.ldm.flux.math.apply_rope`` calls comfy-kitchen's ``apply_rope``
op, which has no autograd formula; later releases route it back to torch while
``comfy.model_management.in_training`` is set (:func:`nodes.model_hooks.training_flag` sets it), releases in
between offer no switch at all (comfy-kitchen's backend registry only picks which kernel runs the
op, and none of them has a backward).  So :func:`differentiable_flux_rope` probes the host's
function on a tiny tensor and, only where backward fails, swaps the module attributes that FLUX's
``attention`` looks up at call time for the same math in torch (:mod:`comfyui_pcpo.rope`), for the
duration of the pack's rollout and gradient pass (both, so that they run the same numerics and the
first-update log-ratio stays 0), and puts the host's functions back afterwards.  Patching a host
module is the last resort here: the host gives no switch to turn its kernel off.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch

import comfy.model_management

from comfyui_pcpo import rope as torch_rope

log = logging.getLogger("comfyui-pcpo")

_ROPE_NAMES = ("apply_rope", "apply_rope1")
_lock = threading.Lock()
_installed = {"depth": 0, "saved": {}}
_probed: dict = {}  # (host apply_rope, in_training) -> it has a correct backward


def flux_math():
    """ComfyUI's ``comfy.ldm.flux.math`` (None if this host has no FLUX)."""
    try:
        import comfy.ldm.flux.math as fm
    except Exception:  # noqa: BLE001 - a host without FLUX: nothing to make differentiable
        return None
    return fm


def _probe(fn) -> bool:
    """True when ``fn(q, k, freqs)`` returns tensors whose backward reaches q and k with the torch
    rope's gradient (2 heads, 3 positions, head dim 4, on the CPU)."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        q = torch.randn(1, 2, 3, 4, generator=g, requires_grad=True)
        k = torch.randn(1, 2, 3, 4, generator=g, requires_grad=True)
        ang = torch.randn(1, 1, 3, 2, generator=g)
        freqs = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], -1).reshape(1, 1, 3, 2, 2, 2)
        w = torch.randn(1, 2, 3, 4, generator=g)
        try:
            oq, ok = fn(q, k, freqs)
            got = torch.autograd.grad((oq * w).sum() + (ok * w).sum(), (q, k))
        except Exception as e:  # noqa: BLE001 - any failure means: not differentiable here
            log.info("comfyui-pcpo: the host's FLUX RoPE has no working backward (%s: %s); training uses the "
                     "torch RoPE", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return False
        rq, rk = torch_rope.apply_rope(q, k, freqs)
        want = torch.autograd.grad((rq * w).sum() + (rk * w).sum(), (q, k))
    ok = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    if not ok:
        log.info("comfyui-pcpo: the host's FLUX RoPE gives another gradient than RoPE's; training uses the torch RoPE")
    return ok


def flux_rope_differentiable(fm=None) -> bool:
    """Whether the host's FLUX ``apply_rope`` (as it is now, e.g. with ``in_training`` set) has a
    correct backward; probed once per function and ``in_training`` value."""
    fm = fm if fm is not None else flux_math()
    if fm is None or not hasattr(fm, "apply_rope"):
        return True
    fn = fm.apply_rope
    key = (fn, getattr(comfy.model_management, "in_training", None))
    if key not in _probed:
        _probed[key] = _probe(fn)
    return _probed[key]


@contextlib.contextmanager
def differentiable_flux_rope():
    """FLUX's RoPE differentiable for the duration: the host's where it already is, else the torch
    one (:mod:`comfyui_pcpo.rope`) in ``comfy.ldm.flux.math``.  Nested and concurrent uses share one
    swap, decided on the outermost entry; the outermost exit puts the host's functions back."""
    fm = flux_math()
    if fm is None:
        yield
        return
    with _lock:
        if _installed["depth"] == 0:
            swap = not flux_rope_differentiable(fm)
            _installed["saved"] = {n: getattr(fm, n) for n in _ROPE_NAMES if swap and hasattr(fm, n)}
            for n in _installed["saved"]:
                setattr(fm, n, getattr(torch_rope, n))
        _installed["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _installed["depth"] -= 1
            if _installed["depth"] == 0:
                for n, v in _installed["saved"].items():
                    setattr(fm, n, v)
                _installed["saved"] = {}
