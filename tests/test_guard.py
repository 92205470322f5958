"""Held-out evaluation and the reward-hacking guard: the guard's decisions, exact rollback of LoRA and
optimizer state, deterministic held-out scores, and a hacked run on the demo model (trained for
brightness, guarded by saturation) in a real ComfyUI."""
from __future__ import annotations

import json
import os

import pytest
import torch

from comfyui_pcpo.guard import (MIN_LR_SCALE, GuardConfig, GuardState, accept_best, apply_verdict, decide, judge,
                                rollback, save_best)
from comfyui_pcpo.run_state import CheckpointError
from comfyui_pcpo.metrics import metrics_path, read_metrics
from comfyui_pcpo.run_state import RunSettings, RunState, new_adapters


def state_equal(a: dict, b: dict, prefixes=("lora.", "optimizer.", "generator")) -> bool:
    keys = [k for k in a if k.startswith(prefixes)]
    return set(keys) == {k for k in b if k.startswith(prefixes)} and all(torch.equal(a[k], b[k]) for k in keys)


def copy_tensors(state: RunState) -> dict:
    return {k: v.clone() for k, v in state.state_tensors()[0].items()}


# ----------------------------------------------------------------------------- core

def test_judge_trips_on_each_signal_and_keeps_the_best_admissible():
    cfg = GuardConfig(heldout_margin=0.1, guard_margin=0.05, kl_bound=1.0, action="stop")
    gs = GuardState()
    v = judge(cfg, gs, 1, 0.5, {"sat": 0.8}, 0.1)
    assert not v.tripped and v.new_best
    accept_best(gs, 1, 0.5)
    v = judge(cfg, gs, 2, 0.7, {"sat": 0.78}, 0.2)  # better, guard within its margin
    assert not v.tripped and v.new_best
    accept_best(gs, 2, 0.7)
    assert gs.guard_ref == {"sat": 0.8}
    assert judge(cfg, gs, 3, 0.65, {"sat": 0.79}, 0.3).reasons == []          # within both margins
    v = judge(cfg, gs, 4, 0.9, {"sat": 0.74}, 0.3)                            # reward up, guard down
    assert v.tripped and not v.new_best and "sat" in v.reasons[0]
    assert gs.guard_ref == {"sat": 0.8}                                       # a tripped eval sets no reference
    v = judge(cfg, gs, 5, 0.55, {"sat": 0.8}, 0.3)
    assert v.tripped and "held-out reward" in v.reasons[0]
    v = judge(cfg, gs, 6, 0.7, {"sat": 0.8}, 1.5)
    assert v.tripped and "KL" in v.reasons[0]
    assert not judge(GuardConfig(kl_bound=0.0), GuardState(), 1, 0.0, {}, 1e9).tripped  # 0 = no bound
    with pytest.raises(ValueError):
        GuardConfig(action="explode")
    gs2 = GuardState.from_dict(json.loads(json.dumps(gs.to_dict())))
    assert gs2 == gs


def _adam_state(seed=0):
    shapes = {"a": (6, 5), "b": (4, 6)}
    ad = new_adapters(shapes, list(shapes), rank=2, alpha=2.0, seed=seed)
    return RunState(ad, RunSettings(rank=2, alpha=2.0, learning_rate=1e-2, seed=seed))


def _steps(state, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.enable_grad():
            loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in state.params())
            loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        torch.rand(3, generator=state.generator)
        state.commit({"reward_mean": 0.0}, 1, "r", "pcpo")


def test_rollback_restores_lora_optimizer_and_generator_exactly(tmp_path):
    state = _adam_state()
    _steps(state, 3, 1)
    best = copy_tensors(state)
    save_best(state, str(tmp_path / "best.safetensors"))
    assert state.saved_iteration is None  # the best file is not the run's checkpoint
    _steps(state, 4, 2)
    assert not state_equal(copy_tensors(state), best)
    rollback(state, str(tmp_path / "best.safetensors"))
    assert state_equal(copy_tensors(state), best)
    assert state.iteration == 7 and state.optimizer_steps == 7 and len(state.history) == 7
    assert state.dirty
    # the restored optimizer continues exactly as the best state's optimizer would
    twin = _adam_state()
    _steps(twin, 3, 1)
    _steps(state, 2, 5)
    _steps(twin, 2, 5)
    assert state_equal(copy_tensors(state), copy_tensors(twin))


def test_apply_verdict_saves_the_best_rolls_back_to_it_and_lowers_the_lr_to_its_floor(tmp_path):
    """The guard's verdict flow, host-free: a new best is saved and exported, a trip rolls LoRA and
    optimizer back to it bit for bit and halves the learning rate (down to 1/64), ``stop`` drops the
    loop, and a best file of another iteration is refused naming it."""
    best_path = str(tmp_path / "best.safetensors")
    state, gs = _adam_state(), GuardState()
    cfg = GuardConfig(heldout_margin=0.1, action="lower_lr", lr_factor=0.25)
    _steps(state, 2, 1)
    exported = []
    v = decide(cfg, gs, state.iteration, 0.5, {}, None, best_path)
    out = apply_verdict(state, gs, cfg, v, 0.5, best_path, "r", export_best=lambda: exported.append(1) or "x.sft")
    assert out.event is None and out.fields["guard_best_path"] == "x.sft" and exported == [1]
    assert (gs.best_iteration, gs.best_score) == (2, 0.5) and os.path.isfile(best_path)
    best = copy_tensors(state)
    lrs = []
    for k in range(4):
        _steps(state, 1, 10 + k)
        assert not state_equal(copy_tensors(state), best)
        v = decide(cfg, gs, state.iteration, 0.1, {}, None, best_path)
        out = apply_verdict(state, gs, cfg, v, 0.1, best_path, "r")
        assert v.tripped and out.event["to_iteration"] == 2 and state_equal(copy_tensors(state), best)
        lrs.append(state.optimizer.param_groups[0]["lr"])
        assert out.event["lr"] == lrs[-1] and out.fields["guard_rollbacks"] == k + 1 == len(gs.rollbacks)
    assert lrs == pytest.approx([1e-2 / 4, 1e-2 / 16, 1e-2 * MIN_LR_SCALE, 1e-2 * MIN_LR_SCALE])
    assert gs.rollbacks[-1].get("lr_at_floor") and not gs.rollbacks[0].get("lr_at_floor")
    assert any("floor" in ln for ln in out.lines) and state.iteration == 6

    stop = GuardConfig(heldout_margin=0.1, action="stop")
    v = decide(stop, gs, state.iteration, 0.1, {}, None, best_path)
    out = apply_verdict(state, gs, stop, v, 0.1, best_path, "r", stop_loop=lambda: True)
    assert gs.stopped_at == 6 and out.event["loop_cancelled"] is True and "stops" in out.lines[-1]

    _steps(state, 1, 20)
    save_best(state, best_path)  # a best file from another point of the run than the guard's best
    v = decide(cfg, gs, state.iteration, 0.1, {}, None, best_path)
    before = copy_tensors(state)
    with pytest.raises(CheckpointError, match="best.safetensors holds iteration 7"):
        apply_verdict(state, gs, cfg, v, 0.1, best_path, "r")
    assert state_equal(copy_tensors(state), before)  # refused before anything was rolled back


def test_apply_verdict_without_a_best_state_only_logs_the_trip(tmp_path):
    state, gs = _adam_state(), GuardState(best_score=0.9, best_iteration=1)
    cfg = GuardConfig(heldout_margin=0.1)
    _steps(state, 1, 1)
    before = copy_tensors(state)
    v = decide(cfg, gs, 1, 0.1, {}, None, str(tmp_path / "none.safetensors"))
    out = apply_verdict(state, gs, cfg, v, 0.1, str(tmp_path / "none.safetensors"), "r")
    assert v.tripped and v.rollback_to is None and out.event["to_iteration"] is None
    assert "no best state yet" in out.lines[0] and gs.lr_scale == 1.0 and state_equal(copy_tensors(state), before)


# ----------------------------------------------------------------------------- ComfyUI

HELDOUT = "a yellow circle on a green background"
TRAIN = "a red circle on a blue background\na green square on a yellow background\na blue triangle on a red background"


@pytest.fixture
def demo(pcpo, comfy_dirs):
    model, clip, vae = pcpo.nodes["PCPODemoModelLoader"]().load()
    return model, clip, vae


def _session(pcpo, model, name, lr):
    with torch.inference_mode():
        return pcpo.nodes["PCPOLoRA"]().create(model, name, 4, 4.0, "attention", lr, "AdamW", 0.0, 0, False)[1]


def _evaluate(pcpo, sess, clip, vae, every=1, guard="saturation"):
    with torch.inference_mode():
        return pcpo.nodes["PCPOHeldOutEvaluation"]().evaluate(
            sess, clip, vae, HELDOUT, "", every, 2, 6, 3.0, 1.0, "simple", 32, 32, 7, "brightness", guard)


def _iteration(pcpo, sess, prompts, vae):
    with torch.inference_mode():
        lat, batch = pcpo.nodes["PCPOTrajectorySampler"]().sample(sess, 6, 3.0, 4, 0, 1.0, "uw-sigma", "constant",
                                                                  "simple", 32, 32, 2, prompts=prompts)
        rw, _ = pcpo.nodes["PCPORewardScorer"]().score(vae.decode(lat["samples"]), batch, "brightness")
        out = pcpo.nodes["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 4, 1.0, 2, 1, 1)
    return json.loads(out["result"][1])


def _guard(pcpo, sess, held, action="lower_lr", guard_margin=0.01, best="pcpo/guard_best"):
    with torch.inference_mode():
        out = pcpo.nodes["PCPORewardGuard"]().guard(sess, held, 0.5, guard_margin, 0.0, action, 0.5, best, "fp32")
    return json.loads(out["result"][0])


def test_heldout_evaluation_is_deterministic(pcpo, demo):
    model, clip, vae = demo
    sess = _session(pcpo, model, "heldout_det", 1e-2)
    with torch.no_grad():
        for a in sess.adapters.values():
            a.up.copy_(0.05 * torch.randn(a.up.shape, generator=torch.Generator().manual_seed(3)))
    node = pcpo.nodes["PCPOHeldOutEvaluation"]
    R = pcpo.mod("nodes.heldout")
    from comfyui_pcpo import rewards
    args = (clip, vae, [HELDOUT, "a red square on a blue background"], "", 2, 6, 3.0, 1.0, "simple", 32, 32, 7,
            rewards.builtin_reward("brightness"), [rewards.builtin_reward("saturation")])
    with torch.inference_mode():
        a = node.run(sess, *args)
        b = node.run(sess, *args)
    assert a.per_sample == b.per_sample and a.guards == b.guards and a.kl_base == b.kl_base
    assert torch.equal(a.images, b.images) and a.images.shape == (4, 32, 32, 3)
    assert a.kl_base > 0 and len(set(a.per_sample)) == 4  # every sample has its own noise
    with torch.inference_mode(), pcpo.mod("nodes.model_hooks").lora_multiplier(sess.adapters, 0.0):
        base = node.run(sess, *args)
    assert base.kl_base == 0.0 and base.per_sample != a.per_sample
    grid = R.image_grid(a.images)
    assert grid.shape == (2 * 128 + 3 * 4, 2 * 128 + 3 * 4, 3)
    # not due (every 5, iteration 0): nothing is sampled
    out = _evaluate(pcpo, sess, clip, vae, every=5)
    assert out["result"][0] is None


def test_guard_rolls_back_a_hacked_run_exactly(pcpo, demo):
    """Brightness is hackable: the policy whitens the images and their saturation falls.  The guard
    (saturation, margin 0.01) fires, restores bit-exactly the best state's LoRA, optimizer state and
    generator, lowers the learning rate, logs the rollback in metrics.jsonl, and the best LoRA is
    exported beside the latest."""
    import folder_paths
    model, clip, vae = demo
    sess = _session(pcpo, model, "hacked", 2e-2)
    with torch.inference_mode():
        prompts = pcpo.nodes["PCPOPrompts"]().build(clip, TRAIN, "(none)", "", 2, 0)[0]
    best_tensors, fired = {}, None
    for _ in range(8):
        _iteration(pcpo, sess, prompts, vae)
        held = _evaluate(pcpo, sess, clip, vae)["result"][0]
        assert held.fresh and held.iteration == sess.iteration
        before = copy_tensors(sess.state)
        rep = _guard(pcpo, sess, held)
        if rep["new_best"]:
            best_tensors[sess.iteration] = before
        if rep["tripped"]:
            fired = rep
            break
    assert fired is not None, "the guard never fired"
    it, to = fired["rollback"]["iteration"], fired["rollback"]["to_iteration"]
    assert to < it == sess.iteration and "saturation" in fired["reasons"][0]
    # exactly the best state (LoRA, optimizer state, generator), while the iteration count goes on
    assert state_equal(copy_tensors(sess.state), best_tensors[to])
    assert sess.iteration == it and not sess.state.dirty  # the rolled-back run was checkpointed
    from safetensors.torch import load_file
    assert state_equal(load_file(sess.checkpoint_path), best_tensors[to])
    assert fired["lr_scale"] == 0.5
    # the lower learning rate is used by the next update (and the node's value stays the base)
    s = _iteration(pcpo, sess, prompts, vae)
    assert sess.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert read_metrics(metrics_path(sess.run_dir))[-1]["lr"] == pytest.approx(1e-2) and s["iteration"] == it + 1
    recs = read_metrics(metrics_path(sess.run_dir))
    rb = [r for r in recs if "rollback" in r]
    assert len(rb) == 1 and rb[0]["iteration"] == it and rb[0]["rollback"]["to_iteration"] == to
    assert all("heldout_reward" in r and "saturation" in r["heldout_guard"] for r in recs[:it])
    assert os.path.exists(os.path.join(folder_paths.get_folder_paths("loras")[0], "pcpo", "guard_best.safetensors"))
    guard = json.load(open(os.path.join(sess.run_dir, "guard.json")))
    assert guard["best_iteration"] == to and guard["rollbacks"][0]["reason"] == fired["reasons"][0]
    with torch.inference_mode():
        img = pcpo.nodes["PCPODashboard"]().render(sess, 800, 600)["result"][0]
    assert img.shape == (1, 600, 800, 3)
    # after a restart (a new session from the checkpoint) the lowered learning rate still applies
    pcpo.mod("nodes.session").SESSIONS.pop("hacked")
    with torch.inference_mode():
        again = pcpo.nodes["PCPOLoRA"]().create(model, "hacked", 4, 4.0, "attention", 2e-2, "AdamW", 0.0, 0, True)[1]
    assert again is not sess and again.iteration == it + 1
    _iteration(pcpo, again, prompts, vae)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_lower_lr_stops_at_its_floor(pcpo, demo):
    """Every trip halves the learning rate down to 1/64 of the node's value, then no further (and
    the report and the warning say so)."""
    from comfyui_pcpo.guard import MIN_LR_SCALE, lower_lr
    gs = GuardState()
    assert lower_lr(gs, 0.1) and lower_lr(gs, 0.1) and gs.lr_scale == MIN_LR_SCALE == 1 / 64
    assert not lower_lr(gs, 0.1) and gs.lr_scale == MIN_LR_SCALE
    model, clip, vae = demo
    sess = _session(pcpo, model, "lr_floor", 1e-2)
    H = pcpo.mod("nodes.heldout")
    assert _guard(pcpo, sess, H.HeldOut(sess.run_name, sess.iteration, True, 0.5, "brightness", {}, 0.0, [], []),
                  best="")["new_best"]
    low = H.HeldOut(sess.run_name, sess.iteration, True, -1.0, "brightness", {}, 0.0, [], [])
    scales = []
    for _ in range(8):
        with torch.inference_mode():
            out = pcpo.nodes["PCPORewardGuard"]().guard(sess, low, 0.5, 0.01, 0.0, "lower_lr", 0.5, "", "fp32")
        rep = json.loads(out["result"][0])
        scales.append(rep["lr_scale"])
    assert scales == [0.5 ** k for k in range(1, 7)] + [1 / 64, 1 / 64]
    assert rep["rollback"]["lr_at_floor"] and rep["rollback"]["lr"] == pytest.approx(1e-2 / 64)
    assert any("floor" in t for t in out["ui"]["text"])
    assert sess.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 64)
    assert json.load(open(os.path.join(sess.run_dir, "guard.json")))["lr_scale"] == 1 / 64


@pytest.mark.parametrize("action", ["stop", "continue"])
def test_guard_actions(pcpo, demo, action):
    """A held-out reward far below the best: rollback, then the chosen action (stop drops the loop's
    pending re-queue of this run; continue changes nothing else)."""
    model, clip, vae = demo
    sess = _session(pcpo, model, f"act_{action}", 1e-2)
    H = pcpo.mod("nodes.heldout")
    loop = pcpo.mod("nodes.requeue")
    held = H.HeldOut(sess.run_name, sess.iteration, True, 0.5, "brightness", {}, 0.0, [], [])
    assert _guard(pcpo, sess, held, action=action, best="")["new_best"]
    best = copy_tensors(sess.state)
    _steps(sess.state, 2, 9)  # the run moves on
    assert not state_equal(copy_tensors(sess.state), best)
    with loop._lock:
        loop._pending["p1"] = {"markers": {sess.run_name: {"run": sess.run_name}}}
    try:
        low = H.HeldOut(sess.run_name, sess.iteration, True, -1.0, "brightness", {}, 0.0, [], [])
        rep = _guard(pcpo, sess, low, action=action, best="")
        assert rep["tripped"] and rep["rollback"]["to_iteration"] == 0 and sess.iteration == 2
        assert state_equal(copy_tensors(sess.state), best)
        assert rep["lr_scale"] == 1.0 and sess.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
        assert ("p1" in loop._pending) == (action == "continue")
        assert rep["rollback"].get("loop_cancelled", False) == (action == "stop")
    finally:
        with loop._lock:
            loop._pending.pop("p1", None)


def test_heldout_takes_any_pcpo_reward(pcpo, demo):
    """Training and guard rewards as PCPO_REWARD sockets (a loader's output, a Reward Mix): the same
    scores as the registry names; a mix scores its raw weighted mean."""
    model, clip, vae = demo
    sess = _session(pcpo, model, "heldout_rewards", 1e-2)
    node = pcpo.nodes["PCPOHeldOutEvaluation"]
    builtin = pcpo.nodes["PCPOBuiltinReward"]()
    bright, sat = builtin.load("brightness")[0], builtin.load("saturation")[0]
    mix = pcpo.nodes["PCPORewardMix"]().mix(reward_1=bright, weight_1=1.0, reward_2=sat, weight_2=0.5)[0]
    from comfyui_pcpo import rewards
    args = (clip, vae, [HELDOUT], "", 2, 4, 3.0, 1.0, "simple", 32, 32, 7)
    with torch.inference_mode():
        by_name = node.run(sess, *args, rewards.builtin_reward("brightness"), [rewards.builtin_reward("saturation")])
        by_socket = node.run(sess, *args, bright, [sat, mix])
    assert by_socket.reward == by_name.reward and by_socket.reward_name == "brightness"
    assert by_socket.guards["saturation"] == by_name.guards["saturation"]
    (mix_label,) = [k for k in by_socket.guards if k != "saturation"]
    assert by_socket.guards[mix_label] == pytest.approx(by_name.reward + 0.5 * by_name.guards["saturation"])
