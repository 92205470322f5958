"""PCPO Implicit Reward Guidance in a real ComfyUI: lambda 0 and 1 give the base and the LoRA model's
predictions exactly, lambda 2 (and several LoRAs) the closed form eps_ref + sum lambda_k (eps_k - eps_ref),
for an eps model (SD1.5) and flow models (SD3, FLUX with its fused qkv), through ComfyUI's own sampling path with guidance."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_pcpo.irg import combine, repeat_batch

FAMILIES = ["sd15", "sd3", "flux"]


def test_combine_and_repeat():
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(combine([a, b], [0.0]), a) and torch.equal(combine([a, b], [1.0]), b)
    assert torch.allclose(combine([a, b, c], [2.0, -0.5]), a + 2 * (b - a) - 0.5 * (c - a), atol=1e-6)
    with pytest.raises(ValueError):
        combine([a], [1.0])
    c_in = {"c_crossattn": torch.randn(2, 4, 8), "y": torch.randn(2, 5), "pe": torch.randn(1, 3),
            "transformer_options": {"cond_or_uncond": [0, 1], "sigmas": torch.ones(2), "name": "x"},
            "control": {"output": [torch.randn(2, 3), None]}}
    r = repeat_batch(c_in, 2, 3)
    assert r["c_crossattn"].shape == (6, 4, 8) and torch.equal(r["c_crossattn"][4:], c_in["c_crossattn"])
    assert r["pe"] is c_in["pe"] and r["transformer_options"]["cond_or_uncond"] == [0, 1] * 3
    assert r["transformer_options"]["sigmas"].shape == (6,) and r["control"]["output"][1] is None


def same(a, b) -> bool:
    """Equal up to float32 rounding: IRG runs the model once on a batch of K+1 copies, and CPU kernels
    may round a row differently at another batch size (seen: bit-equal on some CPUs, not on others)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def _lora(pcpo, tm, name, seed):
    """A random LoRA for ``tm`` written as a kohya file into the loras folder; returns its name."""
    with torch.inference_mode():
        sess = pcpo.nodes["PCPOLoRA"]().create(tm.model, name, 4, 4.0, "attention", 1e-3, "AdamW", 0.0, seed,
                                               False)[1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in sess.adapters.values():
            a.up.copy_(0.2 * torch.randn(a.up.shape, generator=g))
    with torch.inference_mode():
        pcpo.nodes["PCPOExportLoRA"]().export(sess, f"irg/{name}", "fp32")
    return f"irg/{name}.safetensors"


def _eps(pcpo, tm, model, x, step=1, steps=4, cfg=3.0):
    """(eps or v, sigma) of ``model`` at ``x`` through ComfyUI's CFG model call at one step."""
    hooks = pcpo.mod("nodes.model_hooks")
    sig = tm.sigmas(steps)
    s = sig[step].expand(x.shape[0])

    def fn(predict):
        return predict(x.clone(), s.clone())

    with torch.inference_mode():
        d = hooks.run_in_guider(model, tm.cond(x.shape[0], 5), tm.uncond(x.shape[0]), cfg, tuple(x.shape), sig, fn)
    sv = s.reshape(-1, 1, 1, 1).to(d.dtype)
    return (x - d) / sv, d


@pytest.mark.parametrize("family", FAMILIES)
def test_irg_is_exact_at_0_1_2(pcpo, tiny, comfy_dirs, family):
    import comfy.sd
    import comfy.utils
    import folder_paths
    tm = tiny.build(family)
    n1, n2 = _lora(pcpo, tm, f"irg_{family}_a", 1), _lora(pcpo, tm, f"irg_{family}_b", 2)
    node = pcpo.nodes["PCPOImplicitRewardGuidance"]()
    x = torch.randn((2, tm.latent_channels, 8, 8), generator=torch.Generator().manual_seed(0)) * 3
    eps_ref, d_ref = _eps(pcpo, tm, tm.model, x)
    lora_models = [comfy.sd.load_lora_for_models(tm.model, None, comfy.utils.load_torch_file(
        folder_paths.get_full_path("loras", n), safe_load=True), 1.0, 0)[0] for n in (n1, n2)]
    eps_a, d_a = _eps(pcpo, tm, lora_models[0], x)
    eps_b, _ = _eps(pcpo, tm, lora_models[1], x)
    assert (eps_a - eps_ref).abs().max() > 1e-3  # the LoRA changes the prediction

    def irg(*pairs):
        kw = {}
        for i, (n, lam) in enumerate(pairs[1:], start=2):
            kw[f"lora_name_{i}"], kw[f"guidance_{i}"] = n, lam
        with torch.inference_mode():
            m = node.patch(tm.model, pairs[0][0], pairs[0][1], **kw)[0]
        return _eps(pcpo, tm, m, x)

    e0, d0 = irg((n1, 0.0))
    e1, d1 = irg((n1, 1.0))
    assert same(d0, d_ref) and same(e0, eps_ref)           # lambda 0: the base model
    assert same(d1, d_a) and same(e1, eps_a)                # lambda 1: the LoRA model
    e2, _ = irg((n1, 2.0))
    closed = eps_ref + 2.0 * (eps_a - eps_ref)
    assert torch.allclose(e2, closed, rtol=1e-4, atol=1e-5 * float(closed.abs().max()))
    assert (e2 - eps_a).abs().max() > 1e-3
    e3, _ = irg((n1, 1.5), (n2, -0.5))
    closed3 = eps_ref + 1.5 * (eps_a - eps_ref) - 0.5 * (eps_b - eps_ref)
    assert torch.allclose(e3, closed3, rtol=1e-4, atol=1e-5 * float(closed3.abs().max()))
    # the input MODEL is untouched and the hooks are gone after the call
    e_after, _ = _eps(pcpo, tm, tm.model, x)
    assert torch.equal(e_after, eps_ref)
    assert all(not m._forward_hooks for m in tm.model.model.modules())


def test_irg_samples_with_a_stock_sampler(pcpo, tiny, comfy_dirs):
    """KSampler-style sampling (SamplerCustom path, euler) with IRG at lambda 1 equals sampling with the
    LoRA loaded by ComfyUI's loader."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    tm = tiny.build("sd15")
    name = _lora(pcpo, tm, "irg_sample", 3)
    with torch.inference_mode():
        m = pcpo.nodes["PCPOImplicitRewardGuidance"]().patch(tm.model, name, 1.0)[0]
        lm = comfy.sd.load_lora_for_models(tm.model, None, comfy.utils.load_torch_file(
            folder_paths.get_full_path("loras", name), safe_load=True), 1.0, 0)[0]
        a = dataclasses.replace(tm, model=m).sample(batch=2, height=8, width=8, sampler_name="euler")
        b = dataclasses.replace(tm, model=lm).sample(batch=2, height=8, width=8, sampler_name="euler")
    assert same(a, b) and torch.isfinite(a).all() and (a - tm.sample(batch=2, height=8, width=8, sampler_name="euler")).abs().max() > 1e-3


def test_shipped_irg_workflow_runs(pcpo, comfy, comfy_dirs):
    """workflows/api/demo_tiny_irg.json in ComfyUI's executor, with a LoRA for the demo model under the
    name the workflow expects: both previews show images, and the guided samples differ from the
    base model's (same seed)."""
    import json
    import pathlib
    api = json.loads((pathlib.Path(__file__).resolve().parents[1] / "workflows" / "api" / "demo_tiny_irg.json")
                     .read_text())
    model, _, _ = pcpo.nodes["PCPODemoModelLoader"]().load()
    tm = dataclasses.make_dataclass("Demo", ["model"])(model)
    _lora(pcpo, tm, "irg_demo", 4)
    irg_id = next(k for k, v in api.items() if v["class_type"] == "PCPOImplicitRewardGuidance")
    assert api[irg_id]["inputs"]["lora_name"] == "pcpo/demo_tiny_pcpo.safetensors"
    api[irg_id]["inputs"]["lora_name"] = "irg/irg_demo.safetensors"
    for node in api.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 4
        elif node["class_type"] == "EmptyChromaRadianceLatentImage":
            node["inputs"]["batch_size"] = 2
    res = comfy.execute_prompt(api)
    decoded = [res.outputs[k][0] for k, v in api.items() if v["class_type"] == "VAEDecode"]
    assert len(decoded) == 2 and all(d.shape == (2, 32, 32, 3) for d in decoded)
    assert not torch.equal(decoded[0], decoded[1])
    previews = [k for k, v in api.items() if v["class_type"] == "PreviewImage"]
    assert all(res.ui[k]["images"] for k in previews)
