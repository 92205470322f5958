"""The one rollout loop (comfyui_pcpo.rollout): its injectable noise source, its per-step hook, and
the KL-to-reference hook the held-out evaluation uses, against closed forms (float64)."""
import math

import pytest
import torch

from comfyui_pcpo.step_plan import diffusion_plan, flow_plan, mean_coefficients, step_mean
from comfyui_pcpo.rollout import KLToReference, cpu_noise, rollout


def _plans():
    sig = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0], dtype=torch.float64)
    ts = torch.linspace(1.0, 0.0, 6, dtype=torch.float64)
    return [diffusion_plan(sig, 1.0, "native"), diffusion_plan(sig, 0.7, "uw-sigma"), flow_plan(ts, "constant", 0.5)]


@pytest.mark.parametrize("plan", _plans(), ids=["ddim-native", "ddim-uw-sigma", "flow"])
def test_injected_zero_noise_gives_the_mean_chain_and_is_called_once_per_step(plan):
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    calls = []

    def zeros(i, x):
        calls.append(i)
        return torch.zeros_like(x)

    def predict(x, s):
        return 0.2 * x + 0.1 * s.view(-1, 1, 1, 1)
    xf, rec = rollout(predict, plan, x0, zeros)
    x = x0
    for i in range(plan.num_steps):
        x = step_mean(plan, i, x, predict(x, torch.full((3,), float(plan.sigmas[i]), dtype=x.dtype)))
    assert calls == list(range(plan.num_steps))
    assert torch.equal(xf, x)
    assert torch.count_nonzero(rec["eps_old"]) == 0


def test_a_generator_and_its_cpu_noise_source_give_the_same_rollout_bit_for_bit():
    plan = _plans()[0]
    x0 = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2))

    def predict(x, s):
        return torch.tanh(x)
    a, ra = rollout(predict, plan, x0, torch.Generator().manual_seed(7))
    b, rb = rollout(predict, plan, x0, cpu_noise(torch.Generator().manual_seed(7)))
    assert torch.equal(a, b) and torch.equal(ra["eps_old"], rb["eps_old"])
    c, _ = rollout(predict, plan, x0, torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("plan", _plans(), ids=["ddim-native", "ddim-uw-sigma", "flow"])
def test_kl_to_reference_matches_the_closed_form(plan):
    """pred - pred_ref = d (a constant): step i's means differ by c_i d (mu = a_i x - c_i pred), so
    KL_i = (c_i d)^2 / (2 std_i^2) per element, summed over the stochastic steps."""
    d = 0.3
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def ref(x, s):
        return 0.5 * x

    def predict(x, s):
        return ref(x, s) + d
    hook = KLToReference(plan, ref, 4)
    steps = []
    rollout(predict, plan, x0, torch.Generator().manual_seed(4), record=False,
            on_step=lambda i, x, s, p: (steps.append(i), hook(i, x, s, p)))
    _, c = mean_coefficients(plan)
    std = plan.std
    expected = sum(float((c[i] * d) ** 2 / (2 * std[i] ** 2)) for i in range(plan.num_steps) if std[i] > 0)
    assert steps == list(range(plan.num_steps))
    assert expected > 0
    assert torch.allclose(hook.kl, torch.full((4,), expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_kl_to_reference_is_zero_for_the_reference_itself():
    plan = _plans()[1]
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    hook = KLToReference(plan, lambda x, s: torch.sin(x), 2)
    rollout(lambda x, s: torch.sin(x), plan, x0, torch.Generator().manual_seed(0), record=False, on_step=hook)
    assert torch.count_nonzero(hook.kl) == 0


def test_one_seed_formula_keeps_the_heldout_stream_apart_from_training_rollouts():
    from comfyui_pcpo.run_state import heldout_seed, rollout_seed
    for seed in (0, 1, 12345, 2 ** 62):
        held = {heldout_seed(seed, p) for p in range(64)}
        train = {rollout_seed(seed, it, g) for it in range(200) for g in range(64)}
        assert len(held) == 64 and not held & train
        assert heldout_seed(seed, 3) == rollout_seed(seed, -1, 3)
