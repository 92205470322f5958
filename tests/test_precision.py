"""Training precision, gradient checkpointing and memory handling of the gradient pass, on CPU with
tiny models at realistic latent sizes (64x64 for SD1.5-shaped, 128x128 for SDXL-shaped)."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_pcpo.lora import LoRAWeightDelta
from comfyui_pcpo.precision import resolve_precision

ETA = {"sd15": 1.0, "sdxl": 1.0, "sd2v": 1.0, "sd3": 0.7, "flux": 0.7}
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def build(tiny, family, storage="fp32", as_fp32=False):
    """A tiny model loaded the way ComfyUI loads one (inference tensors) with weights stored in
    ``storage``; ``as_fp32``: the same (storage-rounded) weights kept in fp32, the reference."""
    with torch.inference_mode():
        tm = tiny.build(family)
        dm = tm.model.model.diffusion_model
        if storage != "fp32":
            dm.to(STORAGE[storage])
            if as_fp32:
                dm.to(torch.float32)
    return tm


def session(pcpo, tm, name, precision="fp32", checkpointing="off", optimizer="SGD", lr=1.0):
    with torch.inference_mode():
        return pcpo.nodes["PCPOLoRA"]().create(tm.model, name, 4, 4.0, "attention", lr, optimizer, 0.0, 0, False,
                                               training_precision=precision,
                                               gradient_checkpointing=checkpointing)[1]


def one_update(pcpo, tm, sess, size, groups=1, G=2, steps=3, updates=1, rewards=(0.51, 0.49), zero_lora=False):
    """Sample (same seeds for every model) and run one PCPO update through the nodes with plain SGD
    (lr 1, no clipping, first step: the parameter change is minus the gradient).  Returns
    (gradient vector, stats)."""
    with torch.no_grad():  # the same non-zero LoRA everywhere, so both factors get gradients
        g = torch.Generator().manual_seed(11)
        for a in sess.adapters.values():
            a.up.copy_(0.01 * torch.randn(a.up.shape, generator=g))
            if zero_lora:  # up = down = 0: the LoRA is in the graph but every gradient is 0
                a.up.zero_()
                a.down.zero_()
    before = torch.cat([p.detach().flatten().clone() for p in sess.params()])
    with torch.inference_mode():
        _, batch = pcpo.nodes["PCPOTrajectorySampler"]().sample(
            sess, steps, 3.0, G, 0, ETA[tm.family], "uw-sigma", "constant", "simple", size * 8, size * 8, groups,
            positive=tm.cond(1, 5), negative=tm.uncond(1))
        rw = pcpo.mod("nodes.reward").Rewards(torch.tensor(list(rewards) * groups, dtype=torch.float64),
                                              "test", batch.uid)
        out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 0.34, G, 0.0, updates, 1, 1)
    after = torch.cat([p.detach().flatten() for p in sess.params()])
    return before - after, json.loads(out["result"][1])


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_resolve_precision(monkeypatch):
    import comfyui_pcpo.precision as P
    assert resolve_precision("auto", "cpu") == P.Precision("fp32", torch.float32, False)
    assert resolve_precision("fp16", "cpu").grad_scaling and resolve_precision("bf16", "cpu").dtype == torch.bfloat16
    monkeypatch.setattr(P, "bf16_supported", lambda device: True)
    assert resolve_precision("auto", "cuda:0").name == "bf16"
    monkeypatch.setattr(P, "bf16_supported", lambda device: False)
    assert resolve_precision("auto", "cuda:0") == P.Precision("fp16", torch.float16, True)
    with pytest.raises(ValueError, match="not supported on this GPU"):
        resolve_precision("bf16", "cuda:0")
    with pytest.raises(ValueError, match="training_precision 'fp64'"):
        resolve_precision("fp64", "cpu")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_branch_equals_the_merged_weight(kind):
    """y + branch(x) == layer(x) with W + delta (fp32, closed form), and in bf16 the branch keeps a
    delta that merging into the bf16 weight rounds away."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer = torch.nn.Linear(64, 32)
        x = torch.randn(8, 64, generator=g)
        conv = None
    else:
        layer = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
        x = torch.randn(2, 8, 9, 9, generator=g)
        conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    ad = LoRAWeightDelta(layer.weight.shape, 4, 8.0, generator=g)
    with torch.no_grad():
        ad.up.normal_(0, 0.1, generator=g)
        merged = layer._conv_forward(x, layer.weight + ad.delta(), layer.bias) if conv else \
            torch.nn.functional.linear(x, layer.weight + ad.delta(), layer.bias)
        assert torch.allclose(ad.bypass(x, layer(x), conv), merged, atol=1e-5, rtol=1e-5)
        # a delta below bf16's resolution at most weights: merged into the bf16 weight, most of it is
        # rounded away before the matmul; the fp32 branch loses only what the bf16 output's own
        # rounding loses
        ad.up.mul_(1e-3)
        exact = (merged - (layer._conv_forward(x, layer.weight, layer.bias) if conv else layer(x))).double() * 1e-3
        lb = layer.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        base = lb(xb)
        w16 = lb.weight + ad.delta().to(torch.bfloat16)
        merged16 = (lb._conv_forward(xb, w16, lb.bias) if conv else torch.nn.functional.linear(xb, w16, lb.bias)) - base
        branch16 = ad.bypass(xb, base, conv) - base
        assert cosine(branch16.flatten(), exact.flatten()) > cosine(merged16.flatten(), exact.flatten()) + 0.1


@pytest.mark.parametrize("family,size,storage,precision", [
    ("sd15", 64, "bf16", "bf16"),
    ("sd15", 64, "fp8", "bf16"),
    ("sd15", 32, "fp16", "fp16"),  # CPU fp16 kernels are slow: 256 px here
    ("sdxl", 128, "bf16", "bf16"),
])
def test_16bit_training_gives_the_fp32_gradient(pcpo, tiny, comfy_dirs, family, size, storage, precision):
    """The LoRA gradient of one update with the model stored in fp16/bf16/fp8 and computing in 16
    bits agrees with fp32 training of the same weights (cosine >= 0.99, non-zero), and the first
    update replays the 16-bit rollout exactly (log-ratio 0)."""
    tm_ref = build(tiny, family, storage, as_fp32=True)
    ref = session(pcpo, tm_ref, f"ref_{family}_{storage}", "fp32")
    g32, st32 = one_update(pcpo, tm_ref, ref, size, steps=2)
    tm = build(tiny, family, storage)
    sess = session(pcpo, tm, f"low_{family}_{storage}", precision)
    assert sess.model.pcpo_compute_dtype == STORAGE[precision] and sess.options.precision.name == precision
    assert (sess.state.grad_scaler is not None) == (precision == "fp16")
    g16, st16 = one_update(pcpo, tm, sess, size, steps=2)
    assert st16["first_update_log_ratio"] == 0.0 and st32["first_update_log_ratio"] == 0.0
    assert g16.abs().max() > 0 and st16["skipped_steps"] == 0
    assert cosine(g16, g32) >= 0.99, cosine(g16, g32)
    assert all(p.dtype == torch.float32 for p in sess.params())
    assert all(t.dtype == torch.float32 for s in sess.optimizer.state.values() for t in s.values())


@pytest.mark.parametrize("family,size", [("sd15", 32), ("sdxl", 32), ("flux", 32)])
def test_checkpointing_gives_the_same_gradient(pcpo, tiny, comfy_dirs, family, size):
    """Same gradient with and without checkpointing, and checkpointing is really on: every
    checkpointed unit runs its forward once more (the recomputation) in the gradient pass."""
    hooks = pcpo.mod("nodes.model_hooks")
    grads, calls = {}, {}
    for ck in ("off", "on"):
        tm = build(tiny, family)
        sess = session(pcpo, tm, f"ckpt_{family}_{ck}", "fp32", ck)
        assert sess.options.checkpointing == (ck == "on")
        dm = sess.model.model.diffusion_model
        # a module inside each checkpointed unit (the recomputation calls the unit's forward directly,
        # but the modules inside it through their hooks)
        inner = {n: list(dm.get_submodule(n).modules())[1] for n in hooks.checkpoint_blocks(dm)
                 if len(list(dm.get_submodule(n).modules())) > 1}
        counts = {n: 0 for n in inner}
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: counts.__setitem__(n, counts[n] + 1))
                   for n, m in inner.items()]
        try:
            grads[ck], st = one_update(pcpo, tm, sess, size)
        finally:
            for h in handles:
                h.remove()
        calls[ck] = counts
        assert st["first_update_log_ratio"] == 0.0
    assert grads["on"].abs().max() > 0
    assert torch.allclose(grads["on"], grads["off"], rtol=1e-4, atol=1e-9)
    # units after the first LoRA layer carry grad and are recomputed; earlier ones need no backward
    on, off = calls["on"], calls["off"]
    assert all(on[n] >= off[n] > 0 for n in on), calls
    assert sum(on[n] > off[n] for n in on) >= len(on) // 2, calls


def test_checkpointing_defaults_by_architecture(pcpo, tiny, comfy_dirs):
    S = pcpo.mod("nodes.session")
    assert not S.TrainingOptions.resolve(build(tiny, "sd15").model).checkpointing
    assert S.TrainingOptions.resolve(build(tiny, "sdxl").model).checkpointing
    assert S.TrainingOptions.resolve(build(tiny, "flux").model).checkpointing
    hooks = pcpo.mod("nodes.model_hooks")
    names = hooks.checkpoint_blocks(build(tiny, "flux").model.model.diffusion_model)
    assert names == ["double_blocks.0", "single_blocks.0"] or all(n.split(".")[0] in ("double_blocks", "single_blocks")
                                                                  for n in names)
    unet = hooks.checkpoint_blocks(build(tiny, "sd15").model.model.diffusion_model)
    assert "middle_block.1" in unet and "input_blocks.1.1" in unet  # the layers ComfyUI calls one by one


def test_gradient_scaling_skips_overflow_and_is_checkpointed(pcpo, tiny, comfy_dirs):
    """fp16's loss scaling: a step whose scaled gradients overflow is skipped (nothing changes but
    the scale, which halves), and the scale lives in the checkpoint."""
    from comfyui_pcpo.run_state import read_checkpoint
    tm = build(tiny, "sd15")
    sess = session(pcpo, tm, "scaler", "fp16")
    scaler_state = sess.state.grad_scaler.state_dict()
    sess.state.grad_scaler.load_state_dict({**scaler_state, "scale": 2.0 ** 126})  # no gradient survives it
    steps_before = {k: dict(v) for k, v in sess.optimizer.state.items()}
    delta, stats = one_update(pcpo, tm, sess, 16)
    assert stats["skipped_steps"] == 1 and torch.equal(delta, torch.zeros_like(delta))
    assert sess.optimizer.state.keys() == steps_before.keys()  # SGD took no step: no momentum yet
    assert stats["grad_scale"] == 2.0 ** 125 and any("skipped" in w for w in stats["warnings"])
    _, md = read_checkpoint(sess.checkpoint_path)
    assert json.loads(md["grad_scaler"])["scale"] == 2.0 ** 125
    pcpo.mod("nodes.session").SESSIONS.pop("scaler")
    with torch.inference_mode():
        resumed = pcpo.nodes["PCPOLoRA"]().create(tm.model, "scaler", 4, 4.0, "attention", 1.0, "SGD", 0.0, 0, True,
                                                  training_precision="fp16")[1]
    assert resumed.state.grad_scaler.get_scale() == sess.state.grad_scaler.get_scale()


def test_a_run_without_usable_gradient_stops_with_a_clear_error(pcpo, tiny, comfy_dirs):
    tm = build(tiny, "sd15")
    sess = session(pcpo, tm, "stalled", "fp32")
    for i in range(2):
        _, stats = one_update(pcpo, tm, sess, 8, zero_lora=True)
        assert stats["grad_norm"] == 0.0 and any("no usable gradient" in w for w in stats["warnings"])
    with pytest.raises(RuntimeError, match="training_precision") as e:
        one_update(pcpo, tm, sess, 8, zero_lora=True)
    assert "3 iterations" in str(e.value) and sess.iteration == 3
    # rewards that do not differ within a group give a zero gradient that is correct: no error
    fresh = session(pcpo, tm, "flat_rewards", "fp32")
    for _ in range(3):
        _, stats = one_update(pcpo, tm, fresh, 8, rewards=(0.5, 0.5), zero_lora=True)
    assert fresh.iteration == 3 and stats["warnings"] == []


def test_a_skipped_step_is_not_counted_twice_as_a_stall(pcpo, tiny, comfy_dirs):
    """One fp16 step applied and one skipped for overflow: the iteration has a usable gradient (no
    warning, the stall counter stays 0); all steps skipped or zero is a stall."""
    from comfyui_pcpo.iteration import gradient_stalled as stalled
    base = {"zero_std_groups": 0, "groups": 2, "grad_norm": float("inf")}
    assert not stalled({**base, "grad_norms": [0.5, float("inf")], "skipped_steps": 1})
    assert not stalled({**base, "grad_norms": [float("nan"), 0.5], "skipped_steps": 1})
    assert stalled({**base, "grad_norms": [float("inf"), float("inf")], "skipped_steps": 2})
    assert stalled({**base, "grad_norms": [0.0, float("inf")], "skipped_steps": 1})
    tm = build(tiny, "sd15")
    sess = session(pcpo, tm, "one_skip", "fp16")
    scaler_state = sess.state.grad_scaler.state_dict()
    # the first step fits this scale; after it the gradient is larger and the second step overflows
    sess.state.grad_scaler.load_state_dict({**scaler_state, "scale": 2.0 ** 17})
    delta, stats = one_update(pcpo, tm, sess, 8, updates=2)
    assert stats["skipped_steps"] == 1 and delta.abs().max() > 0  # one step was applied
    assert not any("no usable gradient" in w for w in stats["warnings"])
    assert sess.state.stalled_iterations == 0


def test_partial_load_is_refused_and_adapters_never_move(pcpo, tiny, comfy_dirs):
    import comfy.model_patcher
    hooks = pcpo.mod("nodes.model_hooks")
    tm = build(tiny, "sd15")
    mp, adapters = hooks.attach_lora(tm.model, 4, 4.0, "attention")

    class HalfLoaded(comfy.model_patcher.ModelPatcher):
        """A patcher that reports what a low-VRAM (partial) load reports."""

        def loaded_size(self):
            return self.model_size() // 2

    half = HalfLoaded(mp.model, mp.load_device, mp.offload_device)
    hooks.load_for_training(mp, (4, 8, 8), 2)  # a full load passes
    with pytest.raises(RuntimeError, match="whole model") as e:
        hooks.load_for_training(half, (4, 8, 8), 2)
    assert "gradient_checkpointing" in str(e.value) and "--lowvram" in str(e.value)
    a = next(iter(adapters.values()))
    assert a.move_to(device="cpu") == 0 and a.memory_bytes() == 4 * (a.up.numel() + a.down.numel())


def block_keyed_attn1_patch(n, context, value, extra_options):
    """An attention patch keyed by the block it runs in (as IP-Adapter's per-block patches are):
    the scale of the self-attention input differs per (block, index)."""
    kind, index = extra_options["block"]
    scale = 1.0 + 0.25 * index + (0.5 if kind == "output" else 0.0) + 0.1 * extra_options.get("block_index", 0)
    return n * scale, context, value


def test_checkpointing_with_a_block_keyed_attention_patch(pcpo, tiny, comfy_dirs):
    """The recomputation in backward reads the transformer options the forward read, not what later
    blocks set in them: with a patch keyed by the block, the checkpointed gradient equals the plain one."""
    grads = {}
    for ck in ("off", "on"):
        tm = build(tiny, "sd15")
        tm.model.set_model_attn1_patch(block_keyed_attn1_patch)
        sess = session(pcpo, tm, f"ckpt_patch_{ck}", "fp32", ck)
        assert sess.options.checkpointing == (ck == "on")
        grads[ck], st = one_update(pcpo, tm, sess, 32)
        assert st["first_update_log_ratio"] == 0.0
    assert grads["on"].abs().max() > 0
    assert cosine(grads["on"], grads["off"]) > 0.999999
    assert torch.allclose(grads["on"], grads["off"], rtol=1e-4, atol=1e-9)
