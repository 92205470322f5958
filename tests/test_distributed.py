"""Several processes on torch.distributed (gloo on CPU, 2 processes under torchrun, one thread each).

* rank-disjoint groups and the timestep-draw bookkeeping (comfyui_pcpo/distributed.py);
* 2 ranks x 1 group per iteration give the same run after 2 iterations (LoRA, optimizer state,
  timestep generator, stats) as 1 process x 2 groups with the same prompts and seeds, with
  train_fraction < 1 and two micro-batches per group so the timestep draws matter; only rank 0
  writes the checkpoint and the export;
* the 2-rank checkpoint resumes in 1 process and continues exactly as the 1-process run does;
* a rank that raises ends the job with that error, on every rank, well within the timeout;
* the Reward Guard gives one verdict for the run: with held-out scores that differ between the ranks
  (rank 0 keeps where rank 1 alone would roll back, then rank 0 rolls back where rank 1 alone would
  keep) every rank applies rank 0's verdict, holds the same guard state and, after a rollback, the
  same LoRA / optimizer / generator bits as rank 0's best state; rank 0 alone writes the run's files
  (the core rule on two gloo ranks without ComfyUI, where rank 1 cannot see the best file at all,
  and the whole workflow under torchrun).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from test_run_command import (REPO_ROOT, RUN_TIMEOUT_S, checkpoint, node_of, run_runner, runner_args, runner_env,
                         tiny_sd15, write_json)

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(workflow, out, iterations, tmp_path, nproc=2, env=None, timeout=RUN_TIMEOUT_S):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()),
           *runner_args(workflow, out, iterations, tmp_path, ("--timeout", str(COLLECTIVE_TIMEOUT_S)))[:]]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env or runner_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- bookkeeping

def test_rank_slices_are_disjoint_and_cover_the_global_draw():
    from comfyui_pcpo.distributed import rank_slice
    items = list(range(6))
    parts = [rank_slice(items, r, 3) for r in range(3)]
    assert parts == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError):
        rank_slice(items, 0, 4)
    assert rank_slice(items) == items  # one process: everything


def test_skipped_draws_leave_the_generator_where_one_process_leaves_it(monkeypatch):
    from comfyui_pcpo import distributed as D
    g_one = torch.Generator().manual_seed(5)
    one = [torch.randperm(7, generator=g_one) for _ in range(2 * 3 * 2)]  # 2 ranks x 3 groups x 2 chunks
    for rank in (0, 1):
        monkeypatch.setattr(D, "context", lambda rank=rank: (rank, 2))
        before, after = D.timestep_draws_around(3, 2)
        assert (before, after) == ((0, 6) if rank == 0 else (6, 0))
        g = torch.Generator().manual_seed(5)
        D.skip_timestep_draws(g, before, 7)
        mine = [torch.randperm(7, generator=g) for _ in range(6)]
        D.skip_timestep_draws(g, after, 7)
        assert all(torch.equal(a, b) for a, b in zip(mine, one[rank * 6:(rank + 1) * 6]))
        assert torch.equal(g.get_state(), g_one.get_state())


def test_single_process_helpers_are_identities():
    from comfyui_pcpo import distributed as D
    assert D.context() == (0, 1) and D.is_writer() and not D.active() and D.group_offset(4) == 0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    D.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    stats = {"reward_mean": 1.0}
    assert D.reduce_stats(stats, 4) is stats and D.peer_failure() is None


# --------------------------------------------------------------------------- 2 processes

def _close(a: dict, b: dict, atol=1e-4):
    assert set(a) == set(b)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < atol, worst


def with_dashboard(api: dict) -> dict:
    """``api`` plus a PCPO Dashboard after the update (metrics.jsonl and dashboard.png in the run folder)."""
    lora = next(nid for nid, n in api.items() if n["class_type"] == "PCPOLoRA")
    update = next(nid for nid, n in api.items() if n["class_type"] == "PCPOLoRAUpdate")
    api["95"] = {"class_type": "PCPODashboard", "inputs": {"width": 256, "height": 256, "last_iterations": 0,
                                                          "session": [lora, 1], "stats": [update, 1]}}
    return api


@pytest.fixture(scope="module")
def two_ranks_and_one(tmp_path_factory):
    """2 iterations with 2 ranks x 1 group, and with 1 process x 2 groups (same prompts and seeds)."""
    tmp = tmp_path_factory.mktemp("dist")
    kw = dict(run_name="dist_run", train_fraction=0.5, micro_batch=1)
    wf2 = write_json(tmp / "wf_rank.json", with_dashboard(tiny_sd15(prompts_per_iteration=1, **kw)))
    wf1 = write_json(tmp / "wf_one.json", with_dashboard(tiny_sd15(prompts_per_iteration=2, **kw)))
    t0 = time.monotonic()
    two = torchrun(wf2, tmp / "out2", 2, tmp)
    t_two = time.monotonic() - t0
    one = run_runner(wf1, tmp / "out1", 2, tmp, env=runner_env(tmp, PCPO_TEST_LORAS=tmp / "loras1"))
    return {"tmp": tmp, "two": two, "one": one, "wf1": wf1, "t_two": t_two}


def test_two_ranks_train_the_same_lora_as_one_process_with_twice_the_groups(two_ranks_and_one):
    r = two_ranks_and_one
    assert r["two"].returncode == 0, r["two"].stdout + r["two"].stderr
    assert r["one"].returncode == 0, r["one"].stdout + r["one"].stderr
    assert "2 processes (gloo)" in r["two"].stdout
    assert r["two"].stdout.count("iteration 2/2") == 1, "rank 0 alone prints progress"
    t2, md2 = checkpoint(r["tmp"] / "out2", "dist_run")
    t1, md1 = checkpoint(r["tmp"] / "out1", "dist_run")
    assert md2["iteration"] == md1["iteration"] == "2" and md2["optimizer_steps"] == md1["optimizer_steps"]
    assert torch.equal(t2["generator"], t1["generator"]), "the timestep generator follows one process exactly"
    _close({k: v for k, v in t2.items() if k != "generator"}, {k: v for k, v in t1.items() if k != "generator"})
    h2, h1 = json.loads(md2["history"]), json.loads(md1["history"])
    for a, b in zip(h2, h1):  # stats reduced over both ranks = stats of all groups in one process
        for key in ("reward_mean", "reward_std", "clip_fraction", "approx_kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
        assert a["zero_std_groups"] == b["zero_std_groups"]
    exports = sorted(p.name for p in (r["tmp"] / "loras" / "pcpo_test").iterdir())
    assert exports == ["dist_run.safetensors"], exports  # rank 0 wrote it; no temp files left by rank 1
    run_dir = r["tmp"] / "out2" / "pcpo" / "dist_run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.safetensors", "dashboard.png", "metrics.jsonl"]
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["iteration"] for ln in lines] == [1, 2]  # one line per iteration, written by rank 0
    assert lines[1]["reward_mean"] == pytest.approx(h1[1]["reward_mean"], rel=1e-3, abs=1e-6)


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks_and_one):
    r = two_ranks_and_one
    assert r["two"].returncode == 0 and r["one"].returncode == 0
    tmp = r["tmp"]
    # both runs continue in one process to iteration 3: from the 2-rank and from the 1-process checkpoint
    res2 = run_runner(r["wf1"], tmp / "out2", 3, tmp)
    res1 = run_runner(r["wf1"], tmp / "out1", 3, tmp, env=runner_env(tmp, PCPO_TEST_LORAS=tmp / "loras1"))
    assert res2.returncode == 0, res2.stdout + res2.stderr
    assert res1.returncode == 0, res1.stdout + res1.stderr
    assert "resumed at iteration 2" in res2.stdout
    t2, md2 = checkpoint(tmp / "out2", "dist_run")
    t1, md1 = checkpoint(tmp / "out1", "dist_run")
    assert md2["iteration"] == md1["iteration"] == "3"
    assert torch.equal(t2["generator"], t1["generator"])
    _close({k: v for k, v in t2.items() if k != "generator"}, {k: v for k, v in t1.items() if k != "generator"})


def test_a_failing_rank_stops_the_job_with_its_error(tmp_path):
    api = tiny_sd15(prompts_per_iteration=1, run_name="dist_fail")
    decode = next(nid for nid, n in api.items() if n["class_type"] == "VAEDecode")
    api["90"] = {"class_type": "PCPOTestFailOnRank", "inputs": {"images": [decode, 0]}}
    node_of(api, "PCPORewardScorer")["inputs"]["images"] = ["90", 0]
    wf = write_json(tmp_path / "wf.json", api)
    t0 = time.monotonic()
    res = torchrun(wf, tmp_path / "out", 3, tmp_path,
                   env=runner_env(tmp_path, PCPO_TEST_FAIL_RANK=1, PCPO_TEST_FAIL_ITERATION=2))
    took = time.monotonic() - t0
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert "[rank 1] error:" in text and "injected failure on this rank" in text, text
    assert "[rank 0] stopped: rank 1 failed:" in text and "injected failure" in text.split("[rank 0] stopped:")[1], text
    assert took < COLLECTIVE_TIMEOUT_S + 90, took  # the peer was stopped, not left to time out
    # the run on disk is the last iteration every rank completed
    assert checkpoint(tmp_path / "out", "dist_fail")[1]["iteration"] == "1"


# --------------------------------------------------------------------------- the Reward Guard's verdict

GUARD_CORE_CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import torch
from safetensors.torch import save_file
from comfyui_pcpo import distributed as D
from comfyui_pcpo.guard import GuardConfig, GuardState, accept_best, decide, lower_lr, rollback, save_best
from comfyui_pcpo.run_state import RunSettings, RunState, new_adapters

torch.set_num_threads(1)
rank, world = D.init_from_env(timeout_s=60, backend="gloo")
out = sys.argv[1]
# rank 1 stands for a process on another machine: it cannot see rank 0's best file
best = os.path.join(out, "best.safetensors") if rank == 0 else os.path.join(out, "rank1_view", "best.safetensors")
shapes = {"a": (6, 5), "b": (4, 6)}
state = RunState(new_adapters(shapes, list(shapes), rank=2, alpha=2.0, seed=0),
                 RunSettings(rank=2, alpha=2.0, learning_rate=1e-2, seed=0))

def steps(n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.enable_grad():
            sum((p * torch.randn(p.shape, generator=g)).sum() for p in state.params()).backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        torch.rand(3, generator=state.generator)
        state.commit({"reward_mean": 0.0}, 1, "r", "pcpo")

cfg, gs, verdicts = GuardConfig(heldout_margin=0.05, action="lower_lr", lr_factor=0.5), GuardState(), []
steps(2, 1)
v = decide(cfg, gs, state.iteration, 0.5, {}, None, best)       # both ranks: 0.5, the first best
verdicts.append([v.reasons, v.new_best, v.rollback_to])
if v.new_best:
    save_best(state, best)
    accept_best(gs, state.iteration, 0.5)
steps(2, 10 + rank)     # the ranks' states part (sharpens the check that a rollback gives rank 0's bits)
for scores in ((0.5, 0.0), (0.0, 0.5)):  # rank 0 keeps / rank 1 would roll back, then the other way round
    v = decide(cfg, gs, state.iteration, scores[rank], {}, None, best)
    verdicts.append([v.reasons, v.new_best, v.rollback_to])
    if v.rollback_to is not None:
        rollback(state, best)
        lower_lr(gs, cfg.lr_factor)
tensors, _ = state.state_tensors()
save_file(tensors, os.path.join(out, f"state{rank}.safetensors"))
with open(os.path.join(out, f"guard{rank}.json"), "w") as f:
    json.dump({"guard": gs.to_dict(), "verdicts": verdicts, "iteration": state.iteration}, f)
D.shutdown()
"""


def _read_tensors(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _bit_equal(a: dict, b: dict, prefixes=("lora.", "optimizer.", "generator")) -> bool:
    keys = {k for k in a if k.startswith(prefixes)}
    return keys == {k for k in b if k.startswith(prefixes)} and bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_two_ranks_apply_rank_0s_guard_verdict_and_roll_back_to_its_bits(tmp_path):
    child = tmp_path / "guard_child.py"
    child.write_text(GUARD_CORE_CHILD, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(child), str(out), str(REPO_ROOT)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=runner_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    g0, g1 = (json.loads((out / f"guard{r}.json").read_text()) for r in (0, 1))
    assert g0 == g1, (g0, g1)  # the same verdicts, guard state and iteration on both ranks
    (first, keep, trip) = g0["verdicts"]
    assert first == [[], True, None] and keep == [[], False, None]      # rank 0's scores decide
    assert trip[1] is False and trip[2] == 2 and "held-out reward 0 fell 0.5" in trip[0][0]
    assert g0["guard"]["best_iteration"] == 2 and g0["guard"]["best_score"] == 0.5
    assert g0["guard"]["lr_scale"] == 0.5 and g0["guard"]["evaluations"] == 3
    s0, s1 = _read_tensors(out / "state0.safetensors"), _read_tensors(out / "state1.safetensors")
    best = _read_tensors(out / "best.safetensors")
    assert _bit_equal(s0, best) and _bit_equal(s1, best), "every rank holds rank 0's best state, bit for bit"
    # rank 0 alone wrote the best file; rank 1 read no file (its view of the folder does not exist)
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "guard0.json", "guard1.json",
                                                      "state0.safetensors", "state1.safetensors"]


# a test-only pack: a held-out reward that scores each rank's n-th evaluation with the constant
# $PCPO_TEST_HELDOUT_SCORES[rank][n], and a node that dumps each rank's run and guard state after the guard
GUARD_PACK = r"""
import json, os
import torch
from safetensors.torch import save_file
from comfyui_pcpo.rewards.base import Reward


class _RankScore(Reward):
    name = "rank_score"
    calls = 0

    def _score(self, images, prompts):
        _RankScore.calls += 1
        scores = json.loads(os.environ["PCPO_TEST_HELDOUT_SCORES"])[os.environ.get("RANK", "0")]
        return torch.full((images.shape[0],), float(scores[_RankScore.calls - 1]), dtype=torch.float64)


class PCPOTestRankScore:
    CATEGORY = "PCPO/test"
    FUNCTION = "run"
    RETURN_TYPES = ("PCPO_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return (_RankScore(),)


class PCPOTestDumpRank:
    CATEGORY = "PCPO/test"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"session": ("PCPO_SESSION",), "report": ("STRING", {"forceInput": True})}}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, session, report):
        s = session.live()
        tensors, _ = s.state.state_tensors()
        md = {"report": report, "guard": json.dumps(s._pcpo_guard.to_dict()),
              "lr": json.dumps([g["lr"] for g in s.state.optimizer.param_groups])}
        name = f"rank{os.environ.get('RANK', '0')}_it{s.state.iteration}.safetensors"
        save_file(tensors, os.path.join(os.environ["PCPO_TEST_DUMP"], name), md)
        return {}


NODE_CLASS_MAPPINGS = {"PCPOTestRankScore": PCPOTestRankScore, "PCPOTestDumpRank": PCPOTestDumpRank}
"""


def with_guard(api: dict) -> dict:
    """``api`` plus a Held-out Evaluation every iteration scored by PCPOTestRankScore, a Reward Guard
    (lower_lr, best exported) and PCPOTestDumpRank after it."""
    lora = next(nid for nid, n in api.items() if n["class_type"] == "PCPOLoRA")
    update = next(nid for nid, n in api.items() if n["class_type"] == "PCPOLoRAUpdate")
    loader = next(nid for nid, n in api.items() if n["class_type"] == "PCPOTestCheckpointLoader")
    api["91"] = {"class_type": "PCPOTestRankScore", "inputs": {}}
    api["92"] = {"class_type": "PCPOHeldOutEvaluation", "inputs": {
        "session": [lora, 1], "clip": [loader, 1], "vae": [loader, 2], "prompts": "a red circle", "negative": "",
        "every": 1, "samples_per_prompt": 1, "steps": 4, "cfg": 1.0, "eta": 1.0, "scheduler": "simple",
        "width": 64, "height": 64, "seed": 7, "reward": "brightness", "guard_reward": "(none)",
        "stats": [update, 1], "reward_model": ["91", 0]}}
    api["93"] = {"class_type": "PCPORewardGuard", "inputs": {
        "session": [lora, 1], "heldout": ["92", 0], "heldout_margin": 0.05, "guard_margin": 0.05, "kl_bound": 0.0,
        "action": "lower_lr", "lr_factor": 0.5, "best_filename": "pcpo_test/{run}_best", "dtype": "fp32"}}
    api["94"] = {"class_type": "PCPOTestDumpRank", "inputs": {"session": [lora, 1], "report": ["93", 0]}}
    return api


def test_under_torchrun_every_rank_applies_rank_0s_guard_verdict(tmp_path):
    from safetensors import safe_open
    pack = tmp_path / "pcpo_guard_test_pack.py"
    pack.write_text(GUARD_PACK, encoding="utf-8")
    dump = tmp_path / "dump"
    dump.mkdir()
    wf = write_json(tmp_path / "wf.json", with_guard(tiny_sd15(prompts_per_iteration=1, run_name="dist_guard")))
    # iteration 1: both 0.5 (the first best); 2: rank 0 keeps, rank 1 alone would roll back;
    # 3: rank 0 rolls back (to iteration 1), rank 1 alone would keep
    scores = {"0": [0.5, 0.5, 0.0], "1": [0.5, 0.0, 0.5]}
    env = runner_env(tmp_path, PCPO_TEST_HELDOUT_SCORES=json.dumps(scores), PCPO_TEST_DUMP=dump)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()),
           *runner_args(wf, tmp_path / "out", 3, tmp_path,
                        ("--timeout", str(COLLECTIVE_TIMEOUT_S), "--nodes", str(pack)))]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr

    def read(rank, it):
        with safe_open(str(dump / f"rank{rank}_it{it}.safetensors"), framework="pt", device="cpu") as f:
            md = f.metadata()
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(md["guard"]), json.loads(md["lr"])

    for it in (1, 2, 3):
        (t0, gs0, lr0), (t1, gs1, lr1) = read(0, it), read(1, it)
        assert gs0 == gs1, (it, gs0, gs1)               # the same guard state on both ranks
        assert lr0 == lr1, (it, lr0, lr1)
        assert _bit_equal(t0, t1), f"iteration {it}: the ranks hold different LoRA / optimizer state"
    g2, g3 = read(0, 2)[1], read(0, 3)[1]
    assert g2["rollbacks"] == [] and g2["lr_scale"] == 1.0 and g2["best_iteration"] == 1   # rank 0 kept
    assert g3["lr_scale"] == 0.5 and [e["to_iteration"] for e in g3["rollbacks"]] == [1]   # rank 0 rolled back
    assert read(0, 3)[2] == [pytest.approx(0.5e-3, rel=1e-12)] * len(read(0, 3)[2])
    assert _bit_equal(read(1, 3)[0], read(0, 1)[0]), "rank 1 continues from rank 0's best state, bit for bit"
    run_dir = tmp_path / "out" / "pcpo" / "dist_guard"
    best = _read_tensors(run_dir / "best.safetensors")
    assert _bit_equal(best, read(0, 1)[0])              # written once, by rank 0, at iteration 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.safetensors", "checkpoint.safetensors",
                                                          "guard.json", "metrics.jsonl"]
    assert json.loads((run_dir / "guard.json").read_text()) == g3
    assert sorted(p.name for p in (tmp_path / "loras" / "pcpo_test").iterdir()) == [
        "dist_guard.safetensors", "dist_guard_best.safetensors"]
