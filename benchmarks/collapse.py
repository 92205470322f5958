"""Convergence and collapse in runs where the reward moves: PCPO against the clipped-ratio baseline
(DanceGRPO / Flow-GRPO style) over long runs, with quality (domain FD) and diversity tracked.

Regimes (``--regime``):

* ``flow``: the demo flow model (tiny SD3-shaped MMDiT), shift 3, 16 steps, the ``constant``
  (DanceGRPO, eta 0.3) noise rule; its native weights spread about 3x.
* ``diffusion``: the demo diffusion model at 10 steps, eta 1, ``normal`` scheduler, chosen from the
  weight spread table (``--spread-table`` prints it per scheduler and step count with the cost per
  iteration): native weights 1.4-2.7 and one of 38 at the second-to-last step (27x, the shape of the
  paper's SD1.x grid), the same shape as 20 steps (22x) at half the cost; ``--steps 20`` runs that.
  The PCPO arm samples with the uw-sigma rollout, the baseline with the native one.

The demo's training set-up: 4 prompts x 8 samples per iteration from the 29 training captions,
rank-8 LoRA on attention + MLP, AdamW, 2 optimizer steps per rollout, train fraction 0.5,
``prompt-colour-agreement``.  Arms ``pcpo`` and ``grpo-clip`` at ``--lr`` (default 2e-3, the
demo's) and, as separate arms, at ``--aggressive-lr`` (default 6e-3, 3x: where collapse is likely).
Per seed the arms share the LoRA initialisation, the prompt sequence and the rollout noise seeds.

Every ``--eval-every`` iterations (and at iteration 0, the base model) the LoRA is evaluated on a
fixed set: ``--eval-captions`` training captions x ``--eval-samples`` samples, fixed noise, the
native stochastic sampler of the grid, the same for every arm:

* reward: mean prompt-colour agreement of those samples;
* FD: Fréchet distance in the demo domain encoder's features between the samples and
  ``--true-per-caption`` true (procedural) images of each of the same captions;
* diversity: mean pairwise feature distance of a caption's samples (``within_caption_diversity``),
  next to the true images' own.

(regime, arm, seed) jobs run in ``--workers`` processes (one torch thread each); each finished job is
written into the JSON at once (atomically), so a killed run resumes by skipping finished jobs, and
``--stop-at HH:MM`` (UTC) stops starting jobs; the same command with more ``--seeds`` extends a run.

    python benchmarks/collapse.py --regime flow --seeds 6 --iterations 60 --json benchmarks/collapse_flow.json
    python benchmarks/collapse.py --report benchmarks/collapse_flow.json [--figure docs/collapse_flow.png]
    python benchmarks/collapse.py --regime diffusion --spread-table    # the grid choice, with costs
    python benchmarks/collapse.py --smoke --json /tmp/collapse.json    # seconds

The report per arm (95% bootstrap CIs over seeds, differences PCPO - baseline paired by seed):
evaluation reward, FD and diversity at the end and their change from the base model (the pilot
check: the reward moves when "final - base" excludes 0), iterations until the evaluation reward
reaches a target, reward at equal wall time, and FD and diversity at matched reward (each arm's
values interpolated at the reward level both arms reach in every seed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _smoke  # noqa: E402
from convergence import bootstrap_ci, fmt_ci, paired_difference, record_job, resume, stop_time  # noqa: E402

REGIMES = {  # regime -> model, steps, scheduler, eta / level, flow rule
    "flow": ("flow", 16, "simple", 0.3, "constant"),
    "diffusion": ("demo", 10, "normal", 1.0, None),
}
ARMS = {"pcpo": "pcpo", "grpo-clip": "grpo-clip"}
CONFIG_KEYS = ("regime", "steps", "scheduler", "level", "lr", "aggressive_lr", "prompts_per_iteration", "group_size",
               "iterations", "train_fraction", "updates", "eval_every", "eval_captions", "eval_samples",
               "true_per_caption", "eval_seed", "arms")
CFG = 4.0


def verdict(lo: float, hi: float, n: int) -> str:
    if n < 3:
        return f"not resolved ({n} seeds)"
    return "resolved" if (lo > 0 or hi < 0) else "not resolved"


# ----------------------------------------------------------------------------- the host side

def make_host(regime: str, threads: int):
    import torch
    torch.set_num_threads(threads)
    if REGIMES[regime][0] == "flow":
        from convergence_flow import make_host as flow_host
        return flow_host(threads)
    from _common import Host
    return Host(threads)


def eval_captions(n: int) -> list:
    from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS
    step = max(1, len(TRAINING_CAPTIONS) // n)
    return list(TRAINING_CAPTIONS[::step][:n])


class Evaluator:
    """Samples of the fixed evaluation set (the Held-out Evaluation node's sampler, fixed noise) and their
    reward, domain FD against true images of the same captions, and within-caption diversity."""

    def __init__(self, host, cfg):
        from comfyui_pcpo.demo import domain_encoder as de
        self.de, self.host, self.cfg = de, host, cfg
        self.texts = eval_captions(cfg["eval_captions"])
        true_caps = [t for t in self.texts for _ in range(cfg["true_per_caption"])]
        self.true_feats = de.features(de.true_images(true_caps, seed=cfg["eval_seed"]))
        self.true_div = de.within_caption_diversity(self.true_feats, true_caps)

    def __call__(self, sess) -> dict:
        import comfy.samplers
        import torch
        host, cfg = self.host, self.cfg
        mod = sys.modules[host.N["PCPOHeldOutEvaluation"].__module__]
        enc = sys.modules[host.N["PCPOPrompts"].__module__].encode_text
        shape_for = sys.modules[host.N["PCPOTrajectorySampler"].__module__].latent_shape_for
        with torch.inference_mode():
            model = sess.model
            sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), cfg["scheduler"],
                                                  cfg["steps"])
            neg = enc(host.clip, "")
            conds = [(enc(host.clip, t), neg) for t in self.texts]
            lat, kl = mod.sample_heldout(sess, conds, shape_for(model, None, 32, 32), sig, cfg["level"], CFG,
                                         cfg["eval_samples"], cfg["eval_seed"], flow_rule=cfg["rule"] or "constant")
            images = host.vae.decode(lat).float().cpu()
        prompts = [t for t in self.texts for _ in range(cfg["eval_samples"])]
        reward, _ = mod.mean_score(mod.reward_object("prompt-colour-agreement"), images, prompts)
        f = self.de.features(images.numpy())
        return {"reward": reward, "fd": self.de.frechet_distance(f, self.true_feats),
                "diversity": self.de.within_caption_diversity(f, prompts), "kl": kl}


def rollout(host, sess, prompts, cfg, seed, variant):
    if cfg["model"] == "flow":
        return host.flow_rollout(sess, prompts, cfg["group_size"], cfg["steps"], seed, cfg["rule"], cfg["level"],
                                 cfg["scheduler"], CFG)
    return host.rollout(sess, prompts, cfg["group_size"], steps=cfg["steps"], seed=seed, variant=variant,
                        scheduler=cfg["scheduler"], eta=cfg["level"], cfg=CFG)


_HOST = None
_EVAL = None


def _worker_init(regime: str, threads: int, cfg: dict):
    global _HOST, _EVAL
    os.environ["OMP_NUM_THREADS"] = str(threads)
    _HOST = make_host(regime, threads)
    _EVAL = Evaluator(_HOST, cfg)


def run_job(job):
    """One (arm, seed) run: ``iterations`` PCPO LoRA Update iterations, evaluated every ``eval_every``."""
    key, cfg, stop_at = job
    host, evaluate = _HOST, _EVAL
    t0 = time.time()
    if stop_at and t0 > stop_at:
        return key, None
    arm, seed = key.split("/")
    seed = int(seed)
    aggressive = arm.endswith("@aggressive")
    objective = ARMS[arm.split("@")[0]]
    lr = cfg["aggressive_lr"] if aggressive else cfg["lr"]
    variant = "uw-sigma" if (objective == "pcpo" and cfg["model"] == "demo") else "native"
    sess = host.session(f"collapse_{key.replace('/', '_').replace('@', '_')}", lr, seed=seed)
    prompts = host.prompts(cfg["prompts_per_iteration"], seed=seed)
    evals = [dict(evaluate(sess), iteration=0, wall_s=0.0)]
    train_s = 0.0
    its = []
    for i in range(1, cfg["iterations"] + 1):
        t1 = time.time()
        lat, batch = rollout(host, sess, prompts, cfg, seed, variant)
        st = host.update(sess, batch, host.score(lat, batch), objective=objective, train_fraction=cfg["train_fraction"],
                         micro_batch=cfg["group_size"], updates=cfg["updates"])
        train_s += time.time() - t1
        its.append({k: st.get(k) for k in ("reward_mean", "reward_std", "clip_fraction", "approx_kl", "grad_norm",
                                           "zero_std_groups")})
        if i % cfg["eval_every"] == 0 or i == cfg["iterations"]:
            evals.append(dict(evaluate(sess), iteration=i, wall_s=train_s))
    return key, {"arm": arm, "seed": seed, "lr": lr, "rewards": [x["reward_mean"] for x in its], "iterations": its,
                 "evals": evals, "heldout_reward": evals[-1]["reward"], "train_s": train_s,
                 "wall_s": time.time() - t0}


def spread_table(regime_steps=(10, 20, 30, 50), threads: int = 1):
    """Native weight spread of the demo diffusion model per scheduler and step count, with the cost of
    one demo iteration (4 prompts x 8, train fraction 0.5) measured at each step count on ``normal``."""
    sys.path.insert(0, HERE)
    from convergence import print_spread
    from convergence import spread_table as spread
    from _common import Host
    host = Host(threads)
    costs = {}
    for steps in regime_steps:
        rows, best = spread(host, steps, 1.0)
        print_spread(rows, best, steps, 1.0)
        sess = host.session(f"spread_{steps}", 2e-3)
        prompts = host.prompts(4)
        t0 = time.time()
        lat, batch = host.rollout(sess, prompts, 8, steps=steps, scheduler="normal")
        host.update(sess, batch, host.score(lat, batch), train_fraction=0.5, micro_batch=8)
        costs[steps] = time.time() - t0
        print(f"  one demo iteration at {steps} steps (normal): {costs[steps]:.1f} s on {threads} thread\n", flush=True)
    return costs


# ----------------------------------------------------------------------------- the report (no ComfyUI)

def interp_at(xs, ys, x0):
    """ys linearly interpolated at the first crossing of level ``x0`` by xs (None if never reached)."""
    for i in range(len(xs)):
        if xs[i] >= x0:
            if i == 0:
                return ys[0]
            f = (x0 - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] != xs[i - 1] else 1.0
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    return None


def first_reaching(evals, target):
    return next((e["iteration"] for e in evals if e["reward"] >= target), None)


def at_wall(evals, t):
    """Evaluation reward of the last evaluation at or before training wall time ``t``."""
    prior = [e for e in evals if e["wall_s"] <= t]
    return prior[-1]["reward"] if prior else evals[0]["reward"]


def analyse(data) -> dict:
    """Every comparison of the report as numbers: {name: (mean, low, high, n)} and per-arm tables."""
    jobs = {k: v for k, v in data["jobs"].items() if "evals" in v}
    arms = sorted({v["arm"] for v in jobs.values()}, key=lambda a: (a.endswith("@aggressive"), a != a.split("@")[0], a))
    runs = {a: {v["seed"]: v for v in jobs.values() if v["arm"] == a} for a in arms}
    out = {"arms": {}, "pairs": {}}
    for a in arms:
        rs = runs[a]
        if not rs:
            continue
        row = {}
        for m in ("reward", "fd", "diversity"):
            row[f"final {m}"] = {s: r["evals"][-1][m] for s, r in rs.items()}
            row[f"{m} change"] = {s: r["evals"][-1][m] - r["evals"][0][m] for s, r in rs.items()}
        row["min diversity"] = {s: min(e["diversity"] for e in r["evals"]) for s, r in rs.items()}
        row["max fd"] = {s: max(e["fd"] for e in r["evals"]) for s, r in rs.items()}
        out["arms"][a] = {k: (*bootstrap_ci(list(v.values())), len(v)) for k, v in row.items()}
        out["arms"][a]["_raw"] = row
    for p in [a for a in arms if a.startswith("pcpo")]:
        b = p.replace("pcpo", "grpo-clip", 1)
        if b not in runs or not runs[p] or not runs[b]:
            continue
        seeds = sorted(set(runs[p]) & set(runs[b]))
        if not seeds:
            continue
        res = {}
        for m in ("final reward", "final fd", "final diversity", "min diversity", "max fd"):
            res[m] = paired_difference(out["arms"][p]["_raw"][m], out["arms"][b]["_raw"][m])
        # iterations to a target: the base reward + half of the smaller mean gain (both arms reach it); when
        # one arm gains nothing on average, half of the other's gain (a run that never reaches it counts as
        # the budget + one evaluation interval: a lower bound on its iterations)
        base = statistics.fmean(runs[p][s]["evals"][0]["reward"] for s in seeds)
        gains = sorted(statistics.fmean(runs[a][s]["evals"][-1]["reward"] for s in seeds) - base for a in (p, b))
        gain = gains[0] if gains[0] > 0 else gains[1]
        target = base + 0.5 * gain if gain > 0 else None
        budget = data["config"]["iterations"]
        if target is not None:
            its = {a: {s: first_reaching(runs[a][s]["evals"], target) or budget + data["config"]["eval_every"]
                       for s in seeds} for a in (p, b)}
            res[f"iterations to {target:.3f}"] = paired_difference(its[p], its[b])
            out.setdefault("targets", {})[p] = target
        # reward at equal wall time: the smaller of the two arms' training times, per seed
        eq = {s: min(runs[p][s]["train_s"], runs[b][s]["train_s"]) for s in seeds}
        res["reward at equal wall time"] = paired_difference({s: at_wall(runs[p][s]["evals"], eq[s]) for s in seeds},
                                                             {s: at_wall(runs[b][s]["evals"], eq[s]) for s in seeds})
        # FD and diversity at matched reward: the reward level both arms reach in every seed
        level = min(max(e["reward"] for e in runs[a][s]["evals"]) for a in (p, b) for s in seeds)
        if level > base:
            for m in ("fd", "diversity"):
                v = {a: {s: interp_at([e["reward"] for e in runs[a][s]["evals"]], [e[m] for e in runs[a][s]["evals"]],
                                      level) for s in seeds} for a in (p, b)}
                res[f"{m} at reward {level:.3f}"] = paired_difference(v[p], v[b])
        out["pairs"][f"{p} - {b}"] = res
    return out


def report(data, figure: str = "") -> dict:
    cfg = data["config"]
    res = analyse(data)
    jobs = {k: v for k, v in data["jobs"].items() if "evals" in v}
    print(f"\nregime {cfg['regime']}: {cfg['model']} model, {cfg['steps']} steps, {cfg['scheduler']}, "
          f"{'rule ' + cfg['rule'] + ' ' if cfg['rule'] else 'eta '}{cfg['level']:g}; {cfg['prompts_per_iteration']} "
          f"prompts x {cfg['group_size']} samples, lr {cfg['lr']:g} (aggressive {cfg['aggressive_lr']:g}), "
          f"{cfg['iterations']} iterations, evaluation every {cfg['eval_every']} on {cfg['eval_captions']} training "
          f"captions x {cfg['eval_samples']} samples (fixed noise), FD against {cfg['true_per_caption']} true images "
          f"per caption; true images' own diversity {data.get('true_diversity', float('nan')):.3f}; "
          f"{len(jobs)} jobs, wall {data.get('wall_s', 0) / 60:.1f} min")
    print("\nper arm: mean [95% bootstrap CI over seeds] (seeds)")
    names = ("final reward", "reward change", "final fd", "fd change", "final diversity", "diversity change")
    print("| arm | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for a, row in res["arms"].items():
        print(f"| {a} | " + " | ".join(f"{fmt_ci(*row[n][:3])} ({row[n][3]})" for n in names) + " |")
    print("\ndifference PCPO - grpo-clip, paired by seed: mean [95% CI] (seeds), verdict")
    print("| comparison | metric | difference | verdict |")
    print("|---|---|---|---|")
    for pair, r in res["pairs"].items():
        for m, (mean, lo, hi, n) in r.items():
            d = 1 if m.startswith("iterations") else 3
            print(f"| {pair} | {m} | {fmt_ci(mean, lo, hi, d)} ({n}) | {verdict(lo, hi, n)} |")
    print("\nevaluation reward / FD / diversity per evaluation (mean over seeds):")
    for a in res["arms"]:
        rs = [v for v in jobs.values() if v["arm"] == a]
        its = [e["iteration"] for e in rs[0]["evals"]]
        print(f"  {a:20s} it  " + " ".join(f"{i:6d}" for i in its))
        for m in ("reward", "fd", "diversity"):
            cols = list(zip(*[[e[m] for e in r["evals"]] for r in rs]))
            print(f"  {'':20s} {m[:3]} " + " ".join(f"{statistics.fmean(c):6.3f}" for c in cols))
    if figure:
        plot(data, res, figure)
    return res


def plot(data, res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    jobs = {k: v for k, v in data["jobs"].items() if "evals" in v}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    colours = {"pcpo": "#1f77b4", "grpo-clip": "#d62728"}
    for a in res["arms"]:
        rs = [v for v in jobs.values() if v["arm"] == a]
        its = np.array([e["iteration"] for e in rs[0]["evals"]])
        style = "--" if a.endswith("@aggressive") else "-"
        for ax, m in zip(axes, ("reward", "fd", "diversity")):
            y = np.array([[e[m] for e in r["evals"]] for r in rs])
            mean = y.mean(0)
            lo, hi = np.quantile(y, 0.1, axis=0), np.quantile(y, 0.9, axis=0)
            c = colours[a.split("@")[0]]
            ax.plot(its, mean, style, color=c, label=f"{a} ({len(rs)} seeds)")
            ax.fill_between(its, lo, hi, color=c, alpha=0.12)
    for ax, t in zip(axes, ("prompt-colour agreement (evaluation set)", "domain FD to true images (lower = better)",
                            "within-caption diversity")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("iteration")
    if "true_diversity" in data:
        axes[2].axhline(data["true_diversity"], color="grey", lw=0.8, ls=":", label="true images")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    cfg = data["config"]
    name = "demo flow model" if cfg["model"] == "flow" else "demo diffusion model"
    fig.suptitle(f"PCPO vs grpo-clip, {name} ({cfg['steps']} steps, {cfg['scheduler']}); bands: 10-90% of seeds",
                 fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
    print(f"figure: {path}")


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=tuple(REGIMES), default="flow")
    ap.add_argument("--scheduler", default="", help="(diffusion) override the grid's scheduler")
    ap.add_argument("--steps", type=int, default=0, help="override the regime's step count")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--aggressive-lr", type=float, default=6e-3)
    ap.add_argument("--arms", default="pcpo,grpo-clip,pcpo@aggressive,grpo-clip@aggressive")
    ap.add_argument("--prompts-per-iteration", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--train-fraction", type=float, default=0.5)
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-captions", type=int, default=12)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--true-per-caption", type=int, default=64)
    ap.add_argument("--eval-seed", type=int, default=4321)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-at", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--report", default="")
    ap.add_argument("--figure", default="")
    ap.add_argument("--spread-table", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report(json.load(f), args.figure)
        return 0
    if args.spread_table:
        spread_table(threads=args.threads)
        return 0
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.seeds, args.iterations, args.eval_every, args.steps = 1, 2, 1, 4
        args.prompts_per_iteration, args.group_size, args.eval_captions, args.eval_samples = 1, 2, 2, 2
        args.true_per_caption, args.workers = 4, 1
    model, steps, scheduler, level, rule = REGIMES[args.regime]
    cfg = {"regime": args.regime, "model": model, "steps": args.steps or steps, "scheduler": args.scheduler or scheduler,
           "level": level, "rule": rule, "lr": args.lr, "aggressive_lr": args.aggressive_lr,
           "prompts_per_iteration": args.prompts_per_iteration, "group_size": args.group_size,
           "iterations": args.iterations, "train_fraction": args.train_fraction, "updates": args.updates,
           "eval_every": args.eval_every, "eval_captions": args.eval_captions, "eval_samples": args.eval_samples,
           "true_per_caption": args.true_per_caption, "eval_seed": args.eval_seed, "arms": args.arms.split(","),
           "seeds": args.seeds}
    data = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
        resume(data, cfg, CONFIG_KEYS, args.json, args.seeds, extendable=("arms",))
    else:
        data = {"config": cfg, "jobs": {}, "wall_s": 0.0}
    keys = [f"{arm}/{s}" for s in range(args.seeds) for arm in cfg["arms"]]
    todo = [k for k in keys if k not in data["jobs"]]
    print(f"{len(todo)} jobs to run on {args.workers} worker process(es)", flush=True)
    t0, wall0, stop_at = time.time(), data.get("wall_s", 0.0), stop_time(args.stop_at)
    if todo and args.workers <= 1:
        _worker_init(args.regime, args.threads, cfg)
        data["true_diversity"] = _EVAL.true_div
        for key in todo:
            record_job(data, *run_job((key, cfg, stop_at)), args.json, wall0, t0, len(keys), width=24)
    elif todo:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers, initializer=_worker_init, initargs=(args.regime, args.threads, cfg)) as pool:
            for key, res in pool.imap_unordered(run_job, [(k, cfg, stop_at) for k in todo]):
                record_job(data, key, res, args.json, wall0, t0, len(keys), width=24)
    if "true_diversity" not in data:
        from comfyui_pcpo.demo import domain_encoder as de
        caps = [t for t in eval_captions(cfg["eval_captions"]) for _ in range(cfg["true_per_caption"])]
        data["true_diversity"] = de.within_caption_diversity(de.features(de.true_images(caps, seed=cfg["eval_seed"])),
                                                             caps)
    if args.json:
        _smoke.save_atomic(args.json, data)
    res = report(data, args.figure)
    if args.smoke:
        return _smoke.finish(args.json, data, {f"{k} {m}": [e[m] for e in j["evals"]] for k, j in data["jobs"].items()
                                               for m in ("reward", "fd", "diversity")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
