#!/usr/bin/env python
"""A reward-hacking run on the embedded demo model, caught by the PCPO Reward Guard.

The demo model is trained for ``brightness`` (hackable: whitening the image raises it) with a high
learning rate, through the real nodes in ComfyUI (PCPO LoRA -> Trajectory Sampler -> VAE Decode ->
Reward Scorer -> LoRA Update -> Held-out Evaluation -> Reward Guard -> Dashboard).  The held-out
evaluation scores 2 captions that are not trained on with brightness and with ``saturation`` as the
guard reward; when saturation falls by the margin the guard rolls LoRA and optimizer state back to
the best state and lowers the learning rate.  Prints every iteration and the guard's log, and writes
the dashboard, ``metrics.jsonl`` and ``guard.json`` into the run folder (the path is printed).

    python tools/guard_demo.py --iterations 12 --out outputs/guard_demo
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

TRAIN = "a red circle on a blue background\na green square on a yellow background\na blue triangle on a red background"
HELDOUT = "a yellow circle on a green background\na red square on a blue background"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate (high on purpose)")
    ap.add_argument("--every", type=int, default=2, help="held-out evaluation every this many iterations")
    ap.add_argument("--guard-margin", type=float, default=0.03, help="saturation drop that trips the guard")
    ap.add_argument("--action", default="lower_lr", choices=("stop", "lower_lr", "continue"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "guard_demo"))
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(max(1, args.threads))
    from run_demo import load_host
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dirs, pack = load_host(out)
    import nodes as comfy_nodes
    N = comfy_nodes.NODE_CLASS_MAPPINGS
    run = "guard_demo"
    shutil.rmtree(pathlib.Path(dirs["output"]) / "pcpo" / run, ignore_errors=True)
    pack["session"].SESSIONS.pop(run, None)
    model, clip, vae = N["PCPODemoModelLoader"]().load()
    with torch.inference_mode():
        sess = N["PCPOLoRA"]().create(model, run, 4, 4.0, "attention", args.lr, "AdamW", 0.0, 0, False)[1]
        prompts = N["PCPOPrompts"]().build(clip, TRAIN, "(none)", "", 2, 0)[0]
    for _ in range(args.iterations):
        t0 = time.time()
        with torch.inference_mode():
            lat, batch = N["PCPOTrajectorySampler"]().sample(sess, 8, 3.0, 4, 0, 1.0, "uw-sigma", "constant",
                                                             "simple", 32, 32, 2, prompts=prompts)
            rw, _ = N["PCPORewardScorer"]().score(vae.decode(lat["samples"]), batch, "brightness")
            up = N["PCPOLoRAUpdate"]().update(sess, batch, rw, "pcpo", 1e-4, 5.0, 1.0, 4, 1.0, 2, 1, 1)
            held = N["PCPOHeldOutEvaluation"]().evaluate(
                sess, clip, vae, HELDOUT, "", args.every, 2, 8, 3.0, 1.0, "simple", 32, 32, 7, "brightness",
                "saturation", stats=up["result"][1])
            guard = N["PCPORewardGuard"]().guard(sess, held["result"][0], 0.05, args.guard_margin, 0.0, args.action,
                                                 0.5, f"pcpo/{run}_best", "fp32")
            N["PCPODashboard"]().render(sess, 1024, 768, stats=guard["result"][0])
        s = json.loads(up["result"][1])
        print(f"iter {sess.iteration:3d}  train brightness {s['reward_mean']:.3f}  {held['ui']['text'][0]}  "
              f"| {guard['ui']['text'][0]}  ({time.time() - t0:.1f} s)", flush=True)
        if json.loads(guard["result"][0]).get("rollback", {}) and args.action == "stop":
            break
    print(f"run folder: {sess.run_dir} (dashboard.png, metrics.jsonl, guard.json)")
    print(json.dumps(json.loads((pathlib.Path(sess.run_dir) / "guard.json").read_text()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
