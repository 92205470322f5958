"""Every benchmark script (gpu_check.py has its own test) runs its smoke mode end to end: the same code
path on the smallest configuration, its JSON written where the test says, checked here."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def smoke(script, tmp_path, *args, timeout=300):
    """Run ``benchmarks/<script> --smoke --json <tmp>`` (its scratch folders in ``tmp_path`` too); returns
    (the JSON written, the completed process)."""
    out = tmp_path / f"{pathlib.Path(script).stem}.json"
    p = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--json", str(out), *args],
                       capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(tmp_path)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "results OK" in p.stdout
    return json.loads(out.read_text()), p


def bench_module(script: str):
    """``benchmarks/<script>`` imported as a module (its statistics and report code need no ComfyUI)."""
    spec = importlib.util.spec_from_file_location(f"bench_{pathlib.Path(script).stem}", BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_overhead_smoke_times_both_comparisons_and_runs_the_update_every_repeat(tmp_path):
    data, _ = smoke("overhead.py", tmp_path)
    assert [r["comparison"] for r in data["rows"]] == ["PCPO update vs bare fwd+bwd",
                                                       "Trajectory Sampler vs euler_ancestral"]
    for r in data["rows"]:
        assert finite(r["ours_s"], r["baseline_s"]) and r["ours_s"] > 0 and r["baseline_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_s"] / r["baseline_s"])
    # warm-up + 1 repeat, each a committed iteration of the run on the one re-used rollout
    assert len(data["updates"]) == 2 and data["run_history"] == 2
    for st in data["updates"]:
        assert finite(st["reward_mean"], st["grad_norm"], st["approx_kl"]) and st["grad_norm"] > 0
        assert st["pairs"] == data["config"]["group_size"] * data["config"]["trained_steps_per_sample"]


def test_scaling_smoke_runs_one_and_two_processes_and_the_probe(tmp_path):
    data, _ = smoke("scaling.py", tmp_path)
    one, two = data["runs"]
    assert (one["processes"], one["groups_per_process"]) == (1, 2)
    assert (two["processes"], two["groups_per_process"]) == (2, 1)
    for r in data["runs"]:
        assert r["iterations_timed"] == 1 and len(r["reward_means"]) == 2 and finite(*r["reward_means"])
        assert finite(r["samples_per_second"], r["seconds_per_iteration"]) and r["samples_per_second"] > 0
        assert len(r["cpu_seconds_per_iteration"]) == r["processes"]
    assert 0 <= two["collective_share"] < 1 and one["collective_share"] == 0
    assert data["allreduce"]["numel"] > 0 and finite(data["allreduce"]["median_s"])


def test_memory_smoke_measures_each_configuration_in_its_own_process(tmp_path):
    data, _ = smoke("memory.py", tmp_path)
    assert [(r["family"], r["mode"], r["checkpointing"]) for r in data] == [
        ("sd15", "bare", False), ("sdxl", "ours", True)]
    for r in data:
        assert r["tiny"] and r["pixels"] == 64 and r["passes"] == (1 if r["mode"] == "bare" else 2)
        assert finite(r["weights_gb"], r["peak_above_baseline_gb"], r["seconds"])
        assert r["weights_gb"] > 0 and r["peak_above_baseline_gb"] >= 0 and r["baseline_rss_gb"] > 0


def test_precision_smoke_error_study_and_training_runs(tmp_path):
    data, _ = smoke("precision.py", tmp_path)
    (name, err), = data["errors"].items()
    assert name == "3 steps, eta 1, uw-sigma" and err["pairs"] > 0
    assert set(err["dtypes"]) == {"float32", "bf16", "fp16"}
    forms = err["dtypes"]["float32"]["forms"]
    assert set(forms) == {"analytic-f32", "analytic-wd", "difference", "difference-f32", "difference-wd"}
    assert forms["analytic-f32"]["median_abs_error"] < 1e-6  # float32 against float64: rounding only
    assert set(data["training"]) == {f"{p}/{f}" for p in ("fp32", "bf16", "fp16") for f in ("analytic", "difference")}
    for key, seeds in data["training"].items():
        r = seeds["0"]
        assert len(r["reward"]) == 1 and finite(*r["reward"], *r["log_approx_error"]) and r["non_finite"] == 0
    assert data["training"]["fp32/analytic"]["0"]["weight_rel_distance"] == [0.0]  # its own reference
    assert not any(p.name.endswith(".weights.pt") for p in tmp_path.iterdir())


@pytest.mark.parametrize("regime", ["ten", "paper"])
def test_convergence_smoke_both_regimes(tmp_path, regime):
    data, _ = smoke("convergence.py", tmp_path, "--regime", regime)
    if regime == "ten":
        assert set(data["results"]) == {"pcpo", "grpo-clip", "ddpo"}
        for runs in data["results"].values():
            assert len(runs) == 1 and len(runs[0]["rewards"]) == 1 and finite(*runs[0]["rewards"])
        return
    assert set(data["jobs"]) == {"base", "pcpo-uw-sigma/0", "pcpo-uw-lambda/0", "grpo-clip/0", "ddpo/0"}
    assert data["config"]["steps"] == 5 and data["trained_steps"]["kept"] >= 1
    for key, job in data["jobs"].items():
        assert finite(job["heldout_reward"], job["heldout_kl"]) and 0 <= job["heldout_reward"] <= 1
        if key != "base":
            assert len(job["rewards"]) == 1 and finite(*job["rewards"])
            assert all(finite(job["iterations"][0][k]) for k in ("grad_norm", "approx_kl", "clip_fraction"))


def test_convergence_flow_smoke_both_rules_every_arm(tmp_path):
    data, _ = smoke("convergence_flow.py", tmp_path)
    assert set(data["jobs"]) == {f"{r}/{k}" for r in ("constant", "flow-grpo")
                                 for k in ("base", "pcpo/0", "grpo-clip/0", "ddpo/0")}
    for key, job in data["jobs"].items():
        assert finite(job["heldout_reward"], job["heldout_kl"])
        if not key.endswith("/base"):
            assert len(job["rewards"]) == 1 and finite(*job["rewards"], job["iterations"][0]["grad_norm"])


@pytest.mark.parametrize("script,args", [("overhead.py", ["--json", str(BENCH / "overhead.json")]),
                                         ("memory.py", []),
                                         ("memory.py", ["--json", str(BENCH / "memory.json")]),
                                         ("precision.py", ["--json", str(BENCH / "precision.json")])])
def test_smoke_refuses_to_write_into_benchmarks(script, args):
    before = {p.name: p.read_bytes() for p in BENCH.glob("*.json")}
    p = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "smoke" in p.stderr and "benchmarks/" in p.stderr
    assert {q.name: q.read_bytes() for q in BENCH.glob("*.json")} == before


def test_non_finite_result_is_a_failure(tmp_path):
    mod = bench_module("_smoke.py")
    assert mod.non_finite({"a": 1.0, "b": [0.5, float("nan")], "c": None, "d": [2, 3]}) == ["b=nan", "c=None"]
    out = tmp_path / "r.json"
    assert mod.finish(str(out), {"x": 1}, {"ok": 1.0, "loss": float("inf")}) == 1
    assert json.loads(out.read_text()) == {"x": 1}
    assert mod.finish(str(out), {"x": 2}, {"ok": 1.0}) == 0


def test_variance_smoke_records_each_arms_gradient_of_one_unmoved_model_state(tmp_path):
    data, p = smoke("variance.py", tmp_path)
    assert set(data["cells"]) == {"d50/base", "flow-constant/trained"}
    for key, cell in data["cells"].items():
        assert cell["lora_moved"] == 0.0, key  # the lr-0 optimizer: every gradient of the same model state
        assert cell["bin_sum_error"] < 1e-6, key  # the timestep bins' parts add up to the gradient
        arms = cell["arms"]
        n = data["config"]["groups"]
        for arm, a in arms.items():
            G = a["gram"]
            assert len(G) == len(a["groups"]) and all(len(r) == len(G) for r in G)
            assert all(G[i][i] > 0 for i in range(len(G))), (key, arm)  # the rewards differ within every group
            assert a["first_update_log_ratio"] < 1e-4  # the gradient pass replays the rollout (on-policy)
        full = {a for a, v in arms.items() if len(v["groups"]) == n}
        assert full == ({"pcpo-uw-sigma", "pcpo-uw-lambda", "grpo-clip"} if key.startswith("d50") else
                        {"pcpo", "grpo-clip"}), (key, full)
        # on the first update ddpo's gradient equals grpo-clip's (rho = 1): the same |g|^2 on the same groups
        k = len(arms["ddpo"]["groups"])
        assert 0 < k < n
        for i in range(k):
            assert arms["ddpo"]["gram"][i][i] == pytest.approx(arms["grpo-clip"]["gram"][i][i], rel=1e-6)
        if key.startswith("flow"):  # one rollout for both arms: pcpo's gradient is another weighting of it
            assert arms["pcpo"]["rewards"] == arms["grpo-clip"]["rewards"]
            assert arms["pcpo"]["gram"][0][0] != pytest.approx(arms["grpo-clip"]["gram"][0][0], rel=1e-3)
    assert "inverse SNR ratio" in p.stdout and "share of a group's gradient norm" in p.stdout


@pytest.mark.parametrize("regime", ["flow", "diffusion"])
def test_collapse_smoke_evaluates_every_arm_from_the_same_base_model(tmp_path, regime):
    data, p = smoke("collapse.py", tmp_path, "--regime", regime)
    assert data["config"]["model"] == ("flow" if regime == "flow" else "demo")
    jobs = data["jobs"]
    assert set(jobs) == {f"{a}/0" for a in ("pcpo", "grpo-clip", "pcpo@aggressive", "grpo-clip@aggressive")}
    cfg = data["config"]
    for key, j in jobs.items():
        assert [e["iteration"] for e in j["evals"]] == list(range(0, cfg["iterations"] + 1, cfg["eval_every"]))
        assert len(j["rewards"]) == cfg["iterations"]
        for e in j["evals"]:
            assert finite(e["reward"], e["fd"], e["diversity"]) and e["fd"] > 0 and e["diversity"] > 0
        assert j["lr"] == (cfg["aggressive_lr"] if key.endswith("@aggressive/0") else cfg["lr"])
    # iteration 0 is the base model with the evaluation's fixed noise: the same numbers for every arm
    base = {json.dumps(j["evals"][0]["fd"]) for j in jobs.values()}
    assert len(base) == 1
    # training moved the LoRA: the evaluations after it differ from the base model's
    assert all(j["evals"][-1]["fd"] != j["evals"][0]["fd"] for j in jobs.values())
    assert data["true_diversity"] > 0
    assert "difference PCPO - grpo-clip" in p.stdout


def test_collapse_run_extends_with_new_arms_and_refuses_another_configuration(tmp_path):
    """A run started with two arms resumes with the aggressive arms added: only the new jobs run, the
    finished ones are kept as they were; the same JSON with another learning rate is refused and left
    as it was."""
    out = tmp_path / "collapse_diffusion.json"
    tiny = ["--regime", "diffusion", "--seeds", "1", "--iterations", "1", "--eval-every", "1", "--steps", "4",
            "--prompts-per-iteration", "1", "--group-size", "2", "--eval-captions", "2", "--eval-samples", "2",
            "--true-per-caption", "4", "--json", str(out)]

    def run(*args):
        return subprocess.run([sys.executable, str(BENCH / "collapse.py"), *tiny, *args], capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)))

    p = run("--arms", "pcpo,grpo-clip")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first = json.loads(out.read_text())
    assert set(first["jobs"]) == {"pcpo/0", "grpo-clip/0"}
    p = run()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 jobs to run" in p.stdout
    data = json.loads(out.read_text())
    assert set(data["jobs"]) == {f"{a}/0" for a in ("pcpo", "grpo-clip", "pcpo@aggressive", "grpo-clip@aggressive")}
    for k in first["jobs"]:
        assert data["jobs"][k] == first["jobs"][k]
    p = run("--lr", "1e-3")
    assert p.returncode != 0 and "another configuration" in p.stderr
    assert json.loads(out.read_text()) == data


def test_fast_rollout_smoke_windows_train_their_steps_only_and_replay_exactly(tmp_path):
    """Both regimes, the full rollout (train fraction 1 and 0.5), two windowed arms, grpo-clip and the
    forward-process arms: a windowed iteration trains its 2 window steps per sample, every update
    starts on-policy, every arm is evaluated at compute 0 on the same base model, and each arm is
    compared with the baselines it is meant for."""
    data, p = smoke("fast_rollout.py", tmp_path)
    jobs = data["jobs"]
    assert {j["regime"] for j in jobs.values()} == {"demo", "flow"}
    for j in jobs.values():
        assert j["compute_s"] >= data["config"]["budget_s"] and len(j["evals"]) == 4
        for it in j["iterations"]:
            assert it["first_update_log_ratio"] == 0.0 and it["rollout_s"] > 0 and it["update_s"] > 0
            if j["arm"].startswith("w2"):
                assert it["pairs"] == 2 * 2 and it["window"]["size"] == 2  # 1 prompt x 2 samples x 2 steps
            else:
                assert it["window"] is None
    # 4 steps: the full rollout trains 3 steps per sample, train fraction 0.5 trains 2
    # grpo-clip trains the full rollout; awm / nft every sample at each of the 4 grid levels
    assert {j["arm"]: j["iterations"][0]["pairs"] for j in jobs.values() if j["regime"] == "flow"} == {
        "full": 6, "full-half": 4, "w2-euler": 4, "w2-dpmpp_2m": 4, "grpo-clip": 6, "awm-euler": 8,
        "nft-dpmpp_2m": 8}
    # the forward-process arms learn (each sample from its own noise: the rewards of a group differ)
    for j in jobs.values():
        if j["arm"][:3] in ("awm", "nft"):
            assert j["evals"][-1]["reward"] != j["evals"][0]["reward"], j["arm"]
    for regime in ("demo", "flow"):
        base = {j["evals"][0]["reward"] for j in jobs.values() if j["regime"] == regime}
        assert len(base) == 1
    assert "speed-up per iteration" in p.stdout
    for pair in ("w2-euler vs full-half", "awm-euler vs grpo-clip", "nft-dpmpp_2m vs full", "grpo-clip vs full"):
        assert f"| {pair} |" in p.stdout, pair
    assert "| w2-euler vs grpo-clip |" not in p.stdout and "| awm-euler vs full-half |" not in p.stdout


def test_variance_gram_of_a_large_cell_goes_beside_the_json_and_reads_back(tmp_path):
    """More than 128 groups: the Gram matrices go to the .gram.npz (upper triangle, float32) and come
    back symmetric and equal to float32 precision; the statistics computed from them agree; a small cell
    stays in the JSON."""
    var = bench_module("variance.py")
    rng = np.random.default_rng(0)
    M = rng.normal(size=(var.GRAM_IN_JSON + 3, 40)) + 0.3
    big, small = M @ M.T, M[:5] @ M[:5].T
    data = {"config": {}, "cells": {"flow-flowgrpo/base": {"arms": {"pcpo": {"groups": list(range(len(M))), "gram": big}}},
                                    "d10/base": {"arms": {"pcpo": {"groups": list(range(5)), "gram": small}}}}}
    path = str(tmp_path / "variance.json")
    var.save(path, data)
    on_disk = json.loads(pathlib.Path(path).read_text())
    assert on_disk["cells"]["flow-flowgrpo/base"]["arms"]["pcpo"]["gram"] is None
    assert on_disk["cells"]["flow-flowgrpo/base"]["arms"]["pcpo"]["gram_file"] == "variance.gram.npz"
    assert on_disk["cells"]["d10/base"]["arms"]["pcpo"]["gram"] == small.tolist()
    back = var.load(path)
    G = back["cells"]["flow-flowgrpo/base"]["arms"]["pcpo"]["gram"]
    assert np.array_equal(G, G.T)
    np.testing.assert_allclose(G, big, rtol=1e-6)
    np.testing.assert_allclose(var.gram_stats(G), var.gram_stats(big), rtol=1e-4)


def test_variance_gram_grows_one_row_at_a_time_and_matches_the_full_product(tmp_path):
    var = bench_module("variance.py")
    rng = np.random.default_rng(1)
    M = rng.normal(size=(7, 30)).astype(np.float32)
    for k, g in enumerate(M):
        np.save(tmp_path / f"pcpo_{k}.npy", g)
    for n in (3, 4, 7):  # the cell grows: earlier rows are kept, new ones read
        G = var.gram_of(str(tmp_path), "pcpo", list(range(n)))
        M64 = M[:n].astype(np.float64)
        np.testing.assert_allclose(G, M64 @ M64.T, rtol=1e-12)
    # another set of groups (not an extension of the one held) is read afresh
    G = var.gram_of(str(tmp_path), "pcpo", [2, 5])
    np.testing.assert_allclose(G, M[[2, 5]].astype(np.float64) @ M[[2, 5]].astype(np.float64).T, rtol=1e-12)


def test_collapse_iterations_to_target_when_the_baseline_gains_nothing():
    """The target is half the smaller gain when both arms gain, half the other arm's gain when one gains
    nothing on average; a run that never reaches it counts as the budget + one evaluation interval."""
    col = bench_module("collapse.py")

    def job(arm, seed, rewards):
        evals = [{"iteration": 5 * i, "reward": r, "fd": 1.0, "diversity": 0.5, "wall_s": 10.0 * i}
                 for i, r in enumerate(rewards)]
        return {"arm": arm, "seed": seed, "evals": evals, "train_s": 10.0 * (len(rewards) - 1)}

    def pairs(pcpo, base_arm):
        jobs = {}
        for s in range(3):
            jobs[f"pcpo/{s}"] = job("pcpo", s, pcpo)
            jobs[f"grpo-clip/{s}"] = job("grpo-clip", s, base_arm)
        return col.analyse({"config": {"iterations": 10, "eval_every": 5}, "jobs": jobs})

    # PCPO gains 0.2, the baseline loses: target 0.5 + 0.1; PCPO reaches it at 5, the baseline never (15)
    res = pairs([0.5, 0.6, 0.7], [0.5, 0.45, 0.4])
    assert res["targets"]["pcpo"] == pytest.approx(0.6)
    mean, lo, hi, n = res["pairs"]["pcpo - grpo-clip"]["iterations to 0.600"]
    assert (mean, n) == (5 - 15, 3)
    # both gain: half the smaller gain (0.1 -> target 0.55), reached at 5 and at 10
    res = pairs([0.5, 0.6, 0.7], [0.5, 0.52, 0.6])
    assert res["targets"]["pcpo"] == pytest.approx(0.55)
    assert res["pairs"]["pcpo - grpo-clip"]["iterations to 0.550"][0] == 5 - 10
