"""The headless update loop on a toy predictor: exact replay at the first update, and learning."""
import pytest
import torch

from comfyui_pcpo import step_plan as P
from comfyui_pcpo.lora import LoRAWeightDelta
from comfyui_pcpo.rollout import make_trajectory, rollout
from comfyui_pcpo.trainer import PCPOConfig, PCPOTrainer, candidate_steps, micro_batches


class ToyDenoiser(torch.nn.Module):
    """Denoiser for N(0, I) data plus a LoRA-adapted correction: x0_hat = E[x0 | x] + 0.5 tanh(W' f);
    returns the kernel's prediction (x - x0_hat) / sigma (eps_hat in sigma space, v for flow)."""

    def __init__(self, seed, flow=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.flow = flow
        self.w = torch.randn(16, 17, generator=g) * 0.2
        self.lora = LoRAWeightDelta(self.w.shape, rank=4, alpha=4, generator=g)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        base = (1 - s) * x / ((1 - s) ** 2 + s ** 2) if self.flow else x / (1 + s ** 2)
        feat = torch.cat([x.flatten(1), sigma.reshape(-1, 1)], 1)
        x0 = base + 0.5 * torch.tanh(feat @ self.lora(self.w).T).reshape(x.shape)
        return (x - x0) / s


def _rollout(net, plan, groups=3, G=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    recs, finals = [], []
    for _ in range(groups):
        x0 = torch.randn(1, 1, 4, 4, generator=g).repeat(G, 1, 1, 1) * float(plan.sigmas[0])
        with torch.no_grad():
            xf, rec = rollout(lambda x, s: net(x, s), plan, x0, g)
        recs.append(rec)
        finals.append(xf)
    gid = torch.arange(groups).repeat_interleave(G)
    return make_trajectory(recs, plan, gid, gid, [f"p{i}" for i in range(groups)]), torch.cat(finals)


def _plan(kind):
    if kind == "diffusion":
        return P.diffusion_plan(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0]), eta=1.0, variant="uw-sigma")
    return P.flow_plan(torch.linspace(1, 0, 7), "constant", 0.7)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_replay_of_recorded_steps_is_exact_on_policy(kind):
    torch.manual_seed(0)
    net = ToyDenoiser(0, flow=kind == "flow")
    plan = _plan(kind)
    traj, _ = _rollout(net, plan)
    # replaying every recorded x_t gives the recorded prediction bit for bit: log-ratio 0, ratio 1
    for i in range(traj.num_steps):
        sigma = torch.full((traj.batch_size,), float(plan.sigmas[i]))
        assert torch.equal(net(traj.x_t(i), sigma.float()), traj.pred_old[:, i])
        mu = P.step_mean(plan, i, traj.x_t(i), traj.pred_old[:, i])
        if plan.std[i] > 0:
            eps = (traj.x_prev(i) - mu) / float(plan.std[i])
            assert torch.allclose(eps, traj.eps_old[:, i], atol=1e-4)


def test_micro_batches_stay_inside_groups_and_last_step_excluded():
    gid = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    mbs = micro_batches(gid, 2)
    assert all(len(set(gid[m].tolist())) == 1 for m in mbs) and sorted(torch.cat(mbs).tolist()) == list(range(9))
    net = ToyDenoiser(1)
    traj, _ = _rollout(net, _plan("diffusion"))
    assert candidate_steps(traj).tolist() == [0, 1, 2, 3, 4]  # step 5 is deterministic (sigma -> 0)
    traj_f, _ = _rollout(net, _plan("flow"))
    assert candidate_steps(traj_f).tolist() == [0, 1, 2, 3, 4]  # last flow step excluded


def _train(objective, lr, seed, iters=15, kind="diffusion", groups=4, G=8):
    torch.manual_seed(seed)
    net = ToyDenoiser(seed, flow=kind == "flow")
    plan = _plan(kind)
    opt = torch.optim.AdamW(net.lora.parameters(), lr=lr, weight_decay=0.0)
    tr = PCPOTrainer(net.lora.parameters(), opt, PCPOConfig(objective=objective, micro_batch=8, seed=seed))
    first = None
    for it in range(iters):
        traj, xf = _rollout(net, plan, groups=groups, G=G, seed=1000 * seed + it)
        r = xf.flatten(1).mean(1)  # reward: mean "brightness" of the final sample
        stats = tr.update(traj, r, lambda x, s, idx: net(x, s))
        if first is None:
            first = stats
    _, xf = _rollout(net, plan, groups=16, seed=99)
    return float(xf.mean()), first


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
@pytest.mark.parametrize("objective", ["pcpo", "grpo-clip"])
def test_training_raises_reward_compared_with_lr_zero(objective, kind):
    """Same rollouts' seeds, same evaluation noise: lr 0.1 beats lr 0 on every seed."""
    gains = []
    for seed in range(3):
        trained, first = _train(objective, 0.1, seed, kind=kind)
        frozen, _ = _train(objective, 0.0, seed, kind=kind)
        gains.append(trained - frozen)
        assert first["first_update_log_ratio"] == 0.0  # first update starts exactly on-policy
    assert min(gains) > 0.05, gains


def test_every_forward_pass_is_at_one_step_and_the_pass_count_is_unchanged():
    """All rows of a micro-batch share a step (hosts read the first row's timestep), micro-batches
    never cross groups, and the number of forward passes is updates x chunks x kept steps."""
    net = ToyDenoiser(2)
    traj, xf = _rollout(net, _plan("diffusion"), groups=3, G=4)
    calls = []

    def predict(x, s, idx):
        calls.append((s.clone(), idx.clone()))
        return net(x, s)

    opt = torch.optim.SGD(net.lora.parameters(), lr=1e-3)
    cfg = PCPOConfig(micro_batch=3, train_fraction=0.6, updates_per_rollout=2)
    PCPOTrainer(net.lora.parameters(), opt, cfg).update(traj, xf.flatten(1).mean(1), predict)
    keep = round(0.6 * candidate_steps(traj).numel())  # 3 of the 5 trainable steps
    chunks = 3 * 2  # 3 groups of 4 in micro-batches of at most 3
    assert len(calls) == 2 * chunks * keep
    for s, idx in calls:
        assert len(set(s.tolist())) == 1, s
        assert len(set(traj.group_ids[idx].tolist())) == 1
    # each sample is trained at `keep` distinct steps in each update, the same ones in both
    first = {}
    for s, idx in calls[: len(calls) // 2]:
        for i in idx.tolist():
            first.setdefault(i, []).append(float(s[0]))
    assert sorted(first) == list(range(12)) and all(len(set(v)) == keep for v in first.values())
    second = {}
    for s, idx in calls[len(calls) // 2:]:
        for i in idx.tolist():
            second.setdefault(i, []).append(float(s[0]))
    assert second == first


@pytest.mark.parametrize("grad_clip", [0.0, 0.02])
def test_grad_clip_zero_means_no_clipping(grad_clip):
    """Plain SGD (lr 1, one step): the parameter change is the gradient, clipped to grad_clip unless
    grad_clip is 0."""
    net = ToyDenoiser(4)
    traj, xf = _rollout(net, _plan("diffusion"), groups=2, G=4)
    with torch.no_grad():
        net.lora.up.normal_(0, 0.1)
    before = [p.detach().clone() for p in net.lora.parameters()]
    opt = torch.optim.SGD(net.lora.parameters(), lr=1.0)
    cfg = PCPOConfig(objective="ddpo", micro_batch=4, updates_per_rollout=1, grad_clip=grad_clip)
    stats = PCPOTrainer(net.lora.parameters(), opt, cfg).update(traj, xf.flatten(1).mean(1),
                                                                 lambda x, s, idx: net(x, s))
    moved = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.lora.parameters(), before))))
    assert stats["grad_norm"] > 0.02  # the clip bound below is active
    expected = stats["grad_norm"] if grad_clip == 0 else grad_clip
    assert moved == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="grad_clip"):
        PCPOConfig(grad_clip=-1.0).validate()
