"""The two log-ratio forms of the baselines: analytic (M from D = pred_new - pred_old) and
"difference" (logp_new - logp_old of the recorded x_prev, as the reference code bases form it).

In float64 they are the same number and give the same gradient; in 16-bit working precision the
difference form's error against a float64 reference is larger than the analytic form's."""
import pytest
import torch

from comfyui_pcpo import step_plan as P
from comfyui_pcpo.objectives import (ObjectiveInputs, difference_log_ratio, ddpo_loss, grpo_clip_loss,
                                     neg_log_ratio, pcpo_loss)
from comfyui_pcpo.trainer import PCPOConfig, PCPOTrainer

F64 = torch.float64
torch.set_num_threads(1)


def _plan(kind, steps=10):
    if kind == "diffusion":  # Karras-like SD sigmas, last step to 0
        s = torch.exp(torch.linspace(torch.log(torch.tensor(14.6)), torch.log(torch.tensor(0.03)), steps))
        return P.diffusion_plan(torch.cat([s, torch.zeros(1)]).double(), eta=1.0, variant="uw-sigma")
    return P.flow_plan(torch.linspace(1, 0, steps + 1).double(), "constant", 0.7)


def _steps(plan, P_=6, L=(4, 8, 8), seed=0, scale=1e-3, steps=None):
    """(inp, net): P pairs at ``steps`` (default: all stochastic steps, cycled) of ``plan``, float64,
    with x_prev = mu_old + s eps_old exactly and pred_new = pred_old + scale * tanh(x W)."""
    g = torch.Generator().manual_seed(seed)
    a, c = P.mean_coefficients(plan)
    st = plan.trainable_steps() if steps is None else torch.as_tensor(steps)
    idx = st[torch.arange(P_) % st.numel()]
    sig = plan.sigmas[idx].reshape(-1, 1, 1, 1)
    x_t = torch.randn(P_, *L, generator=g, dtype=F64) * (sig ** 2 + 1).sqrt()
    pred_old = torch.randn(P_, *L, generator=g, dtype=F64)
    eps = torch.randn(P_, *L, generator=g, dtype=F64)
    col = lambda v: v[idx].reshape(-1, 1, 1, 1)  # noqa: E731
    x_prev = col(a) * x_t - col(c) * pred_old + col(plan.std) * eps
    W = torch.nn.Parameter(torch.randn(L[-1], L[-1], generator=g, dtype=F64) * 0.3)
    A = torch.randn(P_, generator=g, dtype=F64)

    def inputs(pred_o=pred_old, xt=x_t, xp=x_prev):
        return ObjectiveInputs(A, pred_o + scale * torch.tanh(xt @ W), pred_o, eps, plan.w_native[idx],
                               plan.w_loss[idx], idx, x_t=xt, x_prev=xp, mean_x=a[idx], mean_pred=c[idx],
                               std=plan.std[idx])
    return inputs, W


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_mean_coefficients_reproduce_the_step_mean(kind):
    plan = _plan(kind)
    a, c = P.mean_coefficients(plan)
    g = torch.Generator().manual_seed(1)
    x, pred = torch.randn(2, 4, 3, 3, generator=g, dtype=F64), torch.randn(2, 4, 3, 3, generator=g, dtype=F64)
    for i in range(plan.num_steps):
        assert torch.allclose(P.step_mean(plan, i, x, pred), a[i] * x - c[i] * pred, rtol=0, atol=1e-12)
    # the native weight is the mean coefficient over the step std: M's w equals c / s
    st = plan.trainable_steps()
    assert torch.allclose(plan.w_native[st], c[st] / plan.std[st], rtol=1e-12)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
@pytest.mark.parametrize("objective", [grpo_clip_loss, ddpo_loss])
def test_float64_forms_agree_in_value_and_gradient(kind, objective):
    plan = _plan(kind)
    inputs, W = _steps(plan, scale=3e-3)
    inp = inputs()
    lr_diff = difference_log_ratio(inp)
    lr_ana = -neg_log_ratio(inp.pred_new - inp.pred_old, inp.eps_old, inp.w_native)
    assert lr_diff.dtype == F64 and float(lr_ana.detach().abs().min()) > 1e-6  # a real, non-zero log-ratio
    assert torch.allclose(lr_diff, lr_ana, rtol=0, atol=1e-10)
    out = {}
    for form in ("analytic", "difference"):
        W.grad = None
        loss, m = objective(inputs(), xi=1e-4, dtype=F64, log_ratio=form)
        loss.backward()
        out[form] = (float(loss.detach()), W.grad.clone(), m)
    assert out["analytic"][0] == pytest.approx(out["difference"][0], abs=1e-10)
    assert float(out["analytic"][1].abs().max()) > 1e-6
    assert torch.allclose(out["analytic"][1], out["difference"][1], rtol=0, atol=1e-10)
    assert out["difference"][2]["log_ratio_gap"] < 1e-10 and "log_ratio_gap" not in out["analytic"][2]


def test_on_policy_difference_is_exactly_zero_in_every_dtype():
    inputs, _ = _steps(_plan("diffusion"), scale=0.0)
    for wd in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(difference_log_ratio(inputs(), wd), torch.zeros(6))


def _errors(kind, wd, seed=0):
    """Mean |log rho - float64 log rho| of each form at the late, low-noise steps, with small D.

    Both forms see the same 16-bit predictions (the model's output in ``wd``); the reference is the
    float64 log-ratio of exactly those predictions.  The analytic form runs as the trainer runs it
    (float32); the difference form in ``wd`` like the reference code bases, with the latents in ``wd``."""
    plan = _plan(kind)
    late = plan.trainable_steps()[-3:]
    inputs, _ = _steps(plan, P_=12, seed=seed, scale=2e-3, steps=late)
    base = inputs()
    with torch.no_grad():
        q = ObjectiveInputs(base.advantages, base.pred_new.to(wd).to(F64), base.pred_old.to(wd).to(F64),
                            base.eps_old, base.w_native, base.w_loss, base.step_index, x_t=base.x_t,
                            x_prev=base.x_prev, mean_x=base.mean_x, mean_pred=base.mean_pred, std=base.std)
        ref = -neg_log_ratio(q.pred_new - q.pred_old, q.eps_old, q.w_native)
        ana = -neg_log_ratio(q.pred_new.float() - q.pred_old.float(), q.eps_old.float(), q.w_native.float())
        dif = difference_log_ratio(q, wd)
    return float((ana.double() - ref).abs().mean()), float((dif.double() - ref).abs().mean()), float(ref.abs().mean())


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
@pytest.mark.parametrize("wd", [torch.bfloat16, torch.float16])
def test_difference_form_loses_precision_at_low_noise(kind, wd):
    for seed in range(2):
        err_ana, err_dif, size = _errors(kind, wd, seed)
        assert err_dif > 10 * err_ana, (err_ana, err_dif)
        assert err_dif > 0.01 * size  # more than 1% of the log-ratio it measures


def test_config_rejects_unknown_log_ratio_and_pcpo_difference():
    with pytest.raises(ValueError, match=r"log_ratio 'diff' is unknown; choose one of analytic, difference"):
        PCPOConfig(objective="grpo-clip", log_ratio="diff").validate()
    with pytest.raises(ValueError, match="pcpo computes its log-ratio analytically"):
        PCPOConfig(objective="pcpo", log_ratio="difference").validate()
    PCPOConfig(objective="ddpo", log_ratio="difference").validate()
    with pytest.raises(ValueError, match="log_ratio 'x' is unknown"):
        grpo_clip_loss(_steps(_plan("flow"))[0](), log_ratio="x")
    with pytest.raises(ValueError, match="pcpo computes its log-ratio analytically"):
        pcpo_loss(_steps(_plan("flow"))[0](), log_ratio="difference")
    inp = _steps(_plan("flow"))[0]()
    inp.x_prev = None
    with pytest.raises(ValueError, match="needs the step record x_prev"):
        grpo_clip_loss(inp, log_ratio="difference")


# --------------------------------------------------------------------------- through the trainer

def _train(log_ratio, compute_dtype, kind="diffusion", variant="uw-sigma", lr=0.05):
    from test_trainer import ToyDenoiser, _rollout
    torch.manual_seed(0)
    net = ToyDenoiser(0, flow=kind == "flow")
    plan = (P.diffusion_plan(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0]), eta=1.0, variant=variant)
            if kind == "diffusion" else P.flow_plan(torch.linspace(1, 0, 7), "constant", 0.7))
    traj, xf = _rollout(net, plan)
    rewards = -xf.flatten(1).mean(1).double()
    params = list(net.lora.parameters())
    with torch.no_grad():  # a non-zero LoRA, so the second update sees a real prediction change
        params[0].normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(params, lr=lr)
    cfg = PCPOConfig(objective="grpo-clip", micro_batch=4, updates_per_rollout=2, log_ratio=log_ratio, clip_range=1e-2)
    trainer = PCPOTrainer(params, opt, cfg, compute_dtype=compute_dtype)
    stats = trainer.update(traj, rewards, predict=lambda x, s, idx: net(x, s))
    return stats, torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_trainer_passes_the_log_ratio_form_through(kind):
    ana, w_ana = _train("analytic", None, kind)
    f32, w_f32 = _train("difference", torch.float32, kind)
    b16, w_b16 = _train("difference", torch.bfloat16, kind)
    assert ana["log_ratio"] == "analytic" and b16["log_ratio"] == "difference"
    for st in (ana, f32, b16):
        assert st["first_update_log_ratio"] == 0.0  # every form replays the rollout exactly
    # float32 difference: close to the analytic run; bf16 difference: its log-ratio is off
    assert ana["log_ratio_gap"] == 0.0 and 0.0 < f32["log_ratio_gap"] < b16["log_ratio_gap"] / 10
    assert float((w_f32 - w_ana).abs().max()) < float((w_b16 - w_ana).abs().max())
    assert abs(b16["loss"] - ana["loss"]) > 10 * abs(f32["loss"] - ana["loss"])


def test_trainer_refuses_difference_under_uw_lambda():
    with pytest.raises(ValueError, match="uw-lambda"):
        _train("difference", torch.float32, variant="uw-lambda")
