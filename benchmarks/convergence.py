"""PCPO vs the DanceGRPO-style clipped-ratio baseline (and DDPO) on the embedded demo model.

Same prompts, seeds, learning rate, batch and budget for every objective; several seeds.  Two regimes:

``--regime paper`` (the paper's regime: 50 steps, eta 1).  First prints, for the demo model's
schedule at 50 steps and eta 1, the spread of the native per-step weights (min, max, max/min over
the stochastic steps) of every ComfyUI scheduler and picks the one whose weights spread most
(schedulers with a zero or infinite weight on a stochastic step are excluded: no finite ratio).
Arms: ``pcpo-uw-sigma`` and ``pcpo-uw-lambda`` (the PCPO objective with the respective rollout),
``grpo-clip`` and ``ddpo`` (native DDIM rollout); every arm trains the same number of timesteps per
sample (the same train fraction of the same candidate steps, checked and printed).  (arm, seed)
jobs run in ``--workers`` processes (one torch thread each); each finished job is written into the
JSON at once (temp file + os.replace), so a killed run resumes by skipping finished jobs.  Per job:
the training-batch reward and the clip fraction per timestep of every iteration, the final LoRA's
held-out reward (a fixed subset of the non-training captions, fixed noise, the same for every
arm; the base model's once), and the wall time.

    python benchmarks/convergence.py --regime paper --seeds 8 --iterations 10 --prompts-per-iteration 1 \
        --group-size 8 --train-fraction 0.2 --heldout-prompts 6 --heldout-samples 2 --workers 2 \
        --stop-at 05:18 --json benchmarks/convergence50.json
    # the same with --seeds 14 --stop-at 05:05 adds seeds to the finished run (jobs done are skipped)
    python benchmarks/convergence.py --report benchmarks/convergence50.json --targets 0.6,0.65,0.7

The report: iterations until the running mean (window 3) of the training-batch reward reaches each
target (budget + 1 if never; median [range] and mean), the final reward (mean of the last 3
iterations) and the held-out reward, each with a 95% bootstrap CI over seeds (10000 resamples of
the seeds, fixed RNG), and the same for the difference PCPO - baseline paired by seed, with the
verdict "resolved" only when that CI excludes 0; then the clip fraction per timestep in bins.

``--regime ten`` (default; the earlier 10-step "simple"-grid benchmark, uw-sigma rollout for every
objective, run in this process):

    python benchmarks/convergence.py --seeds 3 --iterations 20 --targets 0.72,0.75,0.78 --json out.json
    python benchmarks/convergence.py --report out.json --targets 0.70,0.72,0.75   # re-tabulate a run

``--smoke`` (either regime): the same code path on the smallest configuration, in seconds: 1 seed,
1 iteration, 1 prompt x 2 samples, 3 steps (paper: 5), 1 held-out caption x 1 sample, in this
process; a fresh JSON (outside benchmarks/), non-zero exit on a non-finite result.

    python benchmarks/convergence.py --regime paper --smoke --json /tmp/convergence.json
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _smoke import save_atomic  # noqa: E402

ARMS = {  # arm -> (objective, rollout variant)
    "pcpo-uw-sigma": ("pcpo", "uw-sigma"),
    "pcpo-uw-lambda": ("pcpo", "uw-lambda"),
    "grpo-clip": ("grpo-clip", "native"),
    "ddpo": ("ddpo", "native"),
}
PCPO_ARMS = ("pcpo-uw-sigma", "pcpo-uw-lambda")
BASELINES = ("grpo-clip", "ddpo")
CONFIG_KEYS = ("steps", "eta", "cfg", "scheduler", "lr", "prompts_per_iteration", "group_size", "iterations",
               "train_fraction", "updates", "heldout_prompts", "heldout_samples", "heldout_seed", "arms")  # --seeds may grow on resume


# ----------------------------------------------------------------------------- statistics (no ComfyUI)

def smoothed(rewards, window: int = 3):
    """Running mean over the last ``window`` values (fewer at the start)."""
    return [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
            for i in range(len(rewards))]


def iterations_to(rewards, target, window: int = 3):
    """First iteration (1-based) whose running mean (window 3) reaches ``target``; budget + 1 if never."""
    return next((i + 1 for i, r in enumerate(smoothed(rewards, window)) if r >= target), len(rewards) + 1)


def bootstrap_ci(values, resamples: int = 10000, seed: int = 0, level: float = 0.95):
    """(mean, low, high): percentile bootstrap CI of the mean of ``values`` (one per seed), resampling
    the seeds with replacement ``resamples`` times with a fixed RNG."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def paired_difference(a: dict, b: dict, **kw):
    """Bootstrap CI of mean(a[s] - b[s]) over the seeds s present in both (paired by seed);
    returns (mean, low, high, n)."""
    seeds = sorted(set(a) & set(b))
    m, lo, hi = bootstrap_ci([a[s] - b[s] for s in seeds], **kw)
    return m, lo, hi, len(seeds)


def verdict(low: float, high: float) -> str:
    """"resolved" only when the CI excludes 0."""
    if math.isnan(low) or math.isnan(high):
        return "not resolved at this budget"
    return "resolved" if (low > 0 or high < 0) else "not resolved at this budget"


def per_step_mean(rows):
    """Per-step mean over iterations of per-step values (None / NaN = not trained that iteration)."""
    n = len(rows[0])
    out = []
    for j in range(n):
        vals = [r[j] for r in rows if r[j] is not None and r[j] == r[j]]
        out.append(statistics.fmean(vals) if vals else float("nan"))
    return out


def binned(values, size: int):
    """Means of consecutive bins of ``size`` values, ignoring NaN (NaN for an empty bin)."""
    out = []
    for i in range(0, len(values), size):
        v = [x for x in values[i:i + size] if x == x]
        out.append(statistics.fmean(v) if v else float("nan"))
    return out


def finite(values):
    return [v for v in values if v == v]


# ----------------------------------------------------------------------------- the schedule

def spread_table(host, steps: int, eta: float):
    """Native per-step weights of every ComfyUI scheduler on the host model's schedule: rows of
    (scheduler, min, max, max/min, w_bar, note); the choice is the largest max/min among the usable."""
    import comfy.samplers
    import torch
    from comfyui_pcpo.step_plan import diffusion_plan
    ms = host.model.get_model_object("model_sampling")
    rows = []
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            sig = comfy.samplers.calculate_sigmas(ms, name, steps).double().cpu()
            plan = diffusion_plan(sig, eta, "native")
        except Exception as e:  # noqa: BLE001 - a scheduler this model cannot use
            rows.append({"scheduler": name, "note": f"unusable: {e}"})
            continue
        w = plan.w_native[plan.std > 0]
        note = ""
        if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            note = "degenerate: a zero or infinite weight on a stochastic step"
        rows.append({"scheduler": name, "min": float(w.min()), "max": float(w.max()),
                     "ratio": float(w.max() / w.min()) if float(w.min()) > 0 else float("inf"),
                     "w_bar": plan.info["w_bar"], "stochastic_steps": int(w.numel()), "note": note})
    usable = [r for r in rows if not r["note"]]
    best = max(usable, key=lambda r: r["ratio"])["scheduler"]
    return rows, best


def print_spread(rows, best, steps, eta):
    print(f"native per-step weights of the demo model, {steps} steps, eta {eta:g}, per ComfyUI scheduler "
          "(stochastic steps only; the last step to sigma 0 is deterministic):")
    print(f"  {'scheduler':17s} {'min':>7s} {'max':>7s} {'max/min':>8s} {'w_bar':>7s}")
    for r in rows:
        if "min" in r:
            mark = "  <- largest spread, used" if r["scheduler"] == best else ""
            print(f"  {r['scheduler']:17s} {r['min']:7.3f} {r['max']:7.3f} {r['ratio']:8.2f} {r['w_bar']:7.3f}"
                  f"{'  ' + r['note'] if r['note'] else ''}{mark}")
        else:
            print(f"  {r['scheduler']:17s} {r['note']}")


def trained_steps_per_sample(host, scheduler, steps, eta, train_fraction):
    """{variant: (kept steps per sample, candidate steps)} -- the LoRA Update's rule
    (candidate = stochastic steps without the last; keep = round(fraction * candidates), >= 1)."""
    import comfy.samplers
    from comfyui_pcpo.step_plan import diffusion_plan
    ms = host.model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, scheduler, steps).double().cpu()
    out = {}
    for arm, (_, variant) in ARMS.items():
        plan = diffusion_plan(sig, eta, variant)
        st = plan.trainable_steps()
        cand = st[st != plan.num_steps - 1]
        cand = cand if cand.numel() else st
        out[arm] = (max(1, int(round(train_fraction * cand.numel()))), int(cand.numel()))
    return out


# ----------------------------------------------------------------------------- the paper-regime jobs

_HOST = None


def _worker_init(threads: int):
    global _HOST
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import Host
    _HOST = Host(threads)


def _heldout(host, sess, cfg):
    texts = host.heldout_captions(cfg["heldout_prompts"])
    return host.heldout(sess, texts, cfg["heldout_samples"], cfg["steps"], cfg["scheduler"], cfg["eta"], cfg["cfg"],
                        cfg["heldout_seed"])


def run_job(job):
    """One (arm, seed) training run (or the base model's held-out reward); returns (key, result)."""
    key, cfg, stop_at = job
    host = _HOST
    t0 = time.time()
    if stop_at and t0 > stop_at:
        return key, None  # past --stop-at: not run, not saved (a later call resumes it)
    if key == "base":
        sess = host.session("conv50_base", cfg["lr"], seed=0)
        reward, kl = _heldout(host, sess, cfg)
        return key, {"heldout_reward": reward, "heldout_kl": kl, "wall_s": time.time() - t0}
    arm, seed = key.split("/")
    seed = int(seed)
    objective, variant = ARMS[arm]
    sess = host.session(f"conv50_{arm}_{seed}", cfg["lr"], seed=seed)
    prompts = host.prompts(cfg["prompts_per_iteration"], seed=seed)
    its = []
    for _ in range(cfg["iterations"]):
        lat, batch = host.rollout(sess, prompts, cfg["group_size"], steps=cfg["steps"], seed=seed, variant=variant,
                                  scheduler=cfg["scheduler"], eta=cfg["eta"], cfg=cfg["cfg"])
        st = host.update(sess, batch, host.score(lat, batch), objective=objective,
                         train_fraction=cfg["train_fraction"], micro_batch=cfg["group_size"], updates=cfg["updates"])
        its.append({k: st[k] for k in ("reward_mean", "reward_std", "clip_fraction", "clip_fraction_per_step",
                                       "approx_kl", "grad_norm", "zero_std_groups", "pairs")})
    reward, kl = _heldout(host, sess, cfg)
    return key, {"arm": arm, "objective": objective, "variant": variant, "seed": seed,
                 "rewards": [i["reward_mean"] for i in its], "iterations": its,
                 "heldout_reward": reward, "heldout_kl": kl, "wall_s": time.time() - t0}


def stop_time(hhmm: str) -> float:
    """The epoch time of the next HH:MM (UTC) for ``--stop-at``; 0 (no stop) for an empty string."""
    if not hhmm:
        return 0.0
    hh, mm = (int(x) for x in hhmm.split(":"))
    now = time.gmtime()
    t = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    return t + 24 * 3600 if t < time.time() - 12 * 3600 else t


def record_job(data: dict, key: str, res, json_path: str, wall0: float, t0: float, total: int, width: int = 18):
    """Store a finished job in ``data`` (and atomically in ``json_path``) and print its line; ``res``
    None = the job was not started (past --stop-at)."""
    if res is None:
        print(f"{key:{width}s} not started: past --stop-at", flush=True)
        return
    data["jobs"][key] = res
    data["wall_s"] = wall0 + time.time() - t0
    if json_path:
        save_atomic(json_path, data)
    extra = ""
    if "rewards" in res:
        extra = f" reward {res['rewards'][0]:.3f} -> last3 {statistics.fmean(res['rewards'][-3:]):.3f},"
    print(f"{key:{width}s} done:{extra} held-out {res['heldout_reward']:.3f} ({res['wall_s']:.0f} s; "
          f"{len(data['jobs'])}/{total} jobs, {time.time() - t0:.0f} s)", flush=True)


def resume(data: dict, cfg: dict, keys, json_path: str, seeds: int, extendable=()) -> None:
    """Continue the run saved in ``data``: stop with a clear message if its configuration differs from
    ``cfg`` in any of ``keys``; a larger ``seeds`` extends it (the seed count is not part of the match),
    and so does a list of ``extendable`` (e.g. the arms) that keeps the saved one as its start."""
    old, new = ({x: c.get(x) for x in keys} for c in (data["config"], cfg))
    for x in extendable:
        if isinstance(old[x], list) and new[x][:len(old[x])] == old[x]:
            old[x] = data["config"][x] = list(new[x])
    if old != new:
        raise SystemExit(f"{json_path} holds a run with another configuration:\n  {old}\nvs\n  {new}\n"
                         "(use another --json, or the same arguments to resume)")
    print(f"resuming {json_path}: {len(data['jobs'])} jobs done")
    data["config"]["seeds"] = max(seeds, data["config"].get("seeds", 0))


def run_paper(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import Host
    cfg = {"steps": args.steps, "eta": args.eta, "cfg": args.cfg, "lr": args.lr,
           "prompts_per_iteration": args.prompts_per_iteration, "group_size": args.group_size,
           "iterations": args.iterations, "train_fraction": args.train_fraction, "updates": args.updates,
           "heldout_prompts": args.heldout_prompts, "heldout_samples": args.heldout_samples,
           "heldout_seed": args.heldout_seed, "arms": args.arms.split(","), "seeds": args.seeds}
    data = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
    host = Host(args.threads)
    rows, best = spread_table(host, args.steps, args.eta)
    print_spread(rows, best, args.steps, args.eta)
    cfg["scheduler"] = args.scheduler or best
    if args.scheduler and args.scheduler != best:
        print(f"--scheduler {args.scheduler} given: using it instead of {best}")
    kept = trained_steps_per_sample(host, cfg["scheduler"], args.steps, args.eta, args.train_fraction)
    counts = {k for k, _ in kept.values()}
    if len(counts) != 1:
        raise SystemExit(f"the arms would train different numbers of timesteps per sample: {kept}")
    k, n = next(iter(kept.values()))
    print(f"every arm trains {k} of its {n} candidate steps per sample (train_fraction {args.train_fraction}, "
          "the last, deterministic step excluded), a fresh random subset per micro-batch")
    if data:
        resume(data, cfg, CONFIG_KEYS, args.json, args.seeds)
    else:
        data = {"config": cfg, "spread": rows, "spread_choice": best, "trained_steps": {"kept": k, "candidates": n},
                "jobs": {}, "wall_s": 0.0}
    data["spread"], data["spread_choice"] = rows, best
    keys = ["base"] + [f"{arm}/{s}" for s in range(args.seeds) for arm in cfg["arms"]]
    todo = [key for key in keys if key not in data["jobs"]]
    print(f"{len(todo)} jobs to run on {args.workers} worker processes ({args.threads} thread each)", flush=True)
    t0, wall0, stop_at = time.time(), data.get("wall_s", 0.0), stop_time(args.stop_at)
    if todo and args.workers <= 1:  # in this process
        global _HOST
        _HOST = host
        for key in todo:
            record_job(data, *run_job((key, cfg, stop_at)), args.json, wall0, t0, len(keys), width=18)
    elif todo:
        ctx = mp.get_context("spawn")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        with ctx.Pool(args.workers, initializer=_worker_init, initargs=(args.threads,)) as pool:
            for key, res in pool.imap_unordered(run_job, [(key, cfg, stop_at) for key in todo]):
                record_job(data, key, res, args.json, wall0, t0, len(keys), width=18)
    report_paper(data, args.targets)
    return data


# ----------------------------------------------------------------------------- the paper-regime report

def fmt_ci(m, lo, hi, digits=3):
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def arm_metrics(runs: dict, arms, targets) -> tuple[dict, list]:
    """({(metric, arm): {seed: value}}, metric names): iterations to each target, final reward (mean of
    the last 3 iterations) and held-out reward per (arm, seed)."""
    metrics = {}
    for a in arms:
        for s, r in runs[a].items():
            for t in targets:
                metrics.setdefault((f"iterations to {t:.2f}", a), {})[s] = iterations_to(r["rewards"], t)
            metrics.setdefault(("final reward", a), {})[s] = statistics.fmean(r["rewards"][-3:])
            metrics.setdefault(("held-out reward", a), {})[s] = r["heldout_reward"]
    return metrics, [f"iterations to {t:.2f}" for t in targets] + ["final reward", "held-out reward"]


def print_arm_table(runs: dict, arms, metrics: dict, names, budget: int, seeds_column: bool = False, lead: str = ""):
    """Per arm: mean [95% bootstrap CI over seeds] of each metric (iterations also median [range])."""
    print(f"{lead}per arm: mean [95% bootstrap CI over seeds]; iterations: running mean (3) of the batch reward "
          f"reaches the target, {budget + 1} = not reached, also median [range]")
    print("| arm | " + ("seeds | " if seeds_column else "") + " | ".join(names) + " |")
    print("|---|" + ("---|" if seeds_column else "") + "---|" * len(names))
    for a in arms:
        cells = []
        for nm in names:
            vals = list(metrics[(nm, a)].values())
            m, lo, hi = bootstrap_ci(vals)
            if nm.startswith("iterations"):
                cells.append(f"{fmt_ci(m, lo, hi, 1)}; median {statistics.median(vals):.1f} [{min(vals)}-{max(vals)}]")
            else:
                cells.append(fmt_ci(m, lo, hi))
        print(f"| {a} | " + (f"{len(runs[a])} | " if seeds_column else "") + " | ".join(cells) + " |")


def print_clip_table(runs: dict, arms, no_clip: set, n_steps: int, bin_size: int) -> dict:
    """The clip fraction per timestep in bins, with its mean and std across steps, per arm (arms in
    ``no_clip`` have none).  Returns {arm: ({seed: mean over steps}, {seed: std across steps})}."""
    nb = math.ceil(n_steps / bin_size)
    print("| arm | " + " | ".join(f"{i * bin_size + 1}-{min((i + 1) * bin_size, n_steps)}" for i in range(nb))
          + " | mean over steps | std across steps |")
    print("|---|" + "---|" * (nb + 2))
    flat = {}
    for a in arms:
        if a in no_clip:
            print(f"| {a} | " + " | ".join([""] * nb) + " | 0 (no clipping) | |")
            continue
        per_seed = {s: per_step_mean([it["clip_fraction_per_step"] for it in r["iterations"]])
                    for s, r in runs[a].items()}
        row = per_step_mean(list(per_seed.values()))
        f = finite(row)
        print(f"| {a} | " + " | ".join(f"{v:.3f}" if v == v else "" for v in binned(row, bin_size)) +
              f" | {statistics.fmean(f):.3f} | {statistics.pstdev(f):.3f} |")
        flat[a] = ({s: statistics.fmean(finite(v)) for s, v in per_seed.items()},
                   {s: statistics.pstdev(finite(v)) for s, v in per_seed.items()})
    return flat


def report_paper(data, targets, bin_size: int = 5):
    cfg = data["config"]
    jobs = data["jobs"]
    arms = [a for a in cfg["arms"] if any(k.startswith(a + "/") for k in jobs)]
    runs = {a: {jobs[k]["seed"]: jobs[k] for k in jobs if k.startswith(a + "/")} for a in arms}
    complete = set.intersection(*(set(r) for r in runs.values())) if runs else set()
    partial = sorted(set().union(*(set(r) for r in runs.values())) - complete) if runs else []
    runs = {a: {s: r for s, r in rs.items() if s in complete} for a, rs in runs.items()}
    best = data["spread_choice"]
    print()
    for r in data["spread"]:
        if r["scheduler"] == cfg["scheduler"] and "min" in r:
            print(f"grid: {cfg['scheduler']} ({'largest spread' if cfg['scheduler'] == best else 'chosen; largest: ' + best}"
                  f"), {cfg['steps']} steps, eta {cfg['eta']:g}: native weights {r['min']:.3f}-{r['max']:.3f} "
                  f"(max/min {r['ratio']:.1f}), w_bar {r['w_bar']:.3f}")
    ts = data.get("trained_steps", {})
    print(f"demo model, reward prompt-colour-agreement, lr {cfg['lr']}, {cfg['prompts_per_iteration']} prompts x "
          f"{cfg['group_size']} samples per iteration, cfg {cfg['cfg']}, {cfg['updates']} optimizer steps per rollout, "
          f"{ts.get('kept', '?')} of {ts.get('candidates', '?')} candidate steps trained per sample for every arm, "
          f"budget {cfg['iterations']} iterations, seeds done per arm: "
          + ", ".join(f"{a} {len(runs[a])}" for a in arms) + f"; wall {data.get('wall_s', 0) / 60:.1f} min")
    if partial:
        print(f"seeds {partial} are left out: not finished for every arm (every table uses the same seeds)")
    budget = cfg["iterations"]
    if "base" in jobs:
        print(f"base model held-out reward: {jobs['base']['heldout_reward']:.3f} ({cfg['heldout_prompts']} held-out "
              f"captions x {cfg['heldout_samples']} samples, fixed noise, seed {cfg['heldout_seed']})")
    metrics, names = arm_metrics(runs, arms, targets)
    print_arm_table(runs, arms, metrics, names, budget, lead="\n")
    if "base" in jobs:
        base = jobs["base"]["heldout_reward"]
        print("held-out reward minus the base model's (same captions and noise) and KL to the base model per "
              "latent element (summed over steps): " + "; ".join(
                  f"{a} {fmt_ci(*bootstrap_ci([v - base for v in metrics[('held-out reward', a)].values()]))}, KL "
                  f"{statistics.fmean(r.get('heldout_kl', float('nan')) for r in runs[a].values()):.2e}"
                  for a in arms))
    print("\ndifference PCPO - baseline, paired by seed: mean [95% bootstrap CI]; verdict "
          "(iterations: negative = PCPO faster; rewards: positive = PCPO higher)")
    print("| comparison | metric | difference | seeds | verdict |")
    print("|---|---|---|---|---|")
    for p in PCPO_ARMS:
        for b in BASELINES:
            if p not in arms or b not in arms:
                continue
            for nm in names:
                m, lo, hi, n = paired_difference(metrics[(nm, p)], metrics[(nm, b)])
                extra = ""
                if nm.startswith("iterations"):
                    mb = statistics.fmean(metrics[(nm, b)].values())
                    extra = (f" ({100 * abs(m) / mb:.0f}% {'fewer' if m <= 0 else 'more'})") if mb else ""
                print(f"| {p} - {b} | {nm} | {fmt_ci(m, lo, hi, 1 if nm.startswith('iter') else 3)}{extra} | {n} | "
                      f"{verdict(lo, hi)} |")
    # clip fraction per timestep
    print(f"\nclip fraction per timestep (share of trained pairs whose hinge is off; mean over iterations and seeds; "
          f"bins of {bin_size} steps, step 1 = highest noise, the last step is never trained); mean and std across "
          "the trained steps")
    flat = print_clip_table(runs, arms, {a for a in arms if ARMS[a][0] == "ddpo"}, cfg["steps"], bin_size)
    if "grpo-clip" in flat:
        print("\nclip fraction, PCPO - grpo-clip paired by seed (per seed: mean and std across steps of the per-step "
              "clip fraction):")
        for p in PCPO_ARMS:
            if p in flat:
                for i, nm in enumerate(("mean over steps", "std across steps")):
                    m, lo, hi, n = paired_difference(flat[p][i], flat["grpo-clip"][i])
                    print(f"  {p} - grpo-clip, {nm}: {fmt_ci(m, lo, hi)} ({n} seeds): {verdict(lo, hi)}")
    print("\nbatch reward per iteration (mean over seeds):")
    for a in arms:
        rs = [r["rewards"] for r in runs[a].values()]
        print(f"  {a:15s} " + " ".join(f"{statistics.fmean(c):.3f}" for c in zip(*rs)))
    walls = [r["wall_s"] for a in arms for r in runs[a].values()]
    if walls:
        print(f"job wall time: {min(walls):.0f}-{max(walls):.0f} s, "
              + ", ".join(f"{a} mean {statistics.fmean(r['wall_s'] for r in runs[a].values()):.0f} s" for a in arms))


# ----------------------------------------------------------------------------- the 10-step regime

def run(host, objective, seed, args):
    sess = host.session(f"conv_{objective}_{seed}", args.lr, seed=seed)
    prompts = host.prompts(args.prompts_per_iteration, seed=seed)
    rewards, clip_steps = [], []
    for _ in range(args.iterations):
        lat, batch = host.rollout(sess, prompts, args.group_size, steps=args.steps, seed=seed)
        st = host.update(sess, batch, host.score(lat, batch), objective=objective, micro_batch=args.group_size)
        rewards.append(st["reward_mean"])
        clip_steps.append(st["clip_fraction_per_step"])
    smooth = smoothed(rewards)
    hit = iterations_to(rewards, args.targets[0])
    per_step = [statistics.fmean([c[j] for c in clip_steps if c[j] is not None] or [float("nan")])
                for j in range(len(clip_steps[0]))]
    return {"iterations_to_target": hit, "final_smoothed": smooth[-1], "rewards": rewards, "clip_per_step": per_step}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=("ten", "paper"), default="ten",
                    help="ten: the 10-step simple-grid benchmark; paper: 50 steps, eta 1, the widest-spread grid")
    ap.add_argument("--objectives", default="pcpo,grpo-clip,ddpo", help="(ten) objectives")
    ap.add_argument("--arms", default=",".join(ARMS), help="(paper) arms: " + ", ".join(ARMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--targets", default="0.72,0.75,0.78", help="comma-separated target rewards")
    ap.add_argument("--report", default="", help="tabulate the raw results of an earlier --json run")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--prompts-per-iteration", type=int, default=None, help="default 4 (ten), 2 (paper)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default 10 (ten), 50 (paper)")
    ap.add_argument("--eta", type=float, default=1.0, help="(paper)")
    ap.add_argument("--cfg", type=float, default=4.0, help="(paper)")
    ap.add_argument("--scheduler", default="", help="(paper) override the widest-spread choice")
    ap.add_argument("--train-fraction", type=float, default=0.1,
                    help="(paper) share of the candidate steps trained per sample, the same for every arm")
    ap.add_argument("--updates", type=int, default=2, help="(paper) optimizer steps per rollout")
    ap.add_argument("--heldout-prompts", type=int, default=8, help="(paper) held-out captions")
    ap.add_argument("--heldout-samples", type=int, default=2, help="(paper) samples per held-out caption")
    ap.add_argument("--heldout-seed", type=int, default=1234)
    ap.add_argument("--stop-at", default="", help="(paper) HH:MM UTC: start no job after this time (resume later)")
    ap.add_argument("--workers", type=int, default=2, help="(paper) worker processes (1: in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", default="", help="write the raw results here (paper: after every job; resumes)")
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration, in seconds (see above)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _smoke
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.seeds, args.iterations, args.prompts_per_iteration, args.group_size = 1, 1, 1, 2
        args.steps = 5 if args.regime == "paper" else 3
        args.heldout_prompts, args.heldout_samples, args.workers = 1, 1, 1
    args.targets = [float(t) for t in args.targets.split(",")]
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        if "jobs" in saved:
            report_paper(saved, args.targets)
            return 0
        res = saved["results"]
        for k in ("lr", "prompts_per_iteration", "group_size", "steps", "iterations"):
            setattr(args, k, saved["args"][k])
        report(res, args)
        return 0
    if args.regime == "paper":
        args.steps = args.steps or 50
        args.prompts_per_iteration = args.prompts_per_iteration or 2
        data = run_paper(args)
        if not args.smoke:
            return 0
        return _smoke.finish(args.json, data, {f"{k} {m}": j[m] for k, j in data["jobs"].items()
                                                for m in ("rewards", "heldout_reward", "heldout_kl") if m in j})
    args.steps = args.steps or 10
    args.prompts_per_iteration = args.prompts_per_iteration or 4
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import Host
    host = Host(args.threads)
    t0 = time.time()
    res = {}
    for obj in args.objectives.split(","):
        res[obj] = []
        for s in range(args.seeds):
            r = run(host, obj, s, args)
            res[obj].append(r)
            print(f"{obj:10s} seed {s}: iterations to {args.targets[0]} = {r['iterations_to_target']:3d}, "
                  f"final (smoothed) {r['final_smoothed']:.3f}  [{time.time() - t0:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=1)
    report(res, args)
    if not args.smoke:
        return 0
    return _smoke.finish(args.json, {"args": vars(args), "results": res},
                         {f"{obj} seed {i} {m}": r[m] for obj, rs in res.items() for i, r in enumerate(rs)
                          for m in ("rewards", "final_smoothed")})


def report(res, args):
    print()
    print(f"demo model, reward prompt-colour-agreement, lr {args.lr}, {args.prompts_per_iteration} prompts x "
          f"{args.group_size} samples, {args.steps} steps, budget {args.iterations} iterations; "
          "iterations until the running mean (3) of the batch reward reaches the target "
          f"({args.iterations + 1} = not reached)")
    print(f"{'objective':10s} | " + " | ".join(f"target {t:.2f}: median [range]" for t in args.targets)
          + " | first 3 -> last 3 mean reward")
    med = {}
    for obj, runs in res.items():
        cells = []
        for t in args.targets:
            its = [iterations_to(r["rewards"], t) for r in runs]
            med[(obj, t)] = statistics.median(its)
            cells.append(f"{med[(obj, t)]:5.1f} [{min(its)}-{max(its)}]".ljust(27))
        first = statistics.fmean(statistics.fmean(r["rewards"][:3]) for r in runs)
        last = statistics.fmean(statistics.fmean(r["rewards"][-3:]) for r in runs)
        print(f"{obj:10s} | " + " | ".join(cells) + f" | {first:.3f} -> {last:.3f}")
    if "pcpo" in res:
        for obj in res:
            if obj != "pcpo":
                print(f"ratio {obj} / pcpo (median iterations): " + ", ".join(
                    f"{t:.2f}: {med[(obj, t)] / med[('pcpo', t)]:.2f}" for t in args.targets))
    print("clip fraction per timestep (mean over iterations and seeds; last step not trained):")
    for obj, runs in res.items():
        n = len(runs[0]["clip_per_step"])
        row = [statistics.fmean([r["clip_per_step"][j] for r in runs if r["clip_per_step"][j] == r["clip_per_step"][j]]
                                or [float("nan")]) for j in range(n)]
        print(f"  {obj:10s} " + " ".join(f"{v:.2f}" for v in row))


if __name__ == "__main__":
    sys.exit(main())
