"""SDE windows (comfyui_pcpo/sde_window.py): placement, PCPO's weights over the window against a
float64 reference, the windowed rollout, and the Trajectory Sampler with ComfyUI's ODE samplers
outside the window (exact replay of the first update for every window and solver)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from comfyui_pcpo import credit_weights as W
from comfyui_pcpo.rollout import rollout, windowed_rollout
from comfyui_pcpo.sde_window import WINDOW_SCHEDULES, Window, place_window, window_seed
from comfyui_pcpo.step_plan import diffusion_plan, flow_plan, step_mean
from comfyui_pcpo.trainer import candidate_steps
from comfyui_pcpo.trajectory import Trajectory

F64 = torch.float64


# ----------------------------------------------------------------------------- placement

def test_full_rollout_when_the_window_is_zero_or_covers_every_trainable_step():
    for size in (0, 9, 10, 50):
        assert place_window(size, 10, "sliding", iteration=7) is None


def test_fixed_window_stays_and_a_start_past_the_last_trainable_step_is_refused():
    assert all(place_window(3, 10, "fixed", iteration=k, start=6) == Window(6, 3, 10) for k in range(20))
    with pytest.raises(ValueError, match="window_start 7 .* 0 .. 6"):
        place_window(3, 10, "fixed", start=7)
    for bad, match in (({"size": -1}, "window_steps"), ({"start": -2}, "window_start"),
                       ({"slide_every": 0}, "slide_every"), ({"schedule": "mixed"}, "schedule")):
        kw = dict(size=2, grid_steps=10, schedule="fixed", start=0, slide_every=1)
        kw.update(bad)
        with pytest.raises(ValueError, match=match):
            place_window(kw["size"], kw["grid_steps"], kw["schedule"], start=kw["start"], slide_every=kw["slide_every"])


def test_sliding_window_moves_one_step_every_slide_every_iterations_and_wraps():
    starts = [place_window(4, 10, "sliding", iteration=k, start=1, slide_every=3).start for k in range(24)]
    # 10 steps, window 4: starts 0 .. 5 (the window never holds step 9, into sigma 0)
    expected = [(1 + k // 3) % 6 for k in range(24)]
    assert starts == expected and max(starts) == 5 and starts[:6] == [1, 1, 1, 2, 2, 2]
    for k in range(24):
        w = place_window(4, 10, "sliding", iteration=k, start=1, slide_every=3)
        assert w.end <= 9 and w.size == 4


def test_random_window_is_a_function_of_seed_and_iteration_and_covers_every_start():
    a = [place_window(2, 8, "random", iteration=k, seed=5).start for k in range(200)]
    b = [place_window(2, 8, "random", iteration=k, seed=5).start for k in range(200)]
    c = [place_window(2, 8, "random", iteration=k, seed=6).start for k in range(200)]
    assert a == b and a != c
    assert set(a) == set(range(6))  # starts 0 .. 8 - 1 - 2, all drawn
    # its seed slot is no group's rollout seed at this or the neighbouring iterations
    from comfyui_pcpo.run_state import rollout_seed
    used = {rollout_seed(5, k, g) for k in range(-1, 3) for g in range(4096)}
    assert window_seed(5, 1) not in used


# ----------------------------------------------------------------------------- weights over the window

def _native_ddim_weights_f64(sig, eta):
    """Independent float64 reference: sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)),
    sigma_down = sqrt(s'^2 - up^2), w = (s - down) / up (0 for a deterministic step)."""
    out = []
    for s, sn in zip(sig[:-1].tolist(), sig[1:].tolist()):
        up = min(sn, eta * math.sqrt(sn ** 2 * (s ** 2 - sn ** 2) / s ** 2)) if sn > 0 else 0.0
        down = math.sqrt(max(sn ** 2 - up ** 2, 0.0))
        out.append((s - down) / up if up > 0 else 0.0)
    return out


@pytest.mark.parametrize("variant", ["native", "uw-sigma", "uw-lambda"])
@pytest.mark.parametrize("start, size", [(0, 3), (5, 4), (12, 6)])
def test_diffusion_window_weights_are_the_mean_native_weight_over_the_window(variant, start, size):
    sig = torch.cat([torch.logspace(math.log10(14.6), math.log10(0.03), 20, dtype=F64), torch.zeros(1, dtype=F64)])
    eta = 1.0
    native = _native_ddim_weights_f64(sig, eta)
    ref_wbar = sum(native[start:start + size]) / size
    full = diffusion_plan(sig, eta, variant)
    win = Window(start, size, 20)
    plan = diffusion_plan(sig, eta, variant, window=win)
    assert plan.num_steps == size and torch.equal(plan.sigmas, sig[start:start + size + 1])
    assert plan.window == win and plan.grid_step(0) == start
    assert plan.info["w_bar"] == pytest.approx(ref_wbar, rel=1e-12)
    assert torch.allclose(plan.w_loss, torch.full((size,), ref_wbar, dtype=F64), rtol=1e-12)
    # the rollout's steps are the full grid's (the window changes which steps are stochastic, not them)
    assert torch.equal(plan.std, full.std[start:start + size])
    if variant == "uw-lambda":  # lambda makes the exact log-ratio weight w_bar over the window
        assert torch.allclose(plan.w_native, torch.full((size,), ref_wbar, dtype=F64), rtol=1e-12)
    elif variant == "native":
        assert torch.allclose(plan.w_native, torch.tensor(native[start:start + size], dtype=F64), rtol=1e-12)
    if variant == "uw-sigma":
        assert plan.info["loss_scale"] == pytest.approx(4.5 / ref_wbar, rel=1e-12)
    # over the whole grid this is PCPO's w_bar
    assert full.info["w_bar"] == pytest.approx(sum(v for v in native if v > 0) / sum(v > 0 for v in native), rel=1e-12)


def _flow_native_f64(t, level):
    return [math.sqrt(t[i] - t[i + 1]) / level * (1 + (1 - t[i]) * level ** 2 / (2 * t[i])) for i in range(len(t) - 1)]


@pytest.mark.parametrize("start, size", [(0, 2), (6, 4), (11, 4)])
def test_flow_window_weights_are_the_windows_native_credit_spread_over_its_time(start, size):
    n, shift, level = 16, 3.0, 0.3
    u = torch.linspace(1, 0, n + 1, dtype=F64)
    t = shift * u / (1 + (shift - 1) * u)
    native = _flow_native_f64(t.tolist(), level)
    zeta_w = sum(native[start:start + size])
    tw = float(t[start] - t[start + size])
    plan = flow_plan(t, "constant", level, window=Window(start, size, n))
    ref = torch.tensor([zeta_w * float(t[i] - t[i + 1]) / tw for i in range(start, start + size)], dtype=F64)
    assert torch.allclose(plan.w_loss, ref, rtol=1e-12)
    assert float(plan.w_loss.sum()) == pytest.approx(zeta_w, rel=1e-12)  # the window's native credit is kept
    assert plan.info["zeta"] == pytest.approx(zeta_w, rel=1e-12)
    # proportionate: credit per unit of generation time is the same at every window step
    per_time = plan.w_loss / (plan.sigmas[:-1] - plan.sigmas[1:])
    assert torch.allclose(per_time, per_time[0].expand(size), rtol=1e-12)
    full = flow_plan(t, "constant", level)
    assert torch.allclose(full.w_loss, W.zeta(torch.tensor(native, dtype=F64)) * (t[:-1] - t[1:]), rtol=1e-12)
    lam = flow_plan(t, "constant", level, "uw-lambda", window=Window(start, size, n))
    assert torch.allclose(lam.w_native, ref, rtol=1e-12)


def test_a_window_that_does_not_fit_the_grid_is_refused():
    t = torch.linspace(1, 0, 9, dtype=F64)
    with pytest.raises(ValueError, match="does not fit"):
        flow_plan(t, "constant", 0.3, window=Window(6, 4, 8))
    with pytest.raises(ValueError, match="does not fit"):
        flow_plan(t, "constant", 0.3, window=Window(0, 2, 10))


# ----------------------------------------------------------------------------- the windowed rollout

def _toy_predict(x, s):
    """A v-prediction of a flow toward the fixed point 0.3 (any smooth function serves)."""
    return (x - 0.3) / (1.0 + s.reshape(-1, *([1] * (x.ndim - 1))))


def _euler_ode(x, seg):
    for a, b in zip(seg[:-1].tolist(), seg[1:].tolist()):
        x = x + (b - a) * _toy_predict(x, torch.full((x.shape[0],), a))
    return x


def test_windowed_rollout_integrates_outside_and_records_the_window_exactly():
    n = 8
    t = torch.linspace(1, 0, n + 1, dtype=F64)
    win = Window(3, 2, n)
    plan = flow_plan(t, "constant", 0.5, window=win)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def ode(x, seg):
        calls.append(seg.clone())
        return _euler_ode(x, seg)

    xf, rec = windowed_rollout(_toy_predict, plan, t, x0, torch.Generator().manual_seed(1), ode=ode)
    assert [c.tolist() for c in calls] == [t[:4].tolist(), t[5:].tolist()]
    assert rec["latents"].shape == (2, 3, 3, 4, 4) and rec["eps_old"].shape == (2, 2, 3, 4, 4)
    assert torch.allclose(rec["latents"][:, 0], _euler_ode(x0, t[:4]).float(), atol=1e-6)
    for i in range(2):  # each recorded transition is the SDE step from the recorded noise
        mu = step_mean(plan, i, rec["latents"][:, i], rec["pred_old"][:, i])
        assert torch.allclose(mu + float(plan.std[i]) * rec["eps_old"][:, i], rec["latents"][:, i + 1], atol=1e-6)
    assert torch.allclose(xf, _euler_ode(rec["latents"][:, -1], t[5:]), atol=1e-6)
    # the same step noise as a rollout of the window alone: the window's draws come first
    x_w, rec_w = rollout(_toy_predict, plan, rec["latents"][:, 0], torch.Generator().manual_seed(1))
    assert torch.equal(rec_w["eps_old"], rec["eps_old"])
    with pytest.raises(ValueError, match="does not lie on this sampling grid"):
        windowed_rollout(_toy_predict, plan, torch.linspace(1, 0, n + 1, dtype=F64) ** 2, x0,
                         torch.Generator(), ode=ode)
    with pytest.raises(ValueError, match="deterministic solver"):
        windowed_rollout(_toy_predict, plan, t, x0, torch.Generator())


def test_every_window_step_is_a_candidate_and_the_full_grid_still_drops_its_last():
    t = torch.linspace(1, 0, 9, dtype=F64)

    def traj(plan):
        S = plan.num_steps
        z = torch.zeros(2, S + 1, 1, 2, 2)
        return Trajectory(z, z[:, 1:], z[:, 1:], torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), plan)
    assert candidate_steps(traj(flow_plan(t, "constant", 0.3))).tolist() == list(range(7))
    for start in range(6):
        plan = flow_plan(t, "constant", 0.3, window=Window(start, 2, 8))
        assert candidate_steps(traj(plan)).tolist() == [0, 1]
    # a plan's window survives the trajectory file
    plan = flow_plan(t, "constant", 0.3, window=Window(4, 3, 8))
    assert type(plan).from_dict(json.loads(json.dumps(plan.to_dict()))).window == Window(4, 3, 8)


# ----------------------------------------------------------------------------- in ComfyUI

ETA = {"sd15": 1.0, "flux": 0.7}


def _sample(pcpo, tm, sess, window, schedule="fixed", start=0, solver="euler", steps=6, seed=0):
    with torch.inference_mode():
        win = pcpo.nodes["PCPOSDEWindow"]().window(window, schedule, start, 1, solver)[0] if window else None
        return pcpo.nodes["PCPOTrajectorySampler"]().sample(
            sess, steps, 3.0, 2, seed, ETA[tm.family], "uw-sigma", "constant", "simple", 64, 64, 2,
            positive=tm.cond(1, 5), negative=tm.uncond(1), sde_window=win)


def _update(pcpo, sess, batch):
    with torch.inference_mode():
        rw, _ = pcpo.nodes["PCPORewardScorer"]().score(torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(1)),
                                                       batch, "brightness")
        out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 2, 1.0, 2, 1, 1)
    return json.loads(out["result"][1])


def _session(pcpo, tm, name):
    return pcpo.nodes["PCPOLoRA"]().create(tm.model, name, 4, 4.0, "attention", 1e-3, "AdamW", 0.0, 0, False)[1]


def test_the_window_node_offers_this_hosts_deterministic_samplers_only(pcpo):
    spec = pcpo.nodes["PCPOSDEWindow"].INPUT_TYPES()["required"]
    names = spec["ode_sampler"][0]
    assert {"euler", "heun", "dpmpp_2m"} <= set(names)
    assert not any("ancestral" in n or "sde" in n for n in names)
    assert tuple(spec["schedule"][0]) == WINDOW_SCHEDULES
    # an optional socket: unwired, the full SDE rollout stays the default
    assert pcpo.nodes["PCPOTrajectorySampler"].INPUT_TYPES()["optional"]["sde_window"][0] == "PCPO_SDE_WINDOW"
    with pytest.raises(ValueError, match="slide_every must be >= 1"):
        pcpo.nodes["PCPOSDEWindow"]().window(2, "sliding", 0, 0, "euler")


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_first_update_replays_every_window_and_solver_exactly(pcpo, tiny, comfy_dirs, family, solver):
    tm = tiny.build(family)
    sess = _session(pcpo, tm, f"win_{family}_{solver}")
    for start in (0, 2, 3):  # at the start, in the middle, the last admissible start (6 steps, window 2)
        lat, batch = _sample(pcpo, tm, sess, 2, "fixed", start, solver)
        traj = batch.traj
        assert traj.latents.shape[:2] == (4, 3) and traj.plan.window.start == start
        assert traj.meta["sde_window"] == {"start": start, "size": 2, "grid_steps": 6}
        assert traj.meta["ode_sampler"] == solver and torch.isfinite(lat["samples"]).all()
        for i in range(2):
            mu = step_mean(traj.plan, i, traj.latents[:, i], traj.pred_old[:, i])
            assert torch.allclose(mu + float(traj.plan.std[i]) * traj.eps_old[:, i], traj.latents[:, i + 1], atol=1e-5)
            assert float(traj.plan.std[i]) > 0
        stats = _update(pcpo, sess, batch)
        assert stats["first_update_log_ratio"] == 0.0 and max(stats["grad_norms"]) > 0
        assert stats["pairs"] == 4 * 2  # both window steps of every sample are trained
        # the clip fraction per step of the whole grid (the dashboard's heatmap rows): None outside the window
        per_step = stats["clip_fraction_per_step"]
        assert len(per_step) == 6 and all((v is None) == (i not in (start, start + 1)) for i, v in enumerate(per_step))


def test_the_ode_sampler_runs_outside_the_window_only(pcpo, tiny, comfy_dirs):
    """A window at step 0 records the same steps under every solver (nothing runs before it) and the
    final images differ (the solver runs after it); a later window's record differs by solver.  The
    windowed iteration trains 2 steps where the full rollout trains 5."""
    tm = tiny.build("sd15")
    sess = _session(pcpo, tm, "win_solvers")
    recs, finals = {}, {}
    for solver in ("euler", "heun", "dpmpp_2m"):
        for start in (0, 3):
            lat, batch = _sample(pcpo, tm, sess, 2, "fixed", start, solver)
            recs[solver, start], finals[solver, start] = batch.traj.latents, lat["samples"]
    assert torch.equal(recs["euler", 0], recs["heun", 0]) and torch.equal(recs["euler", 0], recs["dpmpp_2m", 0])
    assert not torch.allclose(finals["euler", 0], finals["heun", 0])
    assert not torch.allclose(recs["euler", 3], recs["dpmpp_2m", 3])
    _, full = _sample(pcpo, tm, sess, 0)
    assert full.traj.latents.shape[1] == 7 and full.traj.meta["sde_window"] is None
    assert _update(pcpo, sess, full)["pairs"] == 4 * 5


def test_sliding_window_follows_the_runs_iteration_count(pcpo, tiny, comfy_dirs):
    tm = tiny.build("flux")
    sess = _session(pcpo, tm, "win_sliding")
    starts = []
    for _ in range(5):
        _, batch = _sample(pcpo, tm, sess, 2, "sliding", 1)
        starts.append(batch.traj.plan.window.start)
        _update(pcpo, sess, batch)
    assert starts == [1, 2, 3, 0, 1] and sess.iteration == 5


def test_a_window_past_the_grid_is_refused_before_sampling(pcpo, tiny, comfy_dirs):
    tm = tiny.build("sd15")
    sess = _session(pcpo, tm, "win_bad")
    with pytest.raises(ValueError, match="window_start 5 with window_steps 2"):
        _sample(pcpo, tm, sess, 2, "fixed", 5)
    with pytest.raises(ValueError, match="ode_sampler 'euler_ancestral'"):
        _sample(pcpo, tm, sess, 2, "fixed", 0, "euler_ancestral")
    assert sess.iteration == 0
