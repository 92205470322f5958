"""PCPO vs the DanceGRPO-style clipped-ratio baseline (and DDPO) on the embedded demo model.

Same prompts, seeds, learning rate, batch and budget for every objective; several seeds.  Prints,
per objective, the iterations needed for the running mean (window 3) of the training-batch reward
to reach the target (median and range over seeds; runs that never reach it count as the budget +
1), the ratio baseline / PCPO, the final reward, and the clip fraction per timestep.

    python benchmarks/convergence.py --seeds 3 --iterations 20 --targets 0.72,0.75,0.78 --json out.json
    python benchmarks/convergence.py --report out.json --targets 0.70,0.72,0.75   # re-tabulate a run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import Host


def smoothed(rewards):
    return [sum(rewards[max(0, i - 2): i + 1]) / len(rewards[max(0, i - 2): i + 1]) for i in range(len(rewards))]


def iterations_to(rewards, target):
    """First iteration whose running mean (window 3) reaches ``target``; budget + 1 if never."""
    return next((i + 1 for i, r in enumerate(smoothed(rewards)) if r >= target), len(rewards) + 1)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default="pcpo,grpo-clip,ddpo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--targets", default="0.72,0.75,0.78", help="comma-separated target rewards")
    ap.add_argument("--report", default="", help="tabulate the raw results of an earlier --json run")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--prompts-per-iteration", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="also write the raw results here")
    args = ap.parse_args()
    args.targets = [float(t) for t in args.targets.split(",")]
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        res = saved["results"]
        for k in ("lr", "prompts_per_iteration", "group_size", "steps", "iterations"):
            setattr(args, k, saved["args"][k])
        report(res, args)
        return
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
    main()
