"""Transition kernels: closed forms, coordinate equivalence, analytic log-ratio vs float64 log-probs."""
import math

import pytest
import torch

from comfyui_pcpo import schedules, transition_kernels as kernels
from comfyui_pcpo.objectives import neg_log_ratio

F64 = torch.float64


def test_gaussian_log_prob_matches_torch_normal_mean_convention():
    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(3, 4, 5, 5, generator=g, dtype=F64), torch.randn(3, 4, 5, 5, generator=g, dtype=F64)
    std = torch.tensor([0.3, 1.0, 2.5], dtype=F64).reshape(3, 1, 1, 1)
    ref = torch.distributions.Normal(mu, std.expand_as(mu)).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(kernels.gaussian_log_prob(x, mu, std), ref, atol=1e-12)
    ref1 = torch.distributions.Normal(mu, 0.7).log_prob(x).flatten(1).mean(1)
    assert torch.allclose(kernels.gaussian_log_prob(x, mu, 0.7), ref1, atol=1e-12)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_prediction_conversions_recover_eps(kind):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g, dtype=F64), torch.randn(2, 4, 3, 3, generator=g, dtype=F64)
    abar = torch.tensor(0.37, dtype=F64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = {"eps": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "x0": x0}[kind]
    assert torch.allclose(kernels.eps_from_prediction(pred, x_t, abar, kind), eps, atol=1e-12)


def test_ancestral_sigma_up_is_ddim_std_in_sigma_units():
    ac = schedules.scaled_linear_alphas_cumprod()
    a, ap = schedules.ddim_abar_pairs(ac, 50)
    for eta in (0.3, 1.0):
        s_vp = kernels.ddim_std(a, ap, eta)
        up = kernels.ancestral_sigma_up(schedules.sigma_from_abar(a), schedules.sigma_from_abar(ap), eta)
        assert torch.allclose(up * ap.sqrt(), s_vp, rtol=1e-10)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_vp_and_sigma_coordinates_give_same_distribution_and_log_ratio(eta):
    """Same step in VP and ComfyUI sigma coordinates: the VE mean/std are the VP ones divided by
    sqrt(abar_prev), and the log-ratio of any two predictions is identical."""
    g = torch.Generator().manual_seed(2)
    a, ap = torch.tensor(0.21, dtype=F64), torch.tensor(0.35, dtype=F64)
    s, sn = schedules.sigma_from_abar(a), schedules.sigma_from_abar(ap)
    x_ve = torch.randn(4, 4, 6, 6, generator=g, dtype=F64) * s
    x_vp = x_ve * a.sqrt()
    eps_old = torch.randn_like(x_ve)
    eps_new = eps_old + 0.05 * torch.randn_like(x_ve)
    noise = torch.randn_like(x_ve)
    std_vp = kernels.ddim_std(a, ap, eta)
    mu_vp, _ = kernels.ddim_vp_step(x_vp, eps_old, a, ap, std_vp)
    up = kernels.ancestral_sigma_up(s, sn, eta)
    mu_ve, std_ve = kernels.ddim_sigma_step(x_ve, eps_old, s, sn, up)
    assert torch.allclose(mu_ve, mu_vp / ap.sqrt(), atol=1e-12)
    assert torch.allclose(std_ve, std_vp / ap.sqrt(), rtol=1e-12)
    xp_vp, xp_ve = mu_vp + std_vp * noise, mu_ve + std_ve * noise
    mu_vp_new, _ = kernels.ddim_vp_step(x_vp, eps_new, a, ap, std_vp)
    mu_ve_new, _ = kernels.ddim_sigma_step(x_ve, eps_new, s, sn, up)
    lr_vp = kernels.gaussian_log_prob(xp_vp, mu_vp_new, std_vp) - kernels.gaussian_log_prob(xp_vp, mu_vp, std_vp)
    lr_ve = kernels.gaussian_log_prob(xp_ve, mu_ve_new, std_ve) - kernels.gaussian_log_prob(xp_ve, mu_ve, std_ve)
    assert torch.allclose(lr_vp, lr_ve, atol=1e-12)
    assert lr_vp.abs().max() > 1e-4  # the predictions differ, so the ratio is not trivially 1


def test_ddim_eta0_is_deterministic_ddim_and_mean_form_matches_c1_c2():
    a, ap = torch.tensor(0.5, dtype=F64), torch.tensor(0.7, dtype=F64)
    x, eps = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    for eta in (0.0, 0.8):
        std = kernels.ddim_std(a, ap, eta)
        mu, _ = kernels.ddim_vp_step(x, eps, a, ap, std)
        alpha = a / ap
        c1 = (1 - a).sqrt() / alpha.sqrt()
        c2 = (1 - ap - std ** 2).sqrt()
        assert torch.allclose(mu, x / alpha.sqrt() - (c1 - c2) * eps, atol=1e-12)


def test_flow_step_reduces_to_euler_without_noise_and_matches_formula():
    x, v = torch.randn(2, 16, 4, 4, dtype=F64), torch.randn(2, 16, 4, 4, dtype=F64)
    mu, std = kernels.flow_sde_step(x, v, 0.8, 0.7, 1e-9)
    assert torch.allclose(mu, x - 0.1 * v, atol=1e-12) and std < 1e-9
    t, tn, s = 0.6, 0.45, 0.3
    mu, std = kernels.flow_sde_step(x, v, t, tn, s)
    dt = t - tn
    expect = x * (1 - s * s * dt / (2 * t)) - dt * (1 + s * s * (1 - t) / (2 * t)) * v
    assert torch.allclose(mu, expect, atol=1e-12) and math.isclose(std, s * math.sqrt(dt))


def _log_ratio_via_logprobs(mu_old, mu_new, std, noise):
    x_prev = mu_old + std * noise
    return kernels.gaussian_log_prob(x_prev, mu_old, std) - kernels.gaussian_log_prob(x_prev, mu_new, std)


@pytest.mark.parametrize("seed", range(4))
def test_analytic_neg_log_ratio_equals_float64_logprob_difference_diffusion(seed):
    from comfyui_pcpo import credit_weights as weights
    g = torch.Generator().manual_seed(seed)
    a, ap = torch.tensor(0.1 + 0.5 * torch.rand(1, generator=g, dtype=F64).item(), dtype=F64), None
    ap = a + (1 - a) * 0.3
    s, sn = schedules.sigma_from_abar(a), schedules.sigma_from_abar(ap)
    eta = 1.0
    up = kernels.ancestral_sigma_up(s, sn, eta)
    x = torch.randn(5, 4, 8, 8, generator=g, dtype=F64) * s
    pred_old = torch.randn_like(x)
    D = torch.randn_like(x) * 10 ** (-torch.randint(0, 4, (1,), generator=g).item())
    noise = torch.randn_like(x)
    mu_old, _ = kernels.ddim_sigma_step(x, pred_old, s, sn, up)
    mu_new, _ = kernels.ddim_sigma_step(x, pred_old + D, s, sn, up)
    ref = _log_ratio_via_logprobs(mu_old, mu_new, up, noise)
    w = weights.sigma_native_weights(torch.stack([s, sn]), up.reshape(1)).expand(5)
    M = neg_log_ratio(D, noise, w)
    assert torch.allclose(M, ref, rtol=1e-9, atol=1e-12)
    # and with Proposition 1's VP weight C(t)/sigma_t
    w_vp = weights.ddim_native_weights(a, ap, eta)
    assert torch.allclose(w, w_vp.expand(5), rtol=1e-12)


@pytest.mark.parametrize("rule,level", [("constant", 0.3), ("flow-grpo", 0.7)])
def test_analytic_neg_log_ratio_equals_float64_logprob_difference_flow(rule, level):
    from comfyui_pcpo import credit_weights as weights
    g = torch.Generator().manual_seed(7)
    ts = schedules.flow_grid(8, 3.0)
    sig = schedules.flow_noise_levels(ts, rule, level)
    w = weights.flow_native_weights(ts, sig)
    for i in range(8):
        t, tn = ts[i], ts[i + 1]
        x = torch.randn(3, 16, 4, 4, generator=g, dtype=F64)
        v_old = torch.randn_like(x)
        D = 1e-2 * torch.randn_like(x)
        noise = torch.randn_like(x)
        mu_old, std = kernels.flow_sde_step(x, v_old, t, tn, sig[i])
        mu_new, _ = kernels.flow_sde_step(x, v_old + D, t, tn, sig[i])
        ref = _log_ratio_via_logprobs(mu_old, mu_new, std, noise)
        assert torch.allclose(neg_log_ratio(D, noise, w[i].expand(3)), ref, rtol=1e-9, atol=1e-13)


def test_prediction_from_denoised_per_sample_sigma_closed_form():
    """ComfyUI returns x0; with x = x0 + sigma eps (diffusion) or x = (1 - t) x0 + t n (flow) the
    kernel predictions are eps and v = n - x0, per sample."""
    from comfyui_pcpo import step_plan as P
    g = torch.Generator().manual_seed(9)
    x0, n = torch.randn(3, 4, 5, 5, generator=g, dtype=F64), torch.randn(3, 4, 5, 5, generator=g, dtype=F64)
    sig = torch.tensor([0.3, 2.0, 14.6], dtype=F64)
    dplan = P.diffusion_plan(torch.tensor([14.6, 2.0, 0.0], dtype=F64), eta=1.0, variant="native")
    x = x0 + sig.reshape(-1, 1, 1, 1) * n
    assert torch.allclose(P.prediction_from_denoised(dplan, x, x0, sig), n, atol=1e-12)
    t = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    fplan = P.flow_plan(torch.tensor([1.0, 0.5, 0.0], dtype=F64), "constant", 0.3)
    xf = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * n
    assert torch.allclose(P.prediction_from_denoised(fplan, xf, x0, t), n - x0, atol=1e-12)
    assert torch.allclose(P.prediction_from_denoised(dplan, x[:1], x0[:1], 0.3), n[:1], atol=1e-12)
