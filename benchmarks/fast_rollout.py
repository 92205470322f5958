"""Faster iterations and other objectives at equal compute: seconds per iteration, and the evaluation
reward reached in equal compute time, for the full SDE rollout against windowed rollouts (PCPO SDE
Window node) and against the objectives that learn from final images only (awm, nft).

Regimes (``--regime``, both by default): ``demo`` (the demo diffusion model, 10 steps, ``simple``,
eta 1, the PCPO arms on the uw-sigma rollout) and ``flow`` (the demo flow model, shift 3, 16 steps,
the ``constant`` rule, level 0.3).  The demo's training set-up: 4 prompts x 8 samples, rank-8 LoRA on
attention + MLP, AdamW at ``--lr``, 2 optimizer steps per rollout, objective ``pcpo``,
``prompt-colour-agreement``.  Arms (every arm samples the same grid, the same number of steps):

* ``full``:      every step stochastic, recorded, trained (train_fraction 1: the LoRA Update's default);
* ``full-half``: every step stochastic and recorded, train_fraction 0.5 (the demo workflow's);
* ``wK-SOLVER``: a K-step SDE window sliding one step every ``--slide-every`` iterations, ComfyUI's
  deterministic SOLVER outside it, every window step trained (``--windows``, default
  w2-euler, w3-euler, w3-dpmpp_2m);
* ``grpo-clip``: the full rollout (train fraction 1) with the clipped-ratio baseline objective;
* ``awm-SOLVER``, ``nft-SOLVER``: Advantage Weighted Matching / DiffusionNFT, the rollout sampled by
  ComfyUI's SOLVER (a SAMPLER wired into the Trajectory Sampler, final latents only), re-noised at
  every grid level (train fraction 1), the papers' uniform time weighting (``--objectives`` adds these
  and grpo-clip; default none).

Every arm is compared with ``full`` (pcpo); the windows also with ``full-half``, and awm / nft also
with ``grpo-clip``.

Compute is measured as the CPU time of the job's process (one torch thread per process), so jobs
running side by side in ``--workers`` processes do not distort each other's clock.  Each job trains
until its compute reaches ``--budget-s`` and is evaluated (the collapse benchmark's evaluator: fixed
noise, native stochastic sampler, the same captions for every arm; reward, domain FD, diversity) at
compute 0, budget/3, 2 budget/3 and the budget, so every arm is compared at equal compute.  Per seed
the arms share the LoRA initialisation, the prompt sequence and the rollout seeds (paired).

(regime, arm, seed) jobs are written into the JSON as they finish (atomically): a killed run resumes
by skipping finished jobs; more ``--seeds``, or more arms (``--windows``, ``--objectives``), extend it.

    python benchmarks/fast_rollout.py --seeds 4 --workers 2 --json benchmarks/fast_rollout.json
    python benchmarks/fast_rollout.py --report benchmarks/fast_rollout.json
    python benchmarks/fast_rollout.py --smoke --json /tmp/fast_rollout.json      # seconds
    python benchmarks/fast_rollout.py --seeds 3 --workers 2 --budget-s 180 --lr 4e-3 --base-arms full \
        --windows "" --objectives grpo-clip,awm-euler,nft-euler --json benchmarks/objectives_ab.json

The report per regime: seconds per iteration (rollout, update, total) per arm and its ratio to
``full`` measured in the same run; the evaluation reward at each compute checkpoint; the change from
the base model (the reward must move first); and the windowed arms minus ``full`` (and minus
``full-half``) at equal compute, paired by seed, with 95% bootstrap CIs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _smoke  # noqa: E402
from convergence import bootstrap_ci, fmt_ci, paired_difference, resume, stop_time  # noqa: E402

REGIMES = {  # regime -> model, steps, scheduler, eta / level, flow rule
    "demo": ("demo", 10, "simple", 1.0, None),
    "flow": ("flow", 16, "simple", 0.3, "constant"),
}
CONFIG_KEYS = ("regimes", "lr", "prompts_per_iteration", "group_size", "updates", "budget_s", "slide_every",
               "arms", "eval_captions", "eval_samples", "true_per_caption", "eval_seed")
CFG = 4.0
CHECKPOINTS = (1 / 3, 2 / 3, 1.0)


FORWARD = ("awm", "nft")  # objectives trained on re-noised final images, sampled by a ComfyUI sampler
BASES = {"full": None, "full-half": "w", "grpo-clip": FORWARD}  # base arm -> the arms compared with it


def parse_arm(arm: str) -> dict:
    """The arm's objective, SDE window size (0: none), ComfyUI solver (outside the window, or the whole
    rollout of a forward-process objective) and train fraction."""
    if arm in ("full", "full-half", "grpo-clip"):
        return {"objective": "grpo-clip" if arm == "grpo-clip" else "pcpo", "window": 0, "solver": None,
                "fraction": 0.5 if arm == "full-half" else 1.0}
    head, solver = arm.split("-", 1)
    if head in FORWARD:
        return {"objective": head, "window": 0, "solver": solver, "fraction": 1.0}
    if not (head[:1] == "w" and head[1:].isdigit()):
        raise SystemExit(f"arm {arm!r}: use full, full-half, grpo-clip, wK-SOLVER, awm-SOLVER or nft-SOLVER")
    return {"objective": "pcpo", "window": int(head[1:]), "solver": solver, "fraction": 1.0}


def compared_with(base: str, arm: str) -> bool:
    """Whether ``arm`` is compared with the base arm ``base`` in the report."""
    if arm == base or arm in ("full", "full-half"):
        return False
    kinds = BASES[base]
    return kinds is None or arm.startswith(kinds)


def regime_cfg(regime: str, cfg: dict) -> dict:
    model, steps, scheduler, level, rule = REGIMES[regime]
    steps = cfg.get("steps_override") or steps
    return dict(cfg, regime=regime, model=model, steps=steps, scheduler=scheduler, level=level, rule=rule)


_HOST, _MODELS, _EVALS = [None], {}, {}


def _worker_init(threads: int, cfg: dict):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def _host(regime: str, cfg: dict):
    """The worker's one ComfyUI host, pointed at the regime's model (the demo diffusion model or the
    demo flow model, each loaded once), and the regime's evaluator."""
    from _common import Host
    from collapse import Evaluator
    if _HOST[0] is None:
        _HOST[0] = Host(1)
        _MODELS["demo"] = (_HOST[0].model, _HOST[0].clip, _HOST[0].vae)
    host = _HOST[0]
    model = REGIMES[regime][0]
    if model not in _MODELS:
        _MODELS[model] = host.pack["demo"].load_demo_flow()
    host.model, host.clip, host.vae = _MODELS[model]
    if regime not in _EVALS:
        _EVALS[regime] = Evaluator(host, regime_cfg(regime, cfg))
    return host, _EVALS[regime]


def rollout(host, sess, prompts, rc, seed, window, sampler):
    node = host.N["PCPOTrajectorySampler"]()
    variant = "uw-sigma" if rc["model"] == "demo" else "native"
    import torch
    with torch.inference_mode():
        return node.sample(sess, rc["steps"], CFG, rc["group_size"], seed, rc["level"], variant,
                           rc["rule"] or "constant", rc["scheduler"], 32, 32, 1, prompts=prompts, sde_window=window,
                           sampler=sampler)


def run_job(job):
    key, cfg, stop_at = job
    if stop_at and time.time() > stop_at:
        return key, None
    regime, arm, seed = key.split("/")
    seed = int(seed)
    rc = regime_cfg(regime, cfg)
    host, evaluate = _host(regime, cfg)
    a = parse_arm(arm)
    window = sampler = None
    if a["window"]:
        window = host.N["PCPOSDEWindow"]().window(a["window"], "sliding", 0, cfg["slide_every"], a["solver"])[0]
    elif a["solver"]:
        import nodes
        sampler = nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"]().get_sampler(a["solver"])[0]
    sess = host.session(f"fast_{regime}_{arm}_{seed}", cfg["lr"], seed=seed)
    prompts = host.prompts(cfg["prompts_per_iteration"], seed=seed)
    t_wall = time.time()
    evals = [dict(evaluate(sess), iteration=0, compute_s=0.0)]
    compute, its, marks = 0.0, [], [c * cfg["budget_s"] for c in CHECKPOINTS]
    while marks:
        c0 = time.process_time()
        lat, batch = rollout(host, sess, prompts, rc, seed, window, sampler)
        c1 = time.process_time()
        st = host.update(sess, batch, host.score(lat, batch), objective=a["objective"], train_fraction=a["fraction"],
                         micro_batch=rc["group_size"], updates=cfg["updates"])
        c2 = time.process_time()
        compute += c2 - c0
        its.append({"rollout_s": c1 - c0, "update_s": c2 - c1, "reward_mean": st["reward_mean"],
                    "pairs": st["pairs"], "first_update_log_ratio": st["first_update_log_ratio"],
                    "window": batch.traj.meta.get("sde_window")})
        while marks and compute >= marks[0]:
            marks.pop(0)
            evals.append(dict(evaluate(sess), iteration=len(its), compute_s=compute))
    return key, {"regime": regime, "arm": arm, "seed": seed, "iterations": its, "evals": evals,
                 "compute_s": compute, "wall_s": time.time() - t_wall}


# ----------------------------------------------------------------------------- the report (no ComfyUI)

def per_iteration(job) -> dict:
    its = job["iterations"]
    return {k: statistics.fmean(i[k] for i in its) for k in ("rollout_s", "update_s")} | {
        "total_s": statistics.fmean(i["rollout_s"] + i["update_s"] for i in its)}


def analyse(data) -> dict:
    cfg = data["config"]
    out = {}
    for regime in cfg["regimes"]:
        jobs = {(v["arm"], v["seed"]): v for v in data["jobs"].values() if v.get("regime") == regime}
        if not jobs:
            continue
        arms = [a for a in cfg["arms"] if any(k[0] == a for k in jobs)]
        seeds = {a: sorted(s for (b, s) in jobs if b == a) for a in arms}
        r = {"arms": {}, "pairs": {}}
        for a in arms:
            row = {}
            cost = {s: per_iteration(jobs[a, s]) for s in seeds[a]}
            for k in ("rollout_s", "update_s", "total_s"):
                row[k] = bootstrap_ci([c[k] for c in cost.values()]) + (len(cost),)
            row["iterations"] = bootstrap_ci([len(jobs[a, s]["iterations"]) for s in seeds[a]]) + (len(seeds[a]),)
            row["pairs"] = jobs[a, seeds[a][0]]["iterations"][0]["pairs"]
            for i, c in enumerate(CHECKPOINTS):
                row[f"reward@{c:.2f}"] = bootstrap_ci([jobs[a, s]["evals"][i + 1]["reward"] for s in seeds[a]]) + (
                    len(seeds[a]),)
            row["reward change"] = bootstrap_ci([jobs[a, s]["evals"][-1]["reward"] - jobs[a, s]["evals"][0]["reward"]
                                                 for s in seeds[a]]) + (len(seeds[a]),)
            for m in ("fd", "diversity"):
                row[f"final {m}"] = bootstrap_ci([jobs[a, s]["evals"][-1][m] for s in seeds[a]]) + (len(seeds[a]),)
            row["max first-update |log ratio|"] = max(i["first_update_log_ratio"] for s in seeds[a]
                                                      for i in jobs[a, s]["iterations"])
            r["arms"][a] = row
        for base in BASES:
            if base not in arms:
                continue
            for a in arms:
                if not compared_with(base, a):
                    continue
                common = sorted(set(seeds[a]) & set(seeds[base]))
                if not common:
                    continue
                ratio = bootstrap_ci([per_iteration(jobs[base, s])["total_s"] / per_iteration(jobs[a, s])["total_s"]
                                      for s in common]) + (len(common),)
                res = {"speed-up per iteration": ratio}
                for i, c in enumerate(CHECKPOINTS):
                    res[f"reward at {c:.2f} budget"] = paired_difference(
                        {s: jobs[a, s]["evals"][i + 1]["reward"] for s in common},
                        {s: jobs[base, s]["evals"][i + 1]["reward"] for s in common})
                for m in ("fd", "diversity"):
                    res[f"final {m}"] = paired_difference({s: jobs[a, s]["evals"][-1][m] for s in common},
                                                          {s: jobs[base, s]["evals"][-1][m] for s in common})
                r["pairs"][f"{a} vs {base}"] = res
        out[regime] = r
    return out


def _verdict(name, m, lo, hi, n):
    if n < 3:
        return f"not resolved ({n} seeds)"
    if name.startswith("speed-up"):
        return "resolved" if lo > 1 or hi < 1 else "not resolved"
    if name.startswith("reward"):  # the window's target: no lower reward at equal compute
        return "higher (CI excludes 0)" if lo > 0 else ("lower (CI excludes 0)" if hi < 0 else "not resolved")
    return "resolved" if lo > 0 or hi < 0 else "not resolved"


def report(data) -> dict:
    cfg = data["config"]
    res = analyse(data)
    print(f"\nSDE window benchmark: {cfg['prompts_per_iteration']} prompts x {cfg['group_size']} samples, lr {cfg['lr']:g}, "
          f"{cfg['updates']} updates per rollout, compute budget {cfg['budget_s']:g} s per job "
          f"(CPU time of one thread), sliding window every {cfg['slide_every']} iterations; evaluation on "
          f"{cfg['eval_captions']} captions x {cfg['eval_samples']} samples (fixed noise); wall {data.get('wall_s', 0) / 60:.1f} min")
    for regime, r in res.items():
        rc = regime_cfg(regime, cfg)
        print(f"\nregime {regime}: {rc['model']} model, {rc['steps']} steps, {rc['scheduler']}, "
              f"{'rule ' + rc['rule'] + ' ' if rc['rule'] else 'eta '}{rc['level']:g}")
        names = ["rollout_s", "update_s", "total_s", "iterations"] + [f"reward@{c:.2f}" for c in CHECKPOINTS] + [
            "reward change", "final fd", "final diversity"]
        print("| arm | trained pairs / iteration | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for a, row in r["arms"].items():
            cells = [f"{fmt_ci(*row[n][:3], digits=2 if n.endswith('_s') or n == 'iterations' else 3)} ({row[n][3]})"
                     for n in names]
            print(f"| {a} | {row['pairs']} | " + " | ".join(cells) + " |")
        print("\n| comparison | metric | value [95% CI] (seeds) | verdict |")
        print("|---|---|---|---|")
        for pair, rr in r["pairs"].items():
            for m, (mean, lo, hi, n) in rr.items():
                print(f"| {pair} | {m} | {fmt_ci(mean, lo, hi, 2 if m.startswith('speed') else 3)} ({n}) | "
                      f"{_verdict(m, mean, lo, hi, n)} |")
        worst = max(row["max first-update |log ratio|"] for row in r["arms"].values())
        print(f"\nlargest first-update |log ratio| of any iteration: {worst:g} (0 = every update started on-policy)")
    return res


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", default="demo,flow")
    ap.add_argument("--windows", default="w2-euler,w3-euler,w3-dpmpp_2m")
    ap.add_argument("--objectives", default="", help="other arms, e.g. grpo-clip,awm-euler,nft-euler")
    ap.add_argument("--base-arms", default="full,full-half", help="the full-rollout pcpo arms to run")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--slide-every", type=int, default=2)
    ap.add_argument("--prompts-per-iteration", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--eval-captions", type=int, default=12)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--true-per-caption", type=int, default=32)
    ap.add_argument("--eval-seed", type=int, default=4321)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--stop-at", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--report", default="")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return 0
    steps_override = 0
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.seeds, args.budget_s, args.workers, args.windows = 1, 0.5, 1, "w2-euler,w2-dpmpp_2m"
        args.objectives = "grpo-clip,awm-euler,nft-dpmpp_2m"
        args.prompts_per_iteration, args.group_size, args.eval_captions, args.eval_samples = 1, 2, 2, 2
        args.true_per_caption, steps_override = 4, 4
    arms = [a for a in (args.base_arms + "," + args.windows + "," + args.objectives).split(",") if a]
    for a in arms:
        parse_arm(a)
    cfg = {"regimes": args.regime.split(","), "lr": args.lr, "prompts_per_iteration": args.prompts_per_iteration,
           "group_size": args.group_size, "updates": args.updates, "budget_s": args.budget_s,
           "slide_every": args.slide_every, "arms": arms, "eval_captions": args.eval_captions,
           "eval_samples": args.eval_samples, "true_per_caption": args.true_per_caption, "eval_seed": args.eval_seed,
           "seeds": args.seeds, "steps_override": steps_override}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
        resume(data, cfg, CONFIG_KEYS, args.json, args.seeds, extendable=("arms",))
    else:
        data = {"config": cfg, "jobs": {}, "wall_s": 0.0}
    keys = [f"{r}/{a}/{s}" for s in range(args.seeds) for r in cfg["regimes"] for a in arms]
    todo = [k for k in keys if k not in data["jobs"]]
    print(f"{len(todo)} jobs to run on {args.workers} worker process(es)", flush=True)
    t0, wall0, stop_at = time.time(), data.get("wall_s", 0.0), stop_time(args.stop_at)

    def record(key, res):
        if res is None:
            print(f"{key:28s} not started: past --stop-at", flush=True)
            return
        data["jobs"][key] = res
        data["wall_s"] = wall0 + time.time() - t0
        if args.json:
            _smoke.save_atomic(args.json, data)
        c = per_iteration(res)
        print(f"{key:28s} done: {len(res['iterations'])} iterations, {c['total_s']:.2f} s/it (rollout "
              f"{c['rollout_s']:.2f}, update {c['update_s']:.2f}); reward {res['evals'][0]['reward']:.3f} -> "
              f"{res['evals'][-1]['reward']:.3f} ({len(data['jobs'])}/{len(keys)} jobs, {time.time() - t0:.0f} s)",
              flush=True)
    if todo and args.workers <= 1:
        _worker_init(1, cfg)
        for key in todo:
            record(*run_job((key, cfg, stop_at)))
    elif todo:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_worker_init, initargs=(1, cfg)) as pool:
            for key, res in pool.imap_unordered(run_job, [(k, cfg, stop_at) for k in todo]):
                record(key, res)
    if args.json:
        _smoke.save_atomic(args.json, data)
    report(data)
    if args.smoke:
        return _smoke.finish(args.json, data, {f"{k} {m}": [e[m] for e in j["evals"]] for k, j in data["jobs"].items()
                                               for m in ("reward", "fd", "diversity")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
