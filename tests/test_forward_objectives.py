"""The forward-process objectives awm and nft (comfyui_pcpo/forward_objectives.py): losses and
gradients against float64 closed forms and finite differences, zero advantage, the sign convention
on a one-parameter toy, the trainer on a final-only record, and the nodes with a ComfyUI sampler."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from comfyui_pcpo.forward_objectives import (ForwardInputs, awm_loss, forward_noise, matching_target, nft_loss,
                                             time_weights)
from comfyui_pcpo.step_plan import final_only_plan
from comfyui_pcpo.trainer import PCPOConfig, PCPOTrainer, check_objective_fits
from comfyui_pcpo.trajectory import Trajectory

F64 = torch.float64


def _inputs(P=6, E=(2, 3, 3), seed=0, adv=None, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(P, *E, generator=g, dtype=F64, requires_grad=True)
    old = new.detach() + spread * torch.randn(P, *E, generator=g, dtype=F64)
    tgt = torch.randn(P, *E, generator=g, dtype=F64)
    A = torch.randn(P, generator=g, dtype=F64) * 1.5 if adv is None else adv
    w = torch.rand(P, generator=g, dtype=F64) + 0.5
    level = torch.rand(P, generator=g, dtype=F64) * 0.9 + 0.05
    return ForwardInputs(A, new, old, tgt, w, level)


def test_awm_loss_and_gradient_are_the_clipped_likelihood_ratio_closed_form():
    """The reference's exp_first form: rho = exp(w (l_old - l_new)) per pair, the GRPO max with clip
    range 1 on the advantage clipped at 5 and divided by 5, plus the proximal term |pred - pred_old|^2.
    Old predictions far enough away put some pairs outside the range: those with A > 0 and rho > 2
    have no policy gradient, every other pair -a rho's."""
    inp = _inputs(P=12, spread=1.5)
    inp.advantages = inp.advantages * 3  # some beyond the clip at 5
    P, E = inp.pred_new.shape[0], inp.pred_new[0].numel()
    A, w, new, t = inp.advantages.clamp(-5, 5) / 5, inp.weight, inp.pred_new.detach(), inp.target
    assert bool((inp.advantages.abs() > 5).any())
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    err = lambda x: ((x - t) ** 2).flatten(1).mean(1)  # noqa: E731
    rho = torch.exp(w * (err(inp.pred_old) - err(new)))
    live = ~((A > 0) & (rho > 2.0))  # rho > 0 always: the lower bound 0 never binds
    assert 0 < int(live.sum()) < P and bool(((A < 0) & (rho > 2.0)).any())  # every case occurs
    loss, m = awm_loss(inp, dtype=F64)
    expect = (torch.where(live, -A * rho, -A * rho.clamp(0.0, 2.0)) + (
        (new - inp.pred_old) ** 2).flatten(1).mean(1)).mean()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-14)
    loss.backward()
    ref = (col(live * 2 * A * rho * w) * (new - t) + 2 * (new - inp.pred_old)) / (P * E)
    assert torch.allclose(inp.pred_new.grad, ref, rtol=1e-12, atol=1e-18)
    assert m["matching_error"] == pytest.approx(float(err(new).mean()))
    assert m["clip_fraction"] == pytest.approx(float(((rho - 1).abs() > 1).double().mean()))
    # at the rollout policy (rho = 1) it is the advantage-weighted matching gradient A w grad l
    inp = _inputs()
    inp.pred_old = inp.pred_new.detach().clone()
    awm_loss(inp, dtype=F64)[0].backward()
    ref = col(2 * inp.advantages.clamp(-5, 5) / 5 * inp.weight) * (inp.pred_new.detach() - inp.target) / (6 * E)
    assert torch.allclose(inp.pred_new.grad, ref, rtol=1e-12, atol=0)


def test_awm_push_on_a_negative_sample_fades_as_its_error_grows():
    """The exponential bounds the damage of a negative advantage: the gradient on a sample with A < 0
    shrinks as rho = exp(l_old - l_new) falls (a linear A l would push at full strength forever)."""
    tgt = torch.zeros(1, 4, dtype=F64)
    norms = []
    for far in (0.0, 1.0, 3.0):  # (the proximal term left out: it pulls back in proportion to the move)
        pred = torch.full((1, 4), far, dtype=F64, requires_grad=True)
        awm_loss(ForwardInputs(torch.tensor([-1.0], dtype=F64), pred, torch.zeros(1, 4, dtype=F64), tgt,
                               torch.ones(1, dtype=F64)), dtype=F64, proximal=0.0)[0].backward()
        norms.append(float(pred.grad.norm()))
    assert norms[1] > norms[2] and norms[2] < 0.01 * norms[1]  # a linear A l: 3x norms[1]


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_nft_loss_and_gradient_are_the_closed_form(beta):
    """The reference's x0-space loss with its adaptive (stop-gradient) scale, r from the advantage over 5."""
    inp = _inputs(seed=1)
    P, E = inp.pred_new.shape[0], inp.pred_new[0].numel()
    loss, _ = nft_loss(inp, dtype=F64, beta=beta)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    r = 0.5 + inp.advantages.clamp(-5, 5) / 10
    new, old, t, s = inp.pred_new.detach(), inp.pred_old, inp.target, inp.level
    pos, neg = (1 - beta) * old + beta * new, (1 + beta) * old - beta * new
    scale = lambda x: (col(s) * (x - t)).abs().flatten(1).mean(1).clamp_min(1e-5)  # noqa: E731
    L = lambda x: (col(s) * (x - t)).pow(2).flatten(1).mean(1) / scale(x)  # noqa: E731
    expect = (inp.weight * (5 / beta) * (r * L(pos) + (1 - r) * L(neg))).mean()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-14)
    loss.backward()
    dpos = col(r / scale(pos)) * (pos - t)
    dneg = col((1 - r) / scale(neg)) * (neg - t)
    ref = 2 * 5 * col(inp.weight * s ** 2) * (dpos - dneg) / (P * E)
    assert torch.allclose(inp.pred_new.grad, ref, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("loss_fn", [awm_loss, functools.partial(nft_loss, min_scale=1e3)], ids=["awm", "nft"])
def test_the_loss_of_a_tiny_model_matches_finite_differences(loss_fn):
    """pred = conv(x_s) of a 2-channel 1x1 convolution: d loss / d weight by autograd against central
    differences in float64 (nft with its adaptive scale held constant by a high floor: the scale is a
    stop-gradient, which finite differences would see; the closed-form test covers it)."""
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(2, 2, 1).double()
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    n = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    s = torch.tensor([0.9, 0.5, 0.3, 0.7], dtype=F64)
    x_s = forward_noise("flow", x0, n, s)
    tgt = matching_target("flow", x0, n)
    A = torch.tensor([1.2, -0.4, 0.3, -1.1], dtype=F64)
    w = time_weights("flow", torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.0], dtype=F64), "proportionate")[:4]
    with torch.no_grad():
        old = conv(x_s) + 0.05

    def f():
        return loss_fn(ForwardInputs(A, conv(x_s), old, tgt, w, s), dtype=F64)[0]
    conv.zero_grad()
    f().backward()
    grad = conv.weight.grad.clone()
    fd = torch.zeros_like(grad)
    h = 1e-6
    with torch.no_grad():
        for idx in torch.cartesian_prod(*[torch.arange(k) for k in grad.shape]).tolist():
            conv.weight[tuple(idx)] += h
            up = float(f())
            conv.weight[tuple(idx)] -= 2 * h
            dn = float(f())
            conv.weight[tuple(idx)] += h
            fd[tuple(idx)] = (up - dn) / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-10)


def test_zero_advantage_gives_zero_gradient():
    """At the rollout policy (pred_new = pred_old, the first update) zero advantages give exactly zero
    gradient; away from it awm keeps only its proximal pull back to the rollout policy."""
    A0 = torch.zeros(6, dtype=F64)
    for loss_fn in (awm_loss, nft_loss):
        inp = _inputs(adv=A0)
        inp.pred_old = inp.pred_new.detach().clone()
        loss_fn(inp, dtype=F64)[0].backward()
        assert float(inp.pred_new.grad.abs().max()) == 0.0
    inp = _inputs(adv=A0)
    awm_loss(inp, dtype=F64)[0].backward()
    E = inp.pred_new[0].numel()
    assert torch.allclose(inp.pred_new.grad, 2 * (inp.pred_new.detach() - inp.pred_old) / (6 * E), rtol=1e-12)


@pytest.mark.parametrize("loss_fn", [awm_loss, nft_loss])
def test_a_gradient_step_raises_the_positive_samples_likelihood(loss_fn):
    """One parameter theta, the model predicts v = theta everywhere; sample + (A = +1) has target 1,
    sample - (A = -1) target -1.  A gradient step from theta = 0 moves theta towards the positive
    target: the positive sample's matching error (its negative ELBO) falls, the negative's rises."""
    theta = torch.zeros(1, dtype=F64, requires_grad=True)
    tgt = torch.tensor([1.0, -1.0], dtype=F64).reshape(2, 1)
    A = torch.tensor([1.0, -1.0], dtype=F64)
    pred = theta.expand(2).reshape(2, 1)
    loss, _ = loss_fn(ForwardInputs(A, pred, pred.detach().clone(), tgt, torch.ones(2, dtype=F64),
                                    torch.full((2,), 0.5, dtype=F64)), dtype=F64)
    loss.backward()
    new = float(theta - 0.1 * theta.grad)
    assert new > 0
    assert (new - 1) ** 2 < (0 - 1) ** 2 and (new + 1) ** 2 > (0 + 1) ** 2


def test_time_weights_paper_and_proportionate():
    grid = torch.tensor([1.0, 0.8, 0.5, 0.35, 0.1, 0.0], dtype=F64)
    assert torch.equal(time_weights("flow", grid, "paper"), torch.ones(5, dtype=F64))
    dt = torch.tensor([0.2, 0.3, 0.15, 0.25, 0.1], dtype=F64)
    assert torch.allclose(time_weights("flow", grid, "proportionate"), dt / 0.2, rtol=1e-12)
    assert torch.equal(time_weights("diffusion", grid * 14, "proportionate"), torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="time_weighting 'sqrt'"):
        time_weights("flow", grid, "sqrt")


def test_forward_process_in_each_family():
    x0, n, s = torch.ones(1, 2), torch.full((1, 2), 3.0), torch.tensor([0.25])
    assert torch.allclose(forward_noise("diffusion", x0, n, s), torch.full((1, 2), 1.75))
    assert torch.allclose(forward_noise("flow", x0, n, s), torch.full((1, 2), 0.75 + 0.75))
    assert torch.equal(matching_target("diffusion", x0, n), n) and torch.equal(matching_target("flow", x0, n), n - x0)


# ----------------------------------------------------------------------------- the trainer

def _final_traj(B=4, seed=0, family="flow"):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64) * (14.0 if family == "diffusion" else 1.0)
    plan = final_only_plan(family, grid)
    x0 = torch.randn(B, 1, 1, 2, 2, generator=g)
    gid = torch.arange(B) // 2
    return Trajectory(x0, x0[:, :0], x0[:, :0], gid, gid, plan, meta={"seed": 3, "iteration": 5})


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))

    def forward(self, x, s, idx):
        return self.a * x + self.b * s.reshape(-1, 1, 1, 1)


def _train(objective, rewards, traj, seed=0, updates=2, weighting="paper"):
    m = _Toy()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    cfg = PCPOConfig(objective=objective, micro_batch=2, updates_per_rollout=updates, train_fraction=0.5,
                     time_weighting=weighting)
    tr = PCPOTrainer(m.parameters(), opt, cfg, generator=torch.Generator().manual_seed(seed))
    st = tr.update(traj, torch.tensor(rewards), predict=m)
    return m, st, tr.generator


@pytest.mark.parametrize("objective", ["awm", "nft"])
def test_trainer_moves_on_rewards_is_deterministic_and_still_at_zero_advantage(objective):
    traj = _final_traj()
    m1, st, g1 = _train(objective, [1.0, 0.0, 0.2, 0.9], traj)
    m2, _, g2 = _train(objective, [1.0, 0.0, 0.2, 0.9], traj)
    assert st["pairs"] == 4 * 2 and min(st["grad_norms"]) > 0 and st["objective"] == objective
    assert float(m1.a) != 0.3 and float(m1.a) == float(m2.a) and float(m1.b) == float(m2.b)
    assert torch.equal(g1.get_state(), g2.get_state())  # the timestep draw advanced the run's generator alike
    assert len(st["clip_fraction_per_step"]) == 4 and sum(v is not None for v in st["clip_fraction_per_step"]) >= 2
    m0, st0, _ = _train(objective, [0.5, 0.5, 0.1, 0.1], traj, updates=1)  # equal rewards in each group
    assert st0["grad_norms"] == [0.0] and float(m0.a) == pytest.approx(0.3) and st0["zero_std_groups"] == 2


def test_the_objective_must_fit_the_record():
    traj = _final_traj()
    with pytest.raises(ValueError, match="recorded only the final images.*awm or nft"):
        check_objective_fits(traj, "pcpo")
    with pytest.raises(ValueError, match="recorded only the final images"):
        _train("grpo-clip", [1.0, 0.0, 0.2, 0.9], traj)
    from comfyui_pcpo.sde_window import Window
    from comfyui_pcpo.step_plan import flow_plan
    plan = flow_plan(torch.linspace(1, 0, 7, dtype=F64), "constant", 0.3, window=Window(1, 2, 6))
    z = torch.zeros(2, 3, 1, 2, 2)
    win = Trajectory(z, z[:, 1:], z[:, 1:], torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), plan)
    with pytest.raises(ValueError, match="SDE-window rollout does not record the final latents"):
        check_objective_fits(win, "nft")
    with pytest.raises(ValueError, match="time_weighting"):
        PCPOConfig(objective="awm", time_weighting="loud").validate()


# ----------------------------------------------------------------------------- in ComfyUI

ETA = {"sd15": 1.0, "flux": 0.7}


def _session(pcpo, tm, name):
    return pcpo.nodes["PCPOLoRA"]().create(tm.model, name, 4, 4.0, "attention", 1e-3, "AdamW", 0.0, 0, False)[1]


def _sampler(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"]().get_sampler(name)[0]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_deterministic_sampler_gives_a_group_distinct_samples_and_a_real_reward_something_to_learn(
        pcpo, tiny, comfy_dirs, family):
    """euler maps one initial noise to one image: a group sharing its noise would be G equal images,
    every reward alike and no advantage.  Each sample has its own noise, drawn from (seed, iteration,
    group), so the same run draws the same rollout again; the reward of real decoded images spreads
    within the group and the awm update moves the LoRA."""
    tm = tiny.build(family)
    node = pcpo.nodes["PCPOTrajectorySampler"]()

    def sample(sess):
        with torch.inference_mode():
            return node.sample(sess, 4, 3.0, 4, 7, ETA[family], "uw-sigma", "constant", "simple", 64, 64, 2,
                               positive=tm.cond(1, 5), negative=tm.uncond(1), sampler=_sampler("euler"))
    sess = _session(pcpo, tm, f"fwd_distinct_{family}")
    lat, batch = sample(sess)
    x = lat["samples"].float()
    for g in range(2):
        group = x[4 * g:4 * g + 4].flatten(1)
        assert torch.cdist(group, group).add(torch.eye(4) * 1e9).min() > 1e-3  # no two samples alike
    lat2, _ = sample(_session(pcpo, tm, f"fwd_distinct_{family}_again"))  # same seed, same iteration
    assert torch.equal(lat2["samples"], lat["samples"])
    images = x[:, :3].permute(0, 2, 3, 1).clamp(-3, 3).add(3).div(6)  # the latents as images: rewards differ
    with torch.inference_mode():
        rw, _ = pcpo.nodes["PCPORewardScorer"]().score(images.contiguous(), batch, "brightness")
        before = [p.detach().clone() for p in sess.params()]
        out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "awm", 1e-4, 5.0, 1.0, 4, 1.0, 1, 1, 1)
    st = json.loads(out["result"][1])
    assert st["zero_std_groups"] == 0 and st["reward_std"] > 0 and st["grad_norm"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, sess.params()))


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_any_comfyui_sampler_records_final_latents_and_awm_nft_train_on_them(pcpo, tiny, comfy_dirs, family):
    tm = tiny.build(family)
    sess = _session(pcpo, tm, f"fwd_{family}")
    sampler_node = pcpo.nodes["PCPOTrajectorySampler"]()
    outs = {}
    for name, objective in (("euler", "awm"), ("dpmpp_2m", "nft"), ("euler_ancestral", "awm")):
        with torch.inference_mode():
            lat, batch = sampler_node.sample(sess, 4, 3.0, 2, 0, ETA[family], "uw-sigma", "constant", "simple", 64, 64,
                                             2, positive=tm.cond(1, 5), negative=tm.uncond(1), sampler=_sampler(name))
        traj = batch.traj
        assert traj.num_steps == 0 and traj.latents.shape[:2] == (4, 1) and traj.plan.info["final_only"]
        # the record is the final images in the model's latent space
        assert torch.allclose(traj.latents[:, 0], tm.model.model.process_latent_in(lat["samples"].float()), atol=1e-6)
        assert torch.isfinite(lat["samples"]).all()
        outs[name] = lat["samples"]
        with torch.inference_mode():
            rw, _ = pcpo.nodes["PCPORewardScorer"]().score(torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(1)),
                                                           batch, "brightness")
            before = [p.detach().clone() for p in sess.params()]
            out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, objective, 1e-4, 5.0, 0.5, 2, 1.0, 2, 1, 1,
                                                        time_weighting="proportionate")
        st = json.loads(out["result"][1])
        assert st["objective"] == objective and min(st["grad_norms"]) > 0 and st["pairs"] == 4 * 2
        assert any(not torch.equal(b, p) for b, p in zip(before, sess.params()))
    assert sess.iteration == 3 and sess.optimizer_steps == 6
    assert not torch.allclose(outs["euler"], outs["dpmpp_2m"])  # the sampler wired is the sampler used
    # a policy objective on a final-only record, and a SAMPLER with an SDE window, are refused before any work
    with torch.inference_mode():
        _, batch = sampler_node.sample(sess, 4, 3.0, 2, 0, ETA[family], "uw-sigma", "constant", "simple", 64, 64, 2,
                                       positive=tm.cond(1, 5), negative=tm.uncond(1), sampler=_sampler("euler"))
        rw, _ = pcpo.nodes["PCPORewardScorer"]().score(torch.rand(4, 8, 8, 3), batch, "brightness")
        with pytest.raises(ValueError, match="recorded only the final images"):
            pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 2, 1.0, 2, 1, 1)
        win = pcpo.nodes["PCPOSDEWindow"]().window(2, "fixed", 0, 1, "euler")[0]
        with pytest.raises(ValueError, match="not both"):
            sampler_node.sample(sess, 4, 3.0, 2, 0, ETA[family], "uw-sigma", "constant", "simple", 64, 64, 2,
                                positive=tm.cond(1, 5), negative=tm.uncond(1), sampler=_sampler("euler"), sde_window=win)
    assert sess.iteration == 3
