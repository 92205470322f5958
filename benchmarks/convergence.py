"""PCPO vs the DanceGRPO-style clipped-ratio baseline (and DDPO) on the embedded demo model.

Same prompts, seeds, learning rate, batch and budget for every objective; several seeds.  Prints,
per objective, the iterations needed for the running mean (window 3) of the training-batch reward
to reach the target (median and range over seeds; runs that never reach it count as the budget +
1), the ratio baseline / PCPO, the final reward, and the clip fraction per timestep.

    python benchmarks/convergence.py --seeds 3 --iterations 20 --target 0.80
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import Host


def run(host, objective, seed, args):
    sess = host.session(f"conv_{objective}_{seed}", args.lr, seed=seed)
    prompts = host.prompts(args.prompts_per_iteration, seed=seed)
    rewards, clip_steps = [], []
    for _ in range(args.iterations):
        lat, batch = host.rollout(sess, prompts, args.group_size, steps=args.steps, seed=seed)
        st = host.update(sess, batch, host.score(lat, batch), objective=objective, micro_batch=args.group_size)
        rewards.append(st["reward_mean"])
        clip_steps.append(st["clip_fraction_per_step"])
    smooth = [sum(rewards[max(0, i - 2): i + 1]) / len(rewards[max(0, i - 2): i + 1]) for i in range(len(rewards))]
    hit = next((i + 1 for i, r in enumerate(smooth) if r >= args.target), args.iterations + 1)
    per_step = [statistics.fmean([c[j] for c in clip_steps if c[j] == c[j]] or [float("nan")])
                for j in range(len(clip_steps[0]))]
    return {"iterations_to_target": hit, "final_smoothed": smooth[-1], "rewards": rewards, "clip_per_step": per_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default="pcpo,grpo-clip,ddpo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--prompts-per-iteration", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="also write the raw results here")
    args = ap.parse_args()
    host = Host(args.threads)
    t0 = time.time()
    res = {}
    for obj in args.objectives.split(","):
        res[obj] = []
        for s in range(args.seeds):
            r = run(host, obj, s, args)
            res[obj].append(r)
            print(f"{obj:10s} seed {s}: iterations to {args.target} = {r['iterations_to_target']:3d}, "
                  f"final (smoothed) {r['final_smoothed']:.3f}  [{time.time() - t0:.0f} s]", flush=True)
    print()
    print(f"demo model, reward prompt-colour-agreement, lr {args.lr}, {args.prompts_per_iteration} prompts x "
          f"{args.group_size} samples, {args.steps} steps, budget {args.iterations} iterations, target {args.target}")
    print(f"{'objective':10s} | {'median iters':>12s} | {'range':>9s} | {'final reward':>12s}")
    med = {}
    for obj, runs in res.items():
        its = [r["iterations_to_target"] for r in runs]
        med[obj] = statistics.median(its)
        fin = statistics.fmean(r["final_smoothed"] for r in runs)
        print(f"{obj:10s} | {med[obj]:12.1f} | {min(its):3d} - {max(its):3d} | {fin:12.3f}")
    if "pcpo" in med:
        for obj in med:
            if obj != "pcpo":
                print(f"ratio {obj} / pcpo (median iterations): {med[obj] / med['pcpo']:.2f}")
    print("clip fraction per timestep (mean over iterations and seeds; last step not trained):")
    for obj, runs in res.items():
        n = len(runs[0]["clip_per_step"])
        row = [statistics.fmean([r["clip_per_step"][j] for r in runs if r["clip_per_step"][j] == r["clip_per_step"][j]]
                                or [float("nan")]) for j in range(n)]
        print(f"  {obj:10s} " + " ".join(f"{v:.2f}" for v in row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
