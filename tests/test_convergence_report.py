"""The statistics of benchmarks/convergence.py (no ComfyUI): running mean, iterations to target,
seed-bootstrap CIs, the paired difference and its verdict, and the paper-regime report on a
synthetic saved run, against hand-computed values."""
from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location("convergence_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_running_mean_window_three(conv):
    assert conv.smoothed([0.0, 3.0, 6.0, 9.0]) == [0.0, 1.5, 3.0, 6.0]


def test_iterations_to_target(conv):
    # running means 0.5, 0.75, 0.8333, 1.0: 0.75 is first reached at iteration 2, 0.8 at 3
    r = [0.5, 1.0, 1.0, 1.0]
    assert conv.iterations_to(r, 0.75) == 2
    assert conv.iterations_to(r, 0.8) == 3
    assert conv.iterations_to(r, 0.5) == 1
    assert conv.iterations_to(r, 1.01) == 5  # never: budget + 1
    # a single high iteration does not count until the running mean gets there
    assert conv.iterations_to([0.0, 0.0, 1.0, 0.0], 0.5) == 5


def test_bootstrap_ci_constant_and_two_values(conv):
    assert conv.bootstrap_ci([0.3] * 5) == pytest.approx((0.3, 0.3, 0.3))
    # two seeds: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    m, lo, hi = conv.bootstrap_ci([0.0, 1.0])
    assert (m, lo, hi) == (0.5, 0.0, 1.0)


def test_bootstrap_ci_binomial_case(conv):
    # values 0,0,0,1: a resample's mean is k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.316 > 2.5 %, and
    # P(k <= 2) = 0.949 < 97.5 % <= P(k <= 3) = 0.996, so the 95 % CI is [0, 0.75]
    m, lo, hi = conv.bootstrap_ci([0.0, 0.0, 0.0, 1.0])
    assert m == 0.25
    assert lo == 0.0
    assert hi == 0.75


def test_bootstrap_ci_is_reproducible_and_narrows_with_seeds(conv):
    vals = [0.1, 0.4, 0.2, 0.5, 0.3]
    assert conv.bootstrap_ci(vals) == conv.bootstrap_ci(vals)
    m, lo, hi = conv.bootstrap_ci(vals)
    assert m == pytest.approx(0.3)
    assert 0.1 < lo < 0.3 < hi < 0.5
    m2, lo2, hi2 = conv.bootstrap_ci(vals * 4)  # the same spread over 4x the seeds: about half as wide
    assert m2 == pytest.approx(0.3)
    assert (hi2 - lo2) < 0.7 * (hi - lo)


def test_paired_difference_uses_common_seeds(conv):
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    b = {0: 0.5, 1: 1.5, 2: 2.5, 3: 9.0}  # seed 3 has no partner
    m, lo, hi, n = conv.paired_difference(a, b)
    assert n == 3
    assert (m, lo, hi) == pytest.approx((0.5, 0.5, 0.5))
    # pairing removes the between-seed spread: unpaired, the means' CIs overlap; paired, the CI excludes 0
    a = {s: float(s) + 0.1 for s in range(6)}
    b = {s: float(s) for s in range(6)}
    _, lo_a, hi_a = conv.bootstrap_ci(list(a.values()))
    _, lo_b, hi_b = conv.bootstrap_ci(list(b.values()))
    assert lo_a < hi_b
    m, lo, hi, _ = conv.paired_difference(a, b)
    assert conv.verdict(lo, hi) == "resolved"


def test_verdict(conv):
    assert conv.verdict(0.1, 0.2) == "resolved"
    assert conv.verdict(-0.2, -0.1) == "resolved"
    assert conv.verdict(-0.1, 0.2) == "not resolved at this budget"
    assert conv.verdict(0.0, 0.2) == "not resolved at this budget"  # 0 on the boundary is inside
    assert conv.verdict(float("nan"), float("nan")) == "not resolved at this budget"


def test_per_step_mean_and_bins(conv):
    rows = [[None, 0.5, 0.0], [1.0, float("nan"), 1.0]]
    assert conv.per_step_mean(rows) == [1.0, 0.5, 0.5]
    b = conv.binned([1.0, 2.0, 3.0, 4.0, float("nan")], 2)
    assert b[:2] == [1.5, 3.5] and math.isnan(b[2])


def _synthetic_run(conv, seeds=5):
    cfg = {"steps": 4, "eta": 1.0, "cfg": 4.0, "scheduler": "simple", "lr": 1e-3, "prompts_per_iteration": 1,
           "group_size": 8, "iterations": 5, "train_fraction": 0.5, "updates": 2, "heldout_prompts": 2,
           "heldout_samples": 1, "heldout_seed": 1, "arms": ["pcpo-uw-sigma", "grpo-clip"], "seeds": seeds}
    jobs = {"base": {"heldout_reward": 0.5, "heldout_kl": 0.0, "wall_s": 1.0}}
    for s in range(seeds):
        # running means: pcpo 0.5, 0.75, ... reaches 0.75 at iteration 2; grpo-clip 0.5, 0.5, 0.667, 0.833
        # at iteration 4 (every seed)
        for arm, rewards, held in (("pcpo-uw-sigma", [0.5, 1.0, 1.0, 1.0, 1.0], 0.6 + 0.01 * s),
                                   ("grpo-clip", [0.5, 0.5, 1.0, 1.0, 0.75], 0.6 + 0.01 * s + (0.02 if s % 2 else -0.02))):
            clip = [0.1, 0.1, 0.1, None] if arm.startswith("pcpo") else [0.0, 0.1, 0.5, None]
            jobs[f"{arm}/{s}"] = {"arm": arm, "seed": s, "rewards": rewards, "heldout_reward": held, "wall_s": 2.0,
                                  "iterations": [{"clip_fraction_per_step": clip} for _ in rewards]}
    spread = [{"scheduler": "simple", "min": 0.5, "max": 1.5, "ratio": 3.0, "w_bar": 0.6, "note": ""}]
    return {"config": cfg, "spread": spread, "spread_choice": "simple", "trained_steps": {"kept": 2, "candidates": 3},
            "jobs": jobs, "wall_s": 60.0}


def test_report_verdicts_on_a_synthetic_run(conv, capsys):
    conv.report_paper(_synthetic_run(conv), [0.75])
    out = capsys.readouterr().out
    lines = {ln.split("|")[2].strip(): ln for ln in out.splitlines() if ln.startswith("| pcpo-uw-sigma - grpo-clip")}
    # 2 vs 4 iterations in every seed: difference -2 exactly, 50 % fewer, resolved
    assert "-2.0 [-2.0, -2.0] (50% fewer)" in lines["iterations to 0.75"]
    assert lines["iterations to 0.75"].rstrip().endswith("| resolved |")
    # final reward (mean of the last 3): 1.0 vs 0.9167 in every seed
    assert "0.083 [0.083, 0.083]" in lines["final reward"]
    # held-out: differences +0.02 / -0.02 alternate: the CI contains 0
    assert lines["held-out reward"].rstrip().endswith("| not resolved at this budget |")
    # clip fraction: pcpo flat 0.1 (std 0), grpo-clip 0, 0.1, 0.5 (mean 0.2, std 0.216)
    # (4 steps: one bin of 5)
    assert "| grpo-clip | 0.200 | 0.200 | 0.216 |" in out
    assert "| pcpo-uw-sigma | 0.100 | 0.100 | 0.000 |" in out
    assert "pcpo-uw-sigma - grpo-clip, std across steps: -0.216 [-0.216, -0.216] (5 seeds): resolved" in out
