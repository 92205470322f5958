"""PCPO vs the clipped-ratio baseline (DanceGRPO / Flow-GRPO style) and DDPO on the embedded demo
*flow* model (tiny SD3-shaped rectified-flow MMDiT, ``PCPO Demo Flow Model Loader``).

Grid: ComfyUI's ``simple`` schedule of the model's ModelSamplingDiscreteFlow at shift 3, 16 steps.
Two noise rules of the flow SDE sampler: ``constant`` (DanceGRPO, eta 0.3) and ``flow-grpo``
(a sqrt(t / (1 - t)), a 0.7).  Arms, each with the native rollout (the same sampler for all):
``pcpo`` (the PCPO objective: log-hinge with the proportionate weights zeta dt_i), ``grpo-clip``
(the clipped-ratio objective with the native weights) and ``ddpo``.  Every arm trains the same
number of timesteps per sample (the same train fraction of the same candidate steps; checked and
printed), with the same prompts, seeds, learning rate and budget.  The native and the PCPO weights of
every step are printed per rule (min, max, max/min).

(rule, arm, seed) jobs run in ``--workers`` processes (one torch thread each; 1 = in this process);
each finished job is written into the JSON at once (temp file + os.replace), so a killed run
resumes by skipping finished jobs.  Per job: the training-batch reward and the clip fraction per
timestep of every iteration, the final LoRA's held-out reward (a fixed subset of the non-training
captions, fixed noise, sampled with the rule's own sampler; the base model's once per rule), wall time.

    python benchmarks/convergence_flow.py --json benchmarks/convergence_flow.json --workers 1
    python benchmarks/convergence_flow.py --report benchmarks/convergence_flow.json
    python benchmarks/convergence_flow.py --smoke --json /tmp/convergence_flow.json   # seconds

``--smoke``: the same code path on the smallest configuration (both rules, every arm, 1 seed,
1 iteration, 1 prompt x 2 samples, 4 steps, 1 held-out caption x 1 sample, in this process); a
fresh JSON (outside benchmarks/), non-zero exit on a non-finite result.

The report (per rule): iterations until the running mean (window 3) of the training-batch reward
reaches each target (budget + 1 if never), the final reward (mean of the last 3 iterations) and the
held-out reward, each with a 95% bootstrap CI over seeds, and the difference PCPO - baseline paired
by seed with its CI and the verdict "resolved" only when that CI excludes 0; then the clip fraction
per timestep.  ``--targets auto`` (default): the mean first-iteration batch reward of the rule's
jobs + 0.1, + 0.2 and + 0.3 (those below 0.97).  The statistics are benchmarks/convergence.py's.
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
from convergence import (arm_metrics, fmt_ci, paired_difference, print_arm_table,  # noqa: E402
                         print_clip_table, record_job, resume, stop_time, verdict)

ARMS = {"pcpo": "pcpo", "grpo-clip": "grpo-clip", "ddpo": "ddpo"}  # arm -> objective (native rollout for all)
BASELINES = ("grpo-clip", "ddpo")
RULES = {"constant": 0.3, "flow-grpo": 0.7}  # noise rule -> level (eta / a)
CONFIG_KEYS = ("steps", "scheduler", "cfg", "lr", "prompts_per_iteration", "group_size", "iterations",
               "train_fraction", "updates", "heldout_prompts", "heldout_samples", "heldout_seed", "arms", "rules",
               "levels")  # not "seeds": a resumed run may add seeds


# ----------------------------------------------------------------------------- the host (flow model)

def make_host(threads: int = 1):
    import torch
    torch.set_num_threads(threads)
    from _common import Host

    class FlowHost(Host):
        """benchmarks/_common.Host with the demo flow model instead of the diffusion demo model."""

        def __init__(self, threads: int = 1):
            super().__init__(threads)
            self.model, self.clip, self.vae = self.pack["demo"].load_demo_flow()

        def flow_rollout(self, sess, prompts, group_size, steps, seed, rule, level, scheduler, cfg):
            with torch.inference_mode():
                return self.N["PCPOTrajectorySampler"]().sample(sess, steps, cfg, group_size, seed, level, "native",
                                                                rule, scheduler, 32, 32, 1, prompts=prompts)

        def flow_heldout(self, sess, texts, samples, steps, scheduler, rule, level, cfg, seed):
            """The PCPO Held-out Evaluation node's computation (fixed noise from ``seed``), sampled with
            the rule's own stochastic sampler; returns (mean reward, KL to base)."""
            import comfy.samplers
            mod = sys.modules[self.N["PCPOHeldOutEvaluation"].__module__]
            enc = sys.modules[self.N["PCPOPrompts"].__module__].encode_text
            shape_for = sys.modules[self.N["PCPOTrajectorySampler"].__module__].latent_shape_for
            with torch.inference_mode():
                model = sess.model
                sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
                neg = enc(self.clip, "")
                conds = [(enc(self.clip, t), neg) for t in texts]
                lat, kl = mod.sample_heldout(sess, conds, shape_for(model, None, 32, 32), sig, level, cfg, samples,
                                             seed, flow_rule=rule)
                images = self.vae.decode(lat).float().cpu()
                prompts = [t for t in texts for _ in range(samples)]
                mean, _ = mod.mean_score(mod.reward_object("prompt-colour-agreement"), images, prompts)
            return mean, kl

    return FlowHost(threads)


def weight_table(host, steps, scheduler):
    """Per rule: the flow grid's native and PCPO (zeta dt) weights of every step."""
    import comfy.samplers
    from comfyui_pcpo.step_plan import flow_plan
    ms = host.model.get_model_object("model_sampling")
    ts = comfy.samplers.calculate_sigmas(ms, scheduler, steps).double().cpu()
    out = {}
    for rule, level in RULES.items():
        p = flow_plan(ts, rule, level, "native")
        wn, wp = p.w_native, p.w_loss
        st = p.trainable_steps()
        cand = st[st != p.num_steps - 1]
        out[rule] = {"level": level, "t": [float(x) for x in ts], "native": [float(x) for x in wn],
                     "pcpo": [float(x) for x in wp], "zeta": float(p.info["zeta"]),
                     "noise_level": [float(x) for x in p.noise_level], "candidates": [int(x) for x in cand]}
    return out


def print_weights(table):
    for rule, r in table.items():
        wn, wp = r["native"], r["pcpo"]
        print(f"{rule} rule (level {r['level']:g}), {len(wn)} steps on the shift-3 grid t = "
              f"{r['t'][0]:.3f} .. {r['t'][-2]:.3f} .. 0; zeta {r['zeta']:.3f}")
        print(f"  native weights: min {min(wn):.3f} max {max(wn):.3f} max/min {max(wn) / min(wn):.2f}   "
              f"PCPO zeta*dt: min {min(wp):.3f} max {max(wp):.3f} max/min {max(wp) / min(wp):.2f}")
        print("  step   t      noise  native   pcpo")
        for i, (a, b) in enumerate(zip(wn, wp)):
            print(f"  {i + 1:4d} {r['t'][i]:.4f} {r['noise_level'][i]:.4f} {a:7.3f} {b:7.3f}")


# ----------------------------------------------------------------------------- jobs

_HOST = None


def _worker_init(threads: int):
    global _HOST
    os.environ["OMP_NUM_THREADS"] = str(threads)
    _HOST = make_host(threads)


def run_job(job):
    key, cfg, stop_at = job
    host = _HOST
    t0 = time.time()
    if stop_at and t0 > stop_at:
        return key, None
    parts = key.split("/")
    rule = parts[0]
    level = cfg["levels"][rule]
    texts = host.heldout_captions(cfg["heldout_prompts"])
    if parts[1] == "base":
        sess = host.session(f"convflow_base_{rule}", cfg["lr"], seed=0)
        reward, kl = host.flow_heldout(sess, texts, cfg["heldout_samples"], cfg["steps"], cfg["scheduler"], rule,
                                       level, cfg["cfg"], cfg["heldout_seed"])
        return key, {"heldout_reward": reward, "heldout_kl": kl, "wall_s": time.time() - t0}
    arm, seed = parts[1], int(parts[2])
    sess = host.session(f"convflow_{rule}_{arm}_{seed}", cfg["lr"], seed=seed)
    prompts = host.prompts(cfg["prompts_per_iteration"], seed=seed)
    its = []
    for _ in range(cfg["iterations"]):
        lat, batch = host.flow_rollout(sess, prompts, cfg["group_size"], cfg["steps"], seed, rule, level,
                                       cfg["scheduler"], cfg["cfg"])
        st = host.update(sess, batch, host.score(lat, batch), objective=ARMS[arm],
                         train_fraction=cfg["train_fraction"], micro_batch=cfg["group_size"], updates=cfg["updates"])
        its.append({k: st.get(k) for k in ("reward_mean", "reward_std", "clip_fraction", "clip_fraction_per_step",
                                           "approx_kl", "grad_norm", "zero_std_groups", "pairs")})
    reward, kl = host.flow_heldout(sess, texts, cfg["heldout_samples"], cfg["steps"], cfg["scheduler"], rule, level,
                                   cfg["cfg"], cfg["heldout_seed"])
    return key, {"rule": rule, "arm": arm, "objective": ARMS[arm], "seed": seed,
                 "rewards": [i["reward_mean"] for i in its], "iterations": its,
                 "heldout_reward": reward, "heldout_kl": kl, "wall_s": time.time() - t0}


def run(args):
    global _HOST
    cfg = {"steps": args.steps, "scheduler": args.scheduler, "cfg": args.cfg, "lr": args.lr,
           "prompts_per_iteration": args.prompts_per_iteration, "group_size": args.group_size,
           "iterations": args.iterations, "train_fraction": args.train_fraction, "updates": args.updates,
           "heldout_prompts": args.heldout_prompts, "heldout_samples": args.heldout_samples,
           "heldout_seed": args.heldout_seed, "arms": args.arms.split(","), "rules": args.rules.split(","),
           "seeds": args.seeds, "levels": {r: RULES[r] for r in args.rules.split(",")}}
    data = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            data = json.load(f)
    host = make_host(args.threads)
    table = weight_table(host, args.steps, args.scheduler)
    print_weights(table)
    kept = {r: max(1, int(round(args.train_fraction * len(t["candidates"])))) for r, t in table.items()}
    for r in cfg["rules"]:
        print(f"{r}: every arm trains {kept[r]} of the {len(table[r]['candidates'])} candidate steps per sample "
              f"(train_fraction {args.train_fraction}; the last step excluded), a fresh random subset per micro-batch "
              "(the same native rollout for every arm)")
    if data:
        resume(data, cfg, CONFIG_KEYS, args.json, args.seeds)
    else:
        data = {"config": cfg, "weights": table, "trained_steps": {r: {"kept": kept[r],
                                                                       "candidates": len(table[r]["candidates"])}
                                                                   for r in table},
                "jobs": {}, "wall_s": 0.0}
    late = [a for a in args.late_arms.split(",") if a in cfg["arms"]] if args.late_arms else []
    keys = []
    for rule in cfg["rules"]:  # one rule completely (all seeds) before the next
        keys.append(f"{rule}/base")
        keys += [f"{rule}/{arm}/{s}" for s in range(args.seeds) for arm in cfg["arms"] if arm not in late]
        keys += [f"{rule}/{arm}/{s}" for s in range(args.seeds) for arm in late]
    todo = [k for k in keys if k not in data["jobs"]]
    print(f"{len(todo)} jobs to run on {args.workers} worker process(es), {args.threads} thread each", flush=True)
    t0, wall0, stop_at = time.time(), data.get("wall_s", 0.0), stop_time(args.stop_at)

    def done(key, res):
        record_job(data, key, res, args.json, wall0, t0, len(keys), width=22)

    if todo and args.workers <= 1:
        _HOST = host
        for key in todo:
            done(*run_job((key, cfg, stop_at)))
    elif todo:
        ctx = mp.get_context("spawn")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        with ctx.Pool(args.workers, initializer=_worker_init, initargs=(args.threads,)) as pool:
            for key, res in pool.imap_unordered(run_job, [(k, cfg, stop_at) for k in todo]):
                done(key, res)
    report(data, args.targets)
    return data


# ----------------------------------------------------------------------------- report

def verdict_n(low, high, n):
    """convergence.verdict, but never "resolved" from fewer than 3 paired seeds (a bootstrap over one or
    two seeds has no spread worth the name)."""
    return verdict(low, high) if n >= 3 else f"not resolved ({n} seed{'s' if n != 1 else ''})"


def report(data, targets="auto", bin_size: int = 3):
    cfg, jobs = data["config"], data["jobs"]
    budget = cfg["iterations"]
    print(f"\ndemo flow model (SD3-shaped MMDiT, pixel space), {cfg['scheduler']} grid at shift 3, {cfg['steps']} steps, "
          f"cfg {cfg['cfg']}, reward prompt-colour-agreement, lr {cfg['lr']}, {cfg['prompts_per_iteration']} prompts x "
          f"{cfg['group_size']} samples per iteration, {cfg['updates']} optimizer steps per rollout, train fraction "
          f"{cfg['train_fraction']}, budget {budget} iterations; wall {data.get('wall_s', 0) / 60:.1f} min")
    for rule in cfg["rules"]:
        w = data["weights"][rule]
        ts = data["trained_steps"][rule]
        arms = [a for a in cfg["arms"] if any(k.startswith(f"{rule}/{a}/") for k in jobs)]
        runs = {a: {jobs[k]["seed"]: jobs[k] for k in jobs if k.startswith(f"{rule}/{a}/")} for a in arms}
        # each arm on the seeds it shares with its comparison partner (pcpo with grpo-clip, a baseline with
        # pcpo), so an arm run later (--late-arms) or a run stopped early leaves no unpaired seed in the tables
        partner = {a: ("grpo-clip" if a == "pcpo" else "pcpo") for a in arms}
        runs = {a: {s: r for s, r in runs[a].items() if partner[a] not in runs or s in runs[partner[a]]}
                for a in arms}
        print(f"\n=== rule {rule} (level {w['level']:g}): native weights {min(w['native']):.3f}-{max(w['native']):.3f} "
              f"(max/min {max(w['native']) / min(w['native']):.1f}), PCPO zeta*dt {min(w['pcpo']):.3f}-"
              f"{max(w['pcpo']):.3f} (max/min {max(w['pcpo']) / min(w['pcpo']):.1f}), zeta {w['zeta']:.3f}; "
              f"{ts['kept']} of {ts['candidates']} candidate steps trained per sample; paired seeds per arm: "
              + (", ".join(f"{a} {len(runs[a])}" for a in arms) or "none (not run)"))
        if f"{rule}/base" in jobs:
            print(f"base model held-out reward: {jobs[f'{rule}/base']['heldout_reward']:.3f} ({cfg['heldout_prompts']} "
                  f"held-out captions x {cfg['heldout_samples']} samples, fixed noise, seed {cfg['heldout_seed']})")
        if not arms:
            continue
        if targets == "auto":
            first = statistics.fmean(r["rewards"][0] for a in arms for r in runs[a].values())
            tg = [round(first + d, 2) for d in (0.1, 0.2, 0.3) if first + d < 0.97]
            print(f"targets: mean first-iteration batch reward {first:.3f} + 0.1, 0.2, 0.3 (below 0.97)")
        else:
            tg = [float(t) for t in str(targets).split(",")]
        metrics, names = arm_metrics(runs, arms, tg)
        print_arm_table(runs, arms, metrics, names, budget, seeds_column=True)
        print("difference PCPO - baseline, paired by seed: mean [95% bootstrap CI]; verdict "
              "(iterations: negative = PCPO faster; rewards: positive = PCPO higher)")
        print("| comparison | metric | difference | seeds | verdict |")
        print("|---|---|---|---|---|")
        for b in BASELINES:
            if "pcpo" not in arms or b not in arms:
                continue
            for nm in names:
                m, lo, hi, n = paired_difference(metrics[(nm, "pcpo")], metrics[(nm, b)])
                print(f"| pcpo - {b} | {nm} | {fmt_ci(m, lo, hi, 1 if nm.startswith('iter') else 3)} | {n} | "
                      f"{verdict_n(lo, hi, n)} |")
        print(f"clip fraction per timestep (share of trained pairs whose hinge is off; mean over iterations and seeds; "
              f"bins of {bin_size} steps, step 1 = highest noise; the last step is never trained)")
        flat = print_clip_table(runs, arms, {a for a in arms if ARMS[a] == "ddpo"}, cfg["steps"], bin_size)
        if "pcpo" in flat and "grpo-clip" in flat:
            for i, nm in enumerate(("mean over steps", "std across steps")):
                m, lo, hi, n = paired_difference(flat["pcpo"][i], flat["grpo-clip"][i])
                print(f"clip fraction, pcpo - grpo-clip, {nm}: {fmt_ci(m, lo, hi)} ({n} seeds): {verdict_n(lo, hi, n)}")
        print("batch reward per iteration (mean over each arm's seeds above):")
        for a in arms:
            rs = [r["rewards"] for r in runs[a].values()]
            print(f"  {a:10s} " + " ".join(f"{statistics.fmean(c):.3f}" for c in zip(*rs)))
        walls = [r["wall_s"] for a in arms for r in runs[a].values()]
        print(f"job wall time: {min(walls):.0f}-{max(walls):.0f} s")
    missing = [r for r in cfg["rules"] if not any(k.startswith(f"{r}/") and k != f"{r}/base" for k in jobs)]
    for r in RULES:
        if r not in cfg["rules"]:
            missing.append(r)
    if missing:
        print(f"\nnot run: rule(s) {', '.join(sorted(set(missing)))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default="constant,flow-grpo", help="noise rules, in run order: " + ", ".join(RULES))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--targets", default="auto", help="'auto' or comma-separated target rewards")
    ap.add_argument("--report", default="", help="tabulate the raw results of an earlier --json run")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prompts-per-iteration", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--train-fraction", type=float, default=0.2,
                    help="share of the candidate steps trained per sample, the same for every arm")
    ap.add_argument("--updates", type=int, default=2, help="optimizer steps per rollout")
    ap.add_argument("--heldout-prompts", type=int, default=8)
    ap.add_argument("--heldout-samples", type=int, default=2)
    ap.add_argument("--heldout-seed", type=int, default=1234)
    ap.add_argument("--stop-at", default="", help="HH:MM UTC: start no job after this time (resume later)")
    ap.add_argument("--late-arms", default="", help="arms run only after every seed of the other arms of a rule "
                    "(e.g. ddpo: on a short budget the PCPO - grpo-clip pairs get the seeds first)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (1: in this process)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration, in seconds (see above)")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report(json.load(f), args.targets)
        return 0
    for r in args.rules.split(","):
        if r not in RULES:
            raise SystemExit(f"unknown rule {r!r}; choose from {', '.join(RULES)}")
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.seeds, args.iterations, args.prompts_per_iteration, args.group_size, args.steps = 1, 1, 1, 2, 4
        args.heldout_prompts, args.heldout_samples, args.workers = 1, 1, 1
    data = run(args)
    if not args.smoke:
        return 0
    return _smoke.finish(args.json, data, {f"{k} {m}": j[m] for k, j in data["jobs"].items()
                                            for m in ("rewards", "heldout_reward", "heldout_kl") if m in j})


if __name__ == "__main__":
    sys.exit(main())
