"""The embedded demo flow model: loads through its node as a rectified-flow MODEL (shift 3) and PCPO
trains a LoRA on it."""
import json
import os

import torch


def _load(pcpo):
    return pcpo.nodes["PCPODemoFlowModelLoader"]().load()


def test_flow_weights_are_small_and_described():
    from comfyui_pcpo.demo import flow_model as F
    assert F.flow_weights_available()
    assert os.path.getsize(F.FLOW_WEIGHTS_PATH) < 10 * 1024 * 1024
    cfg = F.load_flow_config()
    assert cfg["sampling_settings"]["shift"] == 3.0 and cfg["prediction_type"] == "flow"
    assert cfg["unet_config"]["in_channels"] == 3 and cfg["unet_config"]["adm_in_channels"] is None
    assert 0.0 < cfg["base_eval"]["training29"]["mean_reward"] < 1.0


def test_flow_model_loads_as_sd3_shaped_flow_model_with_shift_3(pcpo):
    import comfy.model_base
    import comfy.model_sampling
    model, clip, vae = _load(pcpo)
    assert model.model.model_type == comfy.model_base.ModelType.FLOW
    assert isinstance(model.model, comfy.model_base.SD3)
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow) and float(ms.shift) == 3.0
    fam = pcpo.mod("nodes.model_hooks").model_family(model)
    assert (fam.kind, fam.prediction) == ("flow", "flow")
    # ComfyUI's denoised output is the training convention x - t v(x, 1000 t), with the demo text encoder
    cond = clip.encode_from_tokens(clip.tokenize("a red circle on a blue background"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.6])
    with torch.no_grad():
        den = model.model.apply_model(x, t, c_crossattn=cond)
        v = model.model.diffusion_model(x, t * 1000.0, context=cond)
    assert torch.allclose(den, x - 0.6 * v, atol=1e-5)
    assert not torch.allclose(v, torch.zeros_like(v))


def test_two_pcpo_iterations_on_the_flow_model_change_the_lora(pcpo):
    model, clip, vae = _load(pcpo)
    _, sess = pcpo.nodes["PCPOLoRA"]().create(model, "demo_flow_test", 4, 4.0, "attention+mlp", 1e-3, "AdamW", 0.0,
                                              0, False)
    before = [p.detach().clone() for p in sess.params()]
    prompts = pcpo.nodes["PCPOPrompts"]().build(clip, "a red circle on a blue background\na green square on a "
                                                "white background", "(none)", "", 2, 0)[0]
    for it in range(2):
        with torch.inference_mode():
            lat, batch = pcpo.nodes["PCPOTrajectorySampler"]().sample(sess, 4, 4.0, 2, it, 0.7, "native", "flow-grpo",
                                                                      "simple", 32, 32, 1, prompts=prompts)
            images = vae.decode(lat["samples"])
            rw, _ = pcpo.nodes["PCPORewardScorer"]().score(images, batch, "brightness")
            out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 2, 1.0, 2, 1, 10)
        st = json.loads(out["result"][1])
        assert batch.traj.plan.family == "flow" and batch.traj.plan.noise_rule == "flow-grpo"
        for k in ("reward_mean", "grad_norm", "approx_kl"):
            assert st[k] == st[k] and abs(st[k]) < float("inf"), (k, st[k])
        assert st["grad_norm"] > 0
    after = [p.detach() for p in sess.params()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(a).all() for a in after)


def test_heldout_evaluation_samples_with_the_training_noise_rule(pcpo, comfy_dirs):
    """A run trained with the flow-grpo noise rule is evaluated with it (not the constant rule)."""
    model, clip, vae = _load(pcpo)
    _, sess = pcpo.nodes["PCPOLoRA"]().create(model, "demo_flow_heldout", 4, 4.0, "attention", 1e-3, "AdamW", 0.0,
                                              0, False)
    text, encode = "a red circle on a blue background", pcpo.mod("nodes.prompts").encode_text
    with torch.inference_mode():
        lat, batch = pcpo.nodes["PCPOTrajectorySampler"]().sample(sess, 4, 4.0, 2, 0, 0.7, "native", "flow-grpo",
                                                                  "simple", 32, 32, 1, positive=encode(clip, text),
                                                                  negative=encode(clip, ""))
        rw, _ = pcpo.nodes["PCPORewardScorer"]().score(vae.decode(lat["samples"]), batch, "brightness")
        pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 2, 1.0, 1, 1, 10)
        node = pcpo.nodes["PCPOHeldOutEvaluation"]
        held = node().evaluate(sess, clip, vae, text, "", 1, 2, 4, 4.0, 0.7, "simple", 32, 32, 7, "brightness",
                               "(none)")["result"][0]
        from comfyui_pcpo import rewards
        args = (sess, clip, vae, [text], "", 2, 4, 4.0, 0.7, "simple", 32, 32, 7, rewards.builtin_reward("brightness"),
                [])
        grpo, constant = node.run(*args, flow_rule="flow-grpo"), node.run(*args, flow_rule="constant")
    assert held.fresh and held.iteration == 1
    assert not torch.equal(grpo.images, constant.images)
    assert torch.equal(held.images, grpo.images) and held.kl_base == grpo.kl_base
