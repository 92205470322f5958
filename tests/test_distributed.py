"""Several processes on torch.distributed (gloo on CPU, 2 processes under torchrun, one thread each).

* rank-disjoint groups and the timestep-draw bookkeeping (comfyui_pcpo/distributed.py);
* 2 ranks x 1 group per iteration give the same run after 2 iterations (LoRA, optimizer state,
  timestep generator, stats) as 1 process x 2 groups with the same prompts and seeds, with
  train_fraction < 1 and two micro-batches per group so the timestep draws matter; only rank 0
  writes the checkpoint and the export;
* the 2-rank checkpoint resumes in 1 process and continues exactly as the 1-process run does;
* a rank that raises ends the job with that error, on every rank, well within the timeout.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from test_runner import (REPO_ROOT, RUN_TIMEOUT_S, checkpoint, node_of, run_runner, runner_args, runner_env,
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
