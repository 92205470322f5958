"""Exact training state in a real ComfyUI: optimizer state, the model other nodes use, conditioning
that depends on the timestep or the area, resume and settings, crash and restart, memory."""
from __future__ import annotations

import gc
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from test_nodes_training import rollout, update

TESTS_DIR = pathlib.Path(__file__).resolve().parent
CHILD = TESTS_DIR / "run_child.py"


def inference_model(tiny, family="sd15", seed=0):
    """A tiny model built the way ComfyUI's loaders build models: inside the executor's inference
    mode, so every weight is an inference tensor."""
    with torch.inference_mode():
        return tiny.build(family, seed=seed)


def create(pcpo, tm, name, resume=False, optimizer="AdamW", alpha=4.0, seed=0, lr=1e-3, unique_id=None,
           extra_pnginfo=None):
    with torch.inference_mode():
        return pcpo.nodes["PCPOLoRA"]().create(tm.model, name, 4, alpha, "attention", lr, optimizer, 0.0, seed,
                                               resume, unique_id=unique_id, extra_pnginfo=extra_pnginfo)[1]


def iterate(pcpo, tm, sess, n=1, **kw):
    stats = None
    for _ in range(n):
        _, batch = rollout(pcpo, tm, sess)
        stats = update(pcpo, sess, batch, torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(sess.iteration)), **kw)
    return stats


# ----------------------------------------------------------------------------- optimizer state

@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD"])
def test_optimizer_state_counts_every_update(pcpo, tiny, comfy_dirs, optimizer):
    """After N iterations of U updates the optimizer has taken N*U steps (Adam's bias correction
    reads state["step"]), in memory and in the checkpoint."""
    from safetensors import safe_open
    tm = inference_model(tiny)
    sess = create(pcpo, tm, f"steps_{optimizer}", optimizer=optimizer)
    iterate(pcpo, tm, sess, n=3, updates=2)
    assert sess.iteration == 3 and sess.optimizer_steps == 6
    state = sess.optimizer.state_dict()["state"]
    assert len(state) == len(sess.params())
    with safe_open(sess.checkpoint_path, "pt") as f:
        keys = list(f.keys())
        if optimizer == "SGD":
            assert all("momentum_buffer" in s and torch.isfinite(s["momentum_buffer"]).all() for s in state.values())
            assert sum(k.endswith(".momentum_buffer") for k in keys) == len(state)
        else:
            assert all(float(s["step"]) == 6.0 for s in state.values())
            assert all(float(f.get_tensor(k)) == 6.0 for k in keys if k.endswith(".step"))
        assert json.loads(f.metadata()["optimizer_param_groups"])[0]["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- the shared model

def test_training_leaves_the_input_model_untouched(pcpo, tiny, comfy_dirs):
    """A KSampler on the MODEL the PCPO LoRA node was given samples bit-identically after training,
    and that model keeps the very same tensor objects and values."""
    hooks = pcpo.mod("nodes.model_hooks")
    tm = inference_model(tiny)
    base = tm.model.model
    before = {k: (id(t), t.clone()) for k, t in base.state_dict(keep_vars=True).items()}
    flags = {k: p.requires_grad for k, p in base.named_parameters()}
    def ksampler():
        with torch.inference_mode():
            return _node("KSampler")(tm.model, 7, 4, 3.0, "euler_ancestral", "normal", tm.cond(2, 3), tm.uncond(2),
                                     tm.empty_latent(2, 8, 8), 1.0)[0]["samples"]
    out0 = ksampler()
    sess = create(pcpo, tm, "untouched")
    assert sess.model.model is not base and hooks.copy_strategy(tm.model) == "own-copy"
    iterate(pcpo, tm, sess, n=2)
    assert any(a.up.abs().sum() > 0 for a in sess.adapters.values())  # the LoRA did train
    out1 = ksampler()
    assert torch.equal(out0, out1) and torch.isfinite(out0).all()
    after = base.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for k, t in after.items():
        assert id(t) == before[k][0] and torch.equal(t, before[k][1]), k
    assert {k: p.requires_grad for k, p in base.named_parameters()} == flags
    assert all(p.grad is None for p in base.parameters())


def test_loader_cache_gives_the_hosts_own_deep_copy(pcpo, tiny, comfy_dirs):
    """Where the host can re-create a model from its loader (ComfyUI 0.33+: ``cached_patcher_init``,
    ``clone(force_deepcopy=True)``), the trainable copy comes from there, as in ComfyUI's trainer;
    older hosts make their own copy.  Either way the run is exactly on-policy and the input model
    keeps its tensors."""
    hooks = pcpo.mod("nodes.model_hooks")
    tm = inference_model(tiny)
    calls = []

    def recreate(disable_dynamic=False):
        calls.append(disable_dynamic)
        return tiny.build("sd15").model  # the loader reading the same file again

    tm.model.cached_patcher_init = (recreate, ())
    host_copy = "force_deepcopy" in hooks._clone_params(tm.model)
    assert hooks.copy_strategy(tm.model) == ("host-deepcopy" if host_copy else "own-copy")
    ids = {k: id(t) for k, t in tm.model.model.state_dict(keep_vars=True).items()}
    sess = create(pcpo, tm, "host_copy")
    assert calls == ([True] if host_copy else [])
    assert sess.model.model is not tm.model.model and sess.model.pcpo_copy_strategy == hooks.copy_strategy(tm.model)
    assert not any(p.requires_grad for p in sess.model.model.parameters())
    stats = iterate(pcpo, tm, sess)
    assert stats["first_update_log_ratio"] == 0.0 and stats["grad_norm"] > 0
    assert {k: id(t) for k, t in tm.model.model.state_dict(keep_vars=True).items()} == ids


class StandInPatcher:
    """The parts of a ModelPatcher ``copy_strategy`` reads, for hosts and loaders this machine has not
    got (ComfyUI 0.33+ Dynamic VRAM needs comfy-aimdo on an NVIDIA GPU)."""

    def __init__(self, module, dynamic=False, new_clone=False, cached_init=False):
        self.model = module
        self._dynamic = dynamic
        self.cached_patcher_init = (lambda *a, **k: None, ()) if cached_init else None
        if new_clone:
            self.clone = lambda disable_dynamic=False, model_override=None, force_deepcopy=False: None
        else:
            self.clone = lambda: None

    def is_dynamic(self):
        return self._dynamic


def test_copy_strategy_decisions(pcpo):
    hooks = pcpo.mod("nodes.model_hooks")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    trainable = torch.nn.Linear(2, 2)
    with torch.inference_mode():
        loaded = torch.nn.Linear(2, 2)  # as ComfyUI's loaders create weights
    S = StandInPatcher
    assert hooks.copy_strategy(S(frozen)) == "share"
    assert hooks.copy_strategy(S(frozen, new_clone=True, cached_init=True)) == "share"
    assert hooks.copy_strategy(S(trainable)) == "own-copy"
    assert hooks.copy_strategy(S(loaded)) == "own-copy"                                  # 0.3.x host
    assert hooks.copy_strategy(S(loaded, new_clone=True)) == "own-copy"                  # custom loader
    assert hooks.copy_strategy(S(loaded, new_clone=True, cached_init=True)) == "host-deepcopy"
    # a Dynamic VRAM patcher always gets a non-dynamic copy, even over frozen ordinary weights
    assert hooks.copy_strategy(S(frozen, dynamic=True, new_clone=True, cached_init=True)) == "host-deepcopy"
    assert hooks.copy_strategy(S(frozen, dynamic=True, new_clone=True)) == "own-copy"


# ----------------------------------------------------------------------------- conditioning

def _node(name):
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_area_and_timestep_range_conditioning_replay_exactly(pcpo, tiny, comfy_dirs, family):
    """Area conditioning (ComfyUI adds each area's prediction into a view of the output in place) and
    a timestep range (ComfyUI reads the first row's timestep) replay the rollout exactly at the first
    update: log-ratio 0."""
    tm = inference_model(tiny, family)
    sess = create(pcpo, tm, f"conds_{family}")
    area = _node("ConditioningSetArea")(tm.cond(1, 5), 32, 32, 0, 0, 1.0)[0]
    late = _node("ConditioningSetTimestepRange")(tm.cond(1, 9), 0.5, 1.0)[0]
    early = _node("ConditioningSetTimestepRange")(tm.cond(1, 5), 0.0, 0.5)[0]
    positive = _node("ConditioningCombine")(_node("ConditioningCombine")(area, late)[0], early)[0]
    ETA = {"sd15": 1.0, "flux": 0.7}
    with torch.inference_mode():
        _, batch = pcpo.nodes["PCPOTrajectorySampler"]().sample(
            sess, 6, 3.0, 2, 0, ETA[family], "uw-sigma", "constant", "simple", 64, 64, 2,
            positive=positive, negative=tm.uncond(1))
    stats = update(pcpo, sess, batch, torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(4)),
                   micro_batch=2)
    assert stats["first_update_log_ratio"] == 0.0 and stats["grad_norm"] > 0
    assert torch.Tensor.__dict__.get("__iadd__") is None


# ----------------------------------------------------------------------------- resume and settings

def _restart(pcpo, name):
    """What a ComfyUI restart does to a run: no live session."""
    pcpo.mod("nodes.session").SESSIONS.pop(name)


def test_resume_applies_or_refuses_every_setting(pcpo, tiny, comfy_dirs):
    tm = inference_model(tiny)
    name = "settings"
    sess = create(pcpo, tm, name, lr=1e-3)
    iterate(pcpo, tm, sess, n=1)
    weights = {k: a.up.clone() for k, a in sess.adapters.items()}
    _restart(pcpo, name)
    for kw, word in (({"alpha": 8.0}, "alpha"), ({"seed": 1}, "seed"), ({"optimizer": "SGD"}, "optimizer")):
        with pytest.raises(ValueError, match=word) as e:
            create(pcpo, tm, name, resume=True, **kw)
        assert "checkpoint.safetensors" in str(e.value) and "run_name" in str(e.value)
        assert name not in pcpo.mod("nodes.session").SESSIONS
    # a new learning rate applies after a restart (the saved one does not silently win) ...
    resumed = create(pcpo, tm, name, resume=True, lr=5e-4)
    assert resumed.iteration == 1 and all(g["lr"] == 5e-4 for g in resumed.optimizer.param_groups)
    assert all(torch.equal(a.up, weights[k]) for k, a in resumed.adapters.items())
    # ... and the resumed state trains inside inference mode (as the executor runs nodes)
    iterate(pcpo, tm, resumed, n=1)
    assert resumed.iteration == 2 and all(float(s["step"]) == 4.0 for s in resumed.optimizer.state_dict()["state"].values())
    # a live run refuses a changed alpha too, and takes a new learning rate
    with pytest.raises(ValueError, match="alpha"):
        create(pcpo, tm, name, resume=True, alpha=8.0, lr=5e-4)
    assert create(pcpo, tm, name, resume=True, lr=2e-4) is resumed
    assert all(g["lr"] == 2e-4 for g in resumed.optimizer.param_groups)


def test_resume_off_never_overwrites_a_run_and_only_the_servers_loop_continues_it(pcpo, tiny, comfy_dirs):
    """resume off has one meaning, whatever ComfyUI's cache holds: a run that exists (live, or on disk
    after a restart) is refused naming the run and the fixes, for any node (every copy of a workflow
    shares node ids); only a loop id the server issued for the run's lineage continues it, and a
    forged or stale marker is a press."""
    import shutil
    loop = pcpo.mod("nodes.requeue")
    sessions = pcpo.mod("nodes.session")
    tm = inference_model(tiny)
    first = create(pcpo, tm, "shared_name", unique_id="5")
    iterate(pcpo, tm, first, n=1)
    ckpt = pathlib.Path(first.checkpoint_path)
    before = ckpt.read_bytes()
    forged = {"pcpo_loop": {"run": "shared_name", "target": 50, "loop": "0" * 32, "token": first.token}}
    for uid, info in (("9", None), ("5", None), ("5", forged)):
        with pytest.raises(ValueError, match="already exists") as e:
            create(pcpo, tm, "shared_name", unique_id=uid, extra_pnginfo=info)
        msg = str(e.value)
        assert "'shared_name'" in msg and "resume on" in msg and "new run_name" in msg and "delete" in msg
    assert sessions.SESSIONS.get("shared_name") is first and first.iteration == 1 and ckpt.read_bytes() == before
    # the run's own loop (an id the server remembers for this lineage) continues it with resume off ...
    own = loop.LOOPS.start("shared_name", first.lineage, 3)
    assert create(pcpo, tm, "shared_name", unique_id="5",
                  extra_pnginfo={"pcpo_loop": {"run": "shared_name", "loop": own.id}}) is first
    # ... a loop of another lineage of the name does not
    other = loop.LOOPS.start("shared_name", "f" * 32, 3)
    with pytest.raises(ValueError, match="already exists"):
        create(pcpo, tm, "shared_name", extra_pnginfo={"pcpo_loop": {"run": "shared_name", "loop": other.id}})
    # after a restart (a cache miss) resume off still refuses: the checkpoint is on disk
    _restart(pcpo, "shared_name")
    with pytest.raises(ValueError, match="already exists") as e:
        create(pcpo, tm, "shared_name", unique_id="5")
    assert str(ckpt) in str(e.value) and ckpt.read_bytes() == before
    # the loop continues the evicted/restarted run from disk, in its lineage
    resumed = create(pcpo, tm, "shared_name", extra_pnginfo={"pcpo_loop": {"run": "shared_name", "loop": own.id}})
    assert resumed.iteration == 1 and resumed.lineage == first.lineage
    # resume on continues it; deleting the folder is how a run is started over
    assert create(pcpo, tm, "shared_name", resume=True) is resumed
    _restart(pcpo, "shared_name")
    shutil.rmtree(ckpt.parent)
    again = create(pcpo, tm, "shared_name", unique_id="5")
    assert again.iteration == 0 and again.lineage != first.lineage


def test_unusable_checkpoints_give_clear_errors(pcpo, tiny, comfy_dirs):
    tm = inference_model(tiny)
    name = "broken"
    sess = create(pcpo, tm, name)
    iterate(pcpo, tm, sess, n=1)
    path = sess.checkpoint_path
    data = pathlib.Path(path).read_bytes()
    _restart(pcpo, name)
    pathlib.Path(path).write_bytes(data[: len(data) // 2])  # truncated (a full disk, a copy cut short)
    with pytest.raises(ValueError, match="corrupt") as e:
        create(pcpo, tm, name, resume=True)
    assert path in str(e.value) and "resume to false" in str(e.value)
    pathlib.Path(path).write_bytes(data)
    resumed = create(pcpo, tm, name, resume=True)
    with torch.no_grad():
        next(iter(resumed.adapters.values())).up[0, 0] = float("nan")
    resumed.save_checkpoint()
    _restart(pcpo, name)
    with pytest.raises(ValueError, match="NaN") as e:
        create(pcpo, tm, name, resume=True)
    assert path in str(e.value)
    with pytest.raises(ValueError, match="already exists"):  # resume off never overwrites it
        create(pcpo, tm, name, resume=False)
    os.remove(path)
    assert create(pcpo, tm, name, resume=False).iteration == 0  # with the checkpoint gone it starts over


def test_low_eta_is_bounded_and_warned(pcpo, tiny, comfy_dirs):
    tm = inference_model(tiny)
    sess = create(pcpo, tm, "low_eta")
    with torch.inference_mode(), pytest.raises(ValueError, match="eta 0.01"):
        pcpo.nodes["PCPOTrajectorySampler"]().sample(sess, 4, 3.0, 2, 0, 0.01, "uw-sigma", "constant", "simple",
                                                     64, 64, 2, positive=tm.cond(1, 5), negative=tm.uncond(1))
    with torch.inference_mode():
        _, batch = pcpo.nodes["PCPOTrajectorySampler"]().sample(
            sess, 4, 3.0, 2, 0, 0.2, "uw-sigma", "constant", "simple", 64, 64, 2,
            positive=tm.cond(1, 5), negative=tm.uncond(1))
    stats = update(pcpo, sess, batch, torch.rand(4, 64, 64, 3))
    assert any("eta 0.2" in w for w in stats["warnings"])
    assert iterate(pcpo, tm, sess)["warnings"] == []  # eta 1: no warning


def test_images_must_come_from_the_trajectory(pcpo, tiny, comfy_dirs):
    tm = inference_model(tiny)
    sess = create(pcpo, tm, "images")
    _, batch = rollout(pcpo, tm, sess)  # 8x8 latents of 64x64 images
    scorer = pcpo.nodes["PCPORewardScorer"]()
    with pytest.raises(ValueError, match="images for a trajectory of 4"):
        scorer.score(torch.rand(3, 64, 64, 3), batch, "brightness")
    with pytest.raises(ValueError, match="do not come from latents of 8x8"):
        scorer.score(torch.rand(4, 64, 48, 3), batch, "brightness")
    assert scorer.score(torch.rand(4, 64, 64, 3), batch, "brightness")[0].values.shape == (4,)


def test_bad_export_name_is_refused_before_any_work(pcpo, comfy, comfy_dirs):
    import run_child
    assert comfy.load_pack(TESTS_DIR / "tiny_pack")
    prompt = run_child.graph(export="../outside")
    ok, error, _, node_errors = comfy.validate_prompt(prompt)
    assert "9" in node_errors  # reported when queued ...
    assert any("filename" in str(e) and ".." in str(e) for e in node_errors["9"]["errors"])
    with pytest.raises(comfy.PromptError, match="filename") as e:  # ... and ComfyUI's partial run stops at once
        comfy.execute_prompt(prompt)
    assert "PCPOLoRA" in str(e.value)
    assert run_child.RUN not in pcpo.mod("nodes.session").SESSIONS  # nothing ran: no session, no sampling
    # on a server the PCPO LoRA node's output is cached from the previous prompt: the Trajectory
    # Sampler (which runs every iteration) refuses before sampling
    good = run_child.graph()
    executor = comfy.new_executor(fresh=True)
    comfy.execute_prompt(good, executor=executor)
    sess = pcpo.mod("nodes.session").SESSIONS.get(run_child.RUN)
    assert sess.iteration == 1
    with pytest.raises(comfy.PromptError, match="filename") as e:
        comfy.execute_prompt(prompt, executor=executor)
    assert "PCPOTrajectorySampler" in str(e.value) and sess.iteration == 1


def test_switching_between_runs_keeps_memory_flat(pcpo, tiny, comfy_dirs):
    """More runs than the registry keeps live: the least recently used are checkpointed and leave
    memory, and come back exactly when used again."""
    reg = pcpo.mod("nodes.session").SESSIONS
    old = reg.max_live
    reg.max_live = 2
    try:
        tm = inference_model(tiny)
        sessions = {n: create(pcpo, tm, n) for n in ("run_a", "run_b", "run_c")}

        def cycle():
            for n, s in sessions.items():
                iterate(pcpo, tm, s)

        def live_tensor_bytes():
            gc.collect()
            return sum(o.numel() * o.element_size() for o in gc.get_objects()
                       if isinstance(o, torch.Tensor) and not o.is_meta)

        cycle()
        before = live_tensor_bytes()
        cycle()
        cycle()
        after = live_tensor_bytes()
        assert len(reg) <= 2 and after <= before * 1.02 + 65536, (before, after)
        assert all(s.iteration == 3 and s.optimizer_steps == 6 for s in sessions.values())
        assert sum(s.evicted for s in sessions.values()) == 1
    finally:
        reg.max_live = old


# ----------------------------------------------------------------------------- restart and crashes

def _child(base, iterations, *extra, expect_kill=False):
    cmd = [sys.executable, str(CHILD), "--base", str(base), "--iterations", str(iterations), *extra]
    # one hash seed: ComfyUI orders independent output nodes (Export, Held-out, Guard) by hashing, so
    # the order of an iteration's writes is the same in every process of a kill chain
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if expect_kill:
        assert p.returncode == -9, (p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    else:
        assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def _dump(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kill_at_any_point_and_resume_is_bit_identical(tmp_path):
    """Real processes through the real executor: an uninterrupted 5-iteration run against one that is
    killed (SIGKILL) in the second optimizer step of iteration 2, between the checkpoint's temp file
    and its rename in iteration 3, and between the export's temp file and its rename in iteration 4,
    each time restarted with resume on.  LoRA, optimizer moments and steps, generator state and the
    exported LoRA are bit-identical, and no temporary file is left behind."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _child(ref, 5, "--dump", str(tmp_path / "ref.safetensors"))
    _child(run, 5, "--kill-at", "update", "--kill-iteration", "2", expect_kill=True)
    ckpt = run / "output" / "pcpo" / "child_run" / "checkpoint.safetensors"
    _, md = _dump(ckpt)
    assert md["iteration"] == "1"  # the killed update left the committed state alone
    _child(run, 5, "--kill-at", "checkpoint", "--kill-iteration", "3", expect_kill=True)
    _, md = _dump(ckpt)
    assert md["iteration"] == "2"
    assert any(p.name.endswith(".partial") for p in ckpt.parent.iterdir())  # the killed write's temp file
    _child(run, 5, "--kill-at", "export", "--kill-iteration", "4", expect_kill=True)
    loras = run / "models" / "loras" / "pcpo"
    assert any(p.name.endswith(".partial") for p in loras.iterdir())
    p = _child(run, 5, "--dump", str(tmp_path / "run.safetensors"))
    assert "iteration 5 steps 10" in p.stdout
    a, amd = _dump(tmp_path / "ref.safetensors")
    b, bmd = _dump(tmp_path / "run.safetensors")
    assert set(a) == set(b) and any(k.startswith("optimizer.") for k in a) and "generator" in a
    assert any(k.startswith("export.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert amd["iteration"] == bmd["iteration"] == "5" and amd["optimizer_steps"] == bmd["optimizer_steps"] == "10"
    assert all(float(t) == 10.0 for k, t in b.items() if k.endswith(".step"))
    left = [str(p) for p in run.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".tmp")]
    assert left == []
    assert sorted(p.name for p in loras.iterdir()) == ["child_run.safetensors"]


def test_kill_mid_run_with_a_sliding_sde_window_resumes_bit_identically(tmp_path):
    """A run with a 2-step SDE window sliding every iteration (dpmpp_2m outside it), killed in the
    second optimizer step of iteration 2 and between the checkpoint's temp file and its rename in
    iteration 3, resumes to the uninterrupted run's state bit for bit; the window moved every
    iteration (its place follows the committed iteration count)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    _child(ref, 4, "--window", "--dump", str(tmp_path / "ref.safetensors"))
    _child(run, 4, "--window", "--kill-at", "update", "--kill-iteration", "2", expect_kill=True)
    _child(run, 4, "--window", "--kill-at", "checkpoint", "--kill-iteration", "3", expect_kill=True)
    _child(run, 4, "--window", "--dump", str(tmp_path / "run.safetensors"))
    _, resumed = _compare_dumps(tmp_path / "ref.safetensors", tmp_path / "run.safetensors")
    history = json.loads(resumed["history"])
    # 6 steps, window 2: starts 0 .. 3, one step later each iteration
    assert [h["sde_window_first_step"] for h in history] == [0, 1, 2, 3]
    assert [h["sde_window_last_step"] for h in history] == [1, 2, 3, 4]


def _compare_dumps(ref_path, run_path, ratings=False):
    a, amd = _dump(ref_path)
    b, bmd = _dump(run_path)
    assert set(a) == set(b) and any(k.startswith("optimizer.") for k in a) and "generator" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("iteration", "optimizer_steps", "history", "metrics_jsonl", "lr"):
        assert amd[key] == bmd[key], key
    ga, gb = json.loads(amd["guard_json"]), json.loads(bmd["guard_json"])
    if ga is not None:
        assert ga == gb and json.loads(bmd["guard_companion"]) == gb  # lr_scale, best, rollback log
    if ratings:
        assert amd["trained_ratings"] == bmd["trained_ratings"]
    return amd, bmd


def _writes_of(stdout: str, iteration: int) -> list:
    """The file writes of iteration ``iteration`` as a child logged them (``--kill-at write``)."""
    for ln in stdout.splitlines():
        head, _, rest = ln.partition(": ")
        if head.startswith(f"iteration {iteration} ") and " writes " in head:
            return rest.split("; ") if rest else []
    raise AssertionError(f"no write log of iteration {iteration} in {stdout[-2000:]}")


def _kill_chain(tmp_path, flag, R, final):
    """The run of ``flag`` killed just before each write of iteration R up to and including its
    checkpoint, one process after the other on one run folder (each resumes from what the kill
    left), and once more just after the checkpoint, then resumed to ``final``; and, for each further
    write after the commit, a copy of the folder as the first kill left it, killed before that write
    and resumed.  The writes are those of the uninterrupted run's iteration R, in its order.  Every
    resumed run equals the uninterrupted one.  Returns (the writes, the kill lines, the dumps)."""
    import shutil
    ref = _child(tmp_path / "ref", final, flag, "--kill-at", "write", "--kill-iteration", "0",
                 "--dump", str(tmp_path / "ref.safetensors"))
    writes = _writes_of(ref.stdout, R)
    commit = writes.index("replace checkpoint.safetensors") + 1  # the commit point: write number `commit`
    run = tmp_path / "run"
    ckpt = run / "output" / "pcpo" / "child_run" / "checkpoint.safetensors"
    killed = []
    for n in range(1, commit + 2):
        p = _child(run, final, flag, "--kill-at", "write", "--kill-iteration", str(R), "--kill-write", str(n),
                   expect_kill=True)
        killed.append(p.stdout.strip().splitlines()[-1])
        if n == 1:
            shutil.copytree(run, tmp_path / "after_first_kill", symlinks=True)
        # the checkpoint is at R-1 until its own rename (write `commit`) has happened
        assert _dump(ckpt)[1]["iteration"] == str(R - 1 if n <= commit else R), (n, killed)
    _child(run, final, flag, "--dump", str(tmp_path / "run.safetensors"))
    out = [_compare_dumps(tmp_path / "ref.safetensors", tmp_path / "run.safetensors", ratings="--human" == flag)]
    for n in range(commit + 2, len(writes) + 1):
        fresh = tmp_path / f"fresh_{n}"
        shutil.copytree(tmp_path / "after_first_kill", fresh, symlinks=True)
        p = _child(fresh, final, flag, "--kill-at", "write", "--kill-iteration", str(R), "--kill-write", str(n),
                   expect_kill=True)
        killed.append(p.stdout.strip().splitlines()[-1])
        _child(fresh, final, flag, "--dump", str(tmp_path / f"fresh_{n}.safetensors"))
        out.append(_compare_dumps(tmp_path / "ref.safetensors", tmp_path / f"fresh_{n}.safetensors",
                                  ratings="--human" == flag))
    # every write of the iteration was killed once, in the uninterrupted run's order
    assert [k.split(": ", 1)[1] for k in killed] == writes, (writes, killed)
    return writes, killed, out


def test_kill_at_every_write_of_a_guarded_run_resumes_bit_identically(tmp_path):
    """A guarded run (held-out every iteration, margin 0, lower_lr: it rolls back to iteration 1 and
    halves the learning rate at iterations 2, 3 and 4) killed with SIGKILL just before each of the file
    writes of iteration 3 -- the metrics lines (update, held-out, guard), the held-out preview, the
    checkpoint with the guard's decision, guard.json, the export -- resumes bit-identically: LoRA,
    optimizer state, generator, export, optimizer learning rate, lr_scale 0.125 and the rollback log
    (guard.json and the checkpoint's copy), and every metrics.jsonl line."""
    writes, killed, out = _kill_chain(tmp_path, "--guard", R=3, final=4)
    assert sorted(writes) == sorted(["metrics line 3"] * 3 + [
        "replace pcpo_heldout_child_run.png", "replace checkpoint.safetensors", "replace guard.json",
        "replace child_run.safetensors"])
    # the guard's decision commits with the checkpoint: guard.json (derived) only after it
    assert writes.index("replace guard.json") > writes.index("replace checkpoint.safetensors")
    amd, _ = out[0]
    guard = json.loads(amd["guard_json"])
    assert guard["lr_scale"] == 0.125 and [r["iteration"] for r in guard["rollbacks"]] == [2, 3, 4]
    assert json.loads(amd["lr"]) == [pytest.approx(1e-2 * 0.125)]


def test_kill_at_every_write_of_a_human_rated_run_resumes_bit_identically(tmp_path):
    """A run rated through the rating registry (every group, best-worst) killed before each write of
    iteration 2 -- the rating record, the metrics line, the checkpoint, the trained mark, the export --
    resumes bit-identically, and ratings.jsonl says which record each iteration trained on: the
    iteration rated again after each kill leaves several records, exactly one of them marked."""
    writes, killed, out = _kill_chain(tmp_path, "--human", R=2, final=3)
    assert sorted(writes) == sorted(["ratings line ratings.jsonl", "metrics line 2", "replace checkpoint.safetensors",
                                     "ratings line ratings.jsonl", "replace child_run.safetensors"])
    assert writes[0] == "ratings line ratings.jsonl"  # the rating is recorded before anything trains on it
    amd, bmd = out[0]
    trained = json.loads(bmd["trained_ratings"])
    assert sorted(trained) == ["1", "2", "3"] and all(len(v) == 1 for v in trained.values())
    # iteration 2 was rated again by every killed process that got past its rating line and did not
    # commit (kills 2..commit), each leaving a record no mark names; the committed one is marked
    commit = writes.index("replace checkpoint.safetensors") + 1
    assert int(amd["rating_records"]) == 3 and int(bmd["rating_records"]) == 3 + (commit - 1)


def test_a_checkpoint_the_disk_cannot_take_loses_no_metrics_line_and_names_the_file(tmp_path):
    """Iteration 2 of a real executor run on a disk that takes log lines but not the checkpoint (a
    file-size limit: the write fails with an OS error inside safetensors): the prompt fails with an
    error naming checkpoint.safetensors and saying the run is kept in memory; the checkpoint on disk
    stays at iteration 1, metrics.jsonl already holds line 2; the next prompt (space freed) continues
    from memory, and the run ends bit-identical to an uninterrupted one, with every metrics line."""
    _child(tmp_path / "ref", 3, "--dump", str(tmp_path / "ref.safetensors"))
    run = tmp_path / "run"
    p = _child(run, 3, "--full-disk-iteration", "2", "--dump", str(tmp_path / "run.safetensors"))
    failed = [ln for ln in p.stdout.splitlines() if ln.startswith("prompt failed")]
    assert len(failed) == 1, p.stdout[-2000:]
    ckpt = run / "output" / "pcpo" / "child_run" / "checkpoint.safetensors"
    assert f"could not write the run checkpoint {ckpt}" in failed[0] and "kept in memory at iteration 2" in failed[0]
    a, amd = _dump(tmp_path / "ref.safetensors")
    b, bmd = _dump(tmp_path / "run.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert amd["metrics_jsonl"] == bmd["metrics_jsonl"]
    assert [json.loads(ln)["iteration"] for ln in bmd["metrics_jsonl"].splitlines()] == [1, 2, 3]
    left = [str(p) for p in run.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".tmp")]
    assert left == []
