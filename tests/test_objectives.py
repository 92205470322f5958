"""Objectives: gradients against closed forms and finite differences, hinge regions, metrics."""
import pytest
import torch

from comfyui_pcpo.objectives import ObjectiveInputs, get_objective, grpo_clip_loss, neg_log_ratio, pcpo_loss

F64 = torch.float64


class TinyPolicy(torch.nn.Module):
    """pred(x) = tanh(x W1) W2 per element row: a small differentiable predictor."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(6, 8, generator=g, dtype=F64) * 0.4)
        self.w2 = torch.nn.Parameter(torch.randn(8, 6, generator=g, dtype=F64) * 0.4)

    def forward(self, x):  # x (P, 3, 6) -> (P, 3, 6)
        return torch.tanh(x @ self.w1) @ self.w2


def _setup(seed=0, P=5):
    g = torch.Generator().manual_seed(seed)
    net = TinyPolicy(seed)
    x = torch.randn(P, 3, 6, generator=g, dtype=F64)
    eps = torch.randn(P, 3, 6, generator=g, dtype=F64)
    A = torch.randn(P, generator=g, dtype=F64)
    w = 0.3 + torch.rand(P, generator=g, dtype=F64)
    return net, x, eps, A, w


def _flat_grad(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def _fd_grad(fn, net, h=1e-6):
    out = []
    for p in net.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + h
            lp = fn().item()
            flat[i] = old - h
            lm = fn().item()
            flat[i] = old
            out.append((lp - lm) / (2 * h))
    return torch.tensor(out, dtype=F64)


def test_pcpo_gradient_at_D0_equals_A_w_eps_dpred_and_finite_differences():
    net, x, eps, A, w = _setup()
    with torch.no_grad():
        pred_old = net(x).clone()

    def loss_fn():
        inp = ObjectiveInputs(A, net(x), pred_old, eps, w, w)
        return pcpo_loss(inp, xi=1e-4, dtype=F64)[0]

    net.zero_grad()
    loss = loss_fn()
    assert abs(loss.item() - 1e-4 * A.abs().mean().item()) < 1e-15  # M = 0 at D = 0
    loss.backward()
    g_auto = _flat_grad(net)
    # closed form: d/dtheta mean_p [A_p w_p mean(eps_p * pred_p)]
    net.zero_grad()
    n = eps[0].numel()
    surrogate = (A * w * (eps * net(x)).flatten(1).sum(1) / n).mean()
    surrogate.backward()
    g_closed = _flat_grad(net)
    assert torch.allclose(g_auto, g_closed, rtol=1e-10, atol=1e-14)
    g_fd = _fd_grad(loss_fn, net)
    assert torch.allclose(g_auto, g_fd, rtol=1e-5, atol=1e-9)
    assert g_auto.abs().max() > 1e-4


def test_pcpo_loss_zero_inside_hinge_region_and_gradient_off():
    net, x, eps, A, w = _setup(1)
    with torch.no_grad():
        base = net(x)
    # choose pred_old so that A * M < -xi |A| for every pair: move along -sign(A) * eps
    D = -1e-2 * torch.sign(A).reshape(-1, 1, 1) * eps  # A * M < -xi |A| for every pair
    pred_old = base - D  # pred_new - pred_old = D
    inp = ObjectiveInputs(A, net(x), pred_old, eps, w, w)
    M = neg_log_ratio(D, eps, w)
    assert (A * M < -1e-4 * A.abs()).all()
    loss, m = pcpo_loss(inp, xi=1e-4, dtype=F64)
    assert loss.item() == 0.0 and m["clip_fraction"] == 1.0
    net.zero_grad()
    loss.backward()
    assert _flat_grad(net).abs().max() == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_grpo_clip_gradient_equals_rho_hinge_gradient(seed):
    net, x, eps, A, w = _setup(seed, P=8)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        pred_old = net(x) + 3e-3 * torch.randn(x.shape, generator=g, dtype=F64)  # some pairs clipped
    xi = 1e-4

    def clip_loss():
        return grpo_clip_loss(ObjectiveInputs(A, net(x), pred_old, eps, w, w), xi=xi, dtype=F64)[0]

    def hinge_loss():
        rho = torch.exp(-neg_log_ratio(net(x) - pred_old, eps, w))
        return torch.relu(xi * A.abs() - A * (rho - 1)).mean()

    net.zero_grad(); clip_loss().backward(); g1 = _flat_grad(net)
    net.zero_grad(); hinge_loss().backward(); g2 = _flat_grad(net)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-15)
    _, m = grpo_clip_loss(ObjectiveInputs(A, net(x), pred_old, eps, w, w), xi=xi, dtype=F64)
    assert 0.0 < m["clip_fraction"] < 1.0  # the test really exercises both regions
    assert torch.allclose(g1, _fd_grad(clip_loss, net), rtol=1e-4, atol=1e-9)


def test_ddpo_gradient_is_minus_A_grad_logpi():
    net, x, eps, A, w = _setup(3)
    with torch.no_grad():
        pred_old = net(x).clone()
    loss, m = get_objective("ddpo")(ObjectiveInputs(A, net(x), pred_old, eps, w, w), dtype=F64)
    net.zero_grad(); loss.backward(); g1 = _flat_grad(net)
    net.zero_grad()
    n = eps[0].numel()
    (A * w * (eps * net(x)).flatten(1).sum(1) / n).mean().backward()
    assert torch.allclose(g1, _flat_grad(net), rtol=1e-10)
    assert m["clip_fraction"] == 0.0


def test_metrics_per_step_kl_and_log_approximation_error():
    net, x, eps, A, w = _setup(4, P=6)
    with torch.no_grad():
        pred_new = net(x)
        pred_old = pred_new - 0.05 * torch.randn_like(pred_new)
    steps = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, m = pcpo_loss(ObjectiveInputs(A, pred_new, pred_old, eps, w, w, steps), num_steps=4, dtype=F64)
    D = pred_new - pred_old
    lr = -neg_log_ratio(D, eps, w)
    assert abs(m["log_approx_error"] - (lr - (lr.exp() - 1)).abs().mean().item()) < 1e-12
    kl = 0.5 * ((w.reshape(-1, 1, 1) * D) ** 2).flatten(1).mean(1).mean()
    assert abs(m["approx_kl"] - kl.item()) < 1e-12
    cf = m["clip_fraction_per_step"]
    assert cf.shape == (4,) and torch.isnan(cf[3]) and m["pairs_per_step"].tolist() == [2, 2, 2, 0]
    hinge_off = (1e-4 * A.abs() + A * neg_log_ratio(D, eps, w)) < 0
    assert abs(float(cf[:3].mean()) - hinge_off.double().mean().item()) < 1e-6


def test_float32_default_matches_float64_reference():
    net, x, eps, A, w = _setup(5)
    with torch.no_grad():
        pred_new, pred_old = net(x), net(x) - 1e-3 * eps
    inp = ObjectiveInputs(A, pred_new, pred_old, eps, w, w)
    l32 = pcpo_loss(inp)[0]
    l64 = pcpo_loss(inp, dtype=F64)[0]
    assert l32.dtype == torch.float32
    assert abs(l32.item() - l64.item()) < 1e-6 * max(1.0, abs(l64.item()))


def test_unknown_objective_is_a_clear_error():
    with pytest.raises(ValueError, match="pcpo"):
        get_objective("ppo2")
