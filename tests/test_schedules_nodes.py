"""Custom SIGMAS through the PCPO nodes (partial denoise, img2img, schedules that cannot be trained)
and the step noise of the PCPO Sampler, in a real ComfyUI 0.3.75 on the tiny models."""
import json

import pytest
import torch

from comfyui_pcpo.plan import prediction_from_denoised, step_mean

ETA = {"sd15": 1.0, "sd3": 0.7, "flux": 0.7}


def test_pcpo_sampler_step_noise_is_not_the_initial_noise(pcpo, tiny):
    """SamplerCustom draws the initial noise from noise_seed; the sampler's first step noise,
    recovered from the first transition, must be a different draw (yet the same for the same seed)."""
    import comfy.sample
    from comfyui_pcpo.run import step_noise_seed
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
