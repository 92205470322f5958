"""Custom SIGMAS through the PCPO nodes (partial denoise, img2img, schedules that cannot be trained)
and the step noise of the PCPO Sampler, in a real ComfyUI 0.3.75 on the tiny models."""
import json

import pytest
import torch

from comfyui_pcpo.step_plan import prediction_from_denoised, step_mean

ETA = {"sd15": 1.0, "sd3": 0.7, "flux": 0.7}


def test_pcpo_sampler_step_noise_is_not_the_initial_noise(pcpo, tiny):
    """SamplerCustom draws the initial noise from noise_seed; the sampler's first step noise,
    recovered from the first transition, must be a different draw (yet the same for the same seed)."""
    import comfy.sample
    from comfyui_pcpo.run_state import step_noise_seed
    P = pcpo.mod("nodes.sampler")
    tm = tiny.build("sd15")
    sampler = pcpo.nodes["PCPOSampler"]().get_sampler(1.0, "native", "constant")[0]
    sigmas = tm.sigmas(4)
    seen = {}

    def cb(i, denoised, x, total):
        seen[i] = (x.detach().clone(), denoised.detach().clone())

    a = tm.sample(batch=2, sampler=sampler, sigmas=sigmas, seed=0, callback=cb)
    plan = P.make_plan(P.ModelFamily("diffusion", "", ""), sigmas.double(), 1.0, "native", "constant")
    (x0, d0), (x1, _) = seen[0], seen[1]
    mu = step_mean(plan, 0, x0, prediction_from_denoised(plan, x0, d0, float(plan.sigmas[0])))
    eps0 = (x1 - mu) / float(plan.std[0])
    initial = comfy.sample.prepare_noise(tm.empty_latent(2)["samples"], 0)
    expected = torch.randn(initial.shape, generator=torch.Generator().manual_seed(step_noise_seed(0)))
    assert torch.allclose(eps0, expected, atol=1e-3)
    assert not torch.allclose(eps0, initial, atol=0.5)
    assert step_noise_seed(0) != 0 and step_noise_seed(5) != 5
    assert torch.equal(a, tm.sample(batch=2, sampler=sampler, sigmas=sigmas, seed=0))


def make_session(pcpo, tm, name):
    return pcpo.nodes["PCPOLoRA"]().create(tm.model, name, 4, 4.0, "attention", 1e-3, "AdamW", 0.0, 0, False)[1]


def trajectory_sampler(pcpo, tm, sess, sigmas, latent=None, G=2, groups=2, seed=0, size=64):
    with torch.inference_mode():  # ComfyUI's executor runs nodes in inference mode
        return pcpo.nodes["PCPOTrajectorySampler"]().sample(
            sess, 4, 3.0, G, seed, ETA[tm.family], "uw-sigma", "constant", "simple", size, size, groups,
            positive=tm.cond(1, 5), negative=tm.uncond(1), latent=latent, sigmas=sigmas)


def lora_update(pcpo, sess, batch, images):
    with torch.inference_mode():
        rw, _ = pcpo.nodes["PCPORewardScorer"]().score(images, batch, "brightness")
        out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 2, 1.0, 2, 1, 1)
    return json.loads(out["result"][1])


def comfyui_start(tm, noise, latent, sigmas):
    """The x ComfyUI's SamplerCustom hands its sampler function for this noise, LATENT and SIGMAS."""
    import comfy.sample
    import comfy.samplers
    seen = {}

    def capture(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["x"] = x.detach().cpu().clone()
        return x

    comfy.sample.sample_custom(tm.model, noise, 1.0, comfy.samplers.KSAMPLER(capture), sigmas,
                               tm.cond(1, 5), tm.uncond(1), latent, disable_pbar=True, seed=0)
    return seen["x"]


def comfyui_replay(tm, noise, latent, sigmas, plan, step_noise):
    """ComfyUI's SamplerCustom output for this noise, LATENT and SIGMAS with a sampler function that
    takes the rollout's steps with the given step noise (B, S, ...)."""
    import comfy.sample
    import comfy.samplers

    def replay(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(plan.num_steps):
            s = sigmas[i] * x.new_ones(x.shape[0])
            pred = prediction_from_denoised(plan, x, model(x, s, **(extra_args or {})), s)
            x = step_mean(plan, i, x, pred) + float(plan.std[i]) * step_noise[:, i].to(x)
        return x

    return comfy.sample.sample_custom(tm.model, noise, 3.0, comfy.samplers.KSAMPLER(replay), sigmas,
                                      tm.cond(1, 5), tm.uncond(1), latent, disable_pbar=True, seed=0)


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("image", [True, False], ids=["img2img", "empty"])
def test_partial_denoise_schedule_starts_from_the_latent_and_trains(pcpo, tiny, family, image):
    """SIGMAS that start below sigma_max (the second half of SplitSigmas, a denoise < 1 schedule):
    the rollout starts where ComfyUI's sampler would, from the LATENT (an image, or an empty one)
    plus the initial noise scaled to sigmas[0], and the update trains the steps of that schedule."""
    from comfyui_pcpo.run_state import rollout_generator
    tm = tiny.build(family)
    sess = make_session(pcpo, tm, f"partial_{family}_{image}")
    ms = tm.model_sampling()
    sigmas = tm.sigmas(3, denoise=0.5)
    assert float(sigmas[0]) < 0.9 * float(ms.sigma_max) and float(sigmas[-1]) == 0.0
    C = tm.latent_channels
    lat = (torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(9)) if image
           else torch.zeros(1, C, 8, 8))
    out, batch = trajectory_sampler(pcpo, tm, sess, sigmas, latent={"samples": lat})
    traj = batch.traj
    assert traj.num_steps == 3 and torch.allclose(traj.plan.sigmas.float(), sigmas)
    for g in range(2):
        noise = torch.randn((1, C, 8, 8), generator=rollout_generator(0, 0, g)).repeat(2, 1, 1, 1)
        expect = comfyui_start(tm, noise, lat.repeat(2, 1, 1, 1), sigmas)
        start = traj.latents[2 * g:2 * g + 2, 0]
        assert torch.allclose(start, expect, atol=1e-5)
        base = tm.model.model.process_latent_in(lat) if image else lat  # ComfyUI never shifts an empty latent
        s0 = float(sigmas[0])
        scaled = s0 * noise + (1 - s0) * base if family == "flux" else s0 * noise + base
        assert torch.allclose(start, scaled, atol=1e-5)
        # and ends where ComfyUI's sampling path ends with the same initial and step noise
        final = comfyui_replay(tm, noise, lat.repeat(2, 1, 1, 1), sigmas, traj.plan, traj.eps_old[2 * g:2 * g + 2])
        assert torch.allclose(out["samples"][2 * g:2 * g + 2], final, atol=1e-4)
    stats = lora_update(pcpo, sess, batch, torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(1)))
    assert stats["first_update_log_ratio"] == 0.0 and max(stats["grad_norms"]) > 0 and sess.iteration == 1
    assert any(a.up.abs().sum() > 0 for a in sess.adapters.values())  # the LoRA moved


def test_latent_batch_must_be_one_image_or_one_per_group(pcpo, tiny):
    from comfyui_pcpo.run_state import rollout_generator
    tm = tiny.build("sd15")
    sess = make_session(pcpo, tm, "latent_batch")
    sigmas = tm.sigmas(3, denoise=0.5)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    _, batch = trajectory_sampler(pcpo, tm, sess, sigmas, latent={"samples": lat}, groups=2)
    x0, s0 = batch.traj.latents[:, 0], float(sigmas[0])  # group g starts from image g
    for g in range(2):
        noise = torch.randn((1, 4, 8, 8), generator=rollout_generator(0, 0, g))[0]
        image = tm.model.model.process_latent_in(lat[g:g + 1])[0]
        assert torch.allclose(x0[2 * g], image + s0 * noise, atol=1e-5) and torch.equal(x0[2 * g], x0[2 * g + 1])
    with pytest.raises(ValueError, match="LATENT has 3 images"):
        trajectory_sampler(pcpo, tm, sess, sigmas, latent={"samples": torch.randn(3, 4, 8, 8)}, groups=2)
    with pytest.raises(ValueError, match="noise_mask"):
        trajectory_sampler(pcpo, tm, sess, sigmas, latent={"samples": lat[:1], "noise_mask": torch.ones(1, 8, 8)})
    # an empty latent of any batch only sets the size, as before
    out, _ = trajectory_sampler(pcpo, tm, sess, sigmas, latent={"samples": torch.zeros(4, 4, 8, 8)})
    assert out["samples"].shape == (4, 4, 8, 8)


class NoPrompts:
    """A PCPO_PROMPTS stand-in that fails the test if the sampler gets as far as drawing prompts."""
    per_iteration = 2

    def draw(self, iteration):
        raise AssertionError("the sampler began a rollout")


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_schedule_not_ending_at_zero_is_refused_before_sampling(pcpo, tiny, family):
    tm = tiny.build(family)
    sess = make_session(pcpo, tm, f"noisy_end_{family}")
    first_half = tm.sigmas(4)[:3]  # SplitSigmas(step 2), first output: ends at a noise level
    with pytest.raises(ValueError, match=r"sigmas.*end the schedule at 0: don't use the first half of SplitSigmas"):
        with torch.inference_mode():
            pcpo.nodes["PCPOTrajectorySampler"]().sample(
                sess, 4, 3.0, 2, 0, ETA[family], "uw-sigma", "constant", "simple", 64, 64, 2, prompts=NoPrompts(),
                sigmas=first_half)
    assert sess.iteration == 0
    # the same SIGMAS as a SAMPLER's schedule stay valid: SamplerCustom may hand a noisy latent on
    sampler = pcpo.nodes["PCPOSampler"]().get_sampler(ETA[family], "native", "constant")[0]
    assert torch.isfinite(tm.sample(batch=1, sampler=sampler, sigmas=first_half)).all()


def test_schedule_without_a_trainable_step_is_refused_at_the_sampler(pcpo, tiny):
    """A single step into sigma 0 is deterministic: nothing to train.  The sampler refuses it (the
    update used to fail with an IndexError)."""
    tm = tiny.build("sd15")
    sess = make_session(pcpo, tm, "no_trainable")
    last = tm.sigmas(4)[-2:]  # SplitSigmas(step 3), second output: one step into 0
    with pytest.raises(ValueError, match=r"(?s)no stochastic step.*sigmas.*steps.*train_fraction"):
        with torch.inference_mode():
            pcpo.nodes["PCPOTrajectorySampler"]().sample(
                sess, 4, 3.0, 2, 0, 1.0, "uw-sigma", "constant", "simple", 64, 64, 2, prompts=NoPrompts(), sigmas=last)
    assert sess.iteration == 0


def test_trainer_refuses_a_trajectory_without_a_trainable_step():
    """The host-free trainer names the cause instead of failing with an IndexError."""
    import dataclasses
    from comfyui_pcpo.step_plan import diffusion_plan
    from comfyui_pcpo.trainer import PCPOConfig, PCPOTrainer
    from comfyui_pcpo.trajectory import Trajectory
    plan = diffusion_plan(torch.tensor([1.0, 0.5, 0.0]), 1.0, "native")
    plan = dataclasses.replace(plan, std=torch.zeros(2, dtype=torch.float64))  # every step deterministic
    traj = Trajectory(torch.zeros(2, 3, 1, 2, 2), torch.zeros(2, 2, 1, 2, 2), torch.zeros(2, 2, 1, 2, 2),
                      torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), plan)
    w = torch.zeros(1, requires_grad=True)
    trainer = PCPOTrainer([w], torch.optim.SGD([w], lr=0.1), PCPOConfig())
    with pytest.raises(ValueError, match=r"(?s)no stochastic step.*train_fraction"):
        trainer.update(traj, torch.tensor([0.0, 1.0]), predict=lambda x, s, rows: x)
