"""Overhead of the PCPO machinery against bare baselines, measured in one run on the demo model.

1. One PCPO update (PCPO LoRA Update node: ComfyUI guider, conditioning, CFG, analytic log-ratio,
   hinge, backward) vs a bare PyTorch forward + backward of the same UNet (LoRA wrappers active)
   over the same micro-batches, CFG-doubled batch and timesteps.  Target: within 5%.
2. The Trajectory Sampler (recording the rollout) vs ComfyUI's own ``euler_ancestral`` through
   ``comfy.sample.sample_custom`` for the same groups, steps and cfg.  Target: within 5%.

    python benchmarks/overhead.py --repeats 3
    python benchmarks/overhead.py --smoke --json /tmp/overhead.json   # seconds: 1 group x 2, 3 steps, 1 repeat
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import _smoke
from _common import Host


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--smoke", action="store_true",
                    help="the same measurement on the smallest configuration (1 group x 2 samples, 3 steps, "
                         "1 repeat), in seconds; needs --json outside benchmarks/")
    args = ap.parse_args(argv)
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.repeats, args.prompts, args.group_size, args.steps = 1, 1, 2, 3
    host = Host(args.threads)
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    sess = host.session("overhead", 1e-3)
    prompts = host.prompts(args.prompts)
    lat, batch = host.rollout(sess, prompts, args.group_size, steps=args.steps)
    rewards = host.score(lat, batch)
    traj = batch.traj
    G = args.group_size
    K = len([s for s in traj.plan.trainable_steps().tolist() if s != traj.num_steps - 1])

    # -- 1. update vs bare forward+backward ------------------------------------------------------
    stats = []  # the PCPO update's stats of every call (warm-up included)

    def ours_update():
        # re-use one rollout for every repeat: rewind the run's iteration counter (RunState.iteration,
        # which only RunState.commit advances) to the rollout's, so the update node accepts it again
        sess.state.iteration = batch.iteration
        stats.append(host.update(sess, batch, rewards, objective="pcpo", train_fraction=1.0, micro_batch=G,
                                 updates=1))

    model = sess.model
    comfy.model_management.load_models_gpu([model])
    dm = model.model.diffusion_model
    ms = model.get_model_object("model_sampling")
    ctx = {g: torch.cat([c[0][0][0], c[1][0][0]]).clone() for g, c in enumerate(batch.group_conds)}
    params = sess.params()

    def bare_update():
        with torch.inference_mode(False), torch.enable_grad():
            for g in range(len(batch.group_conds)):
                rows = torch.nonzero(traj.group_ids == g).flatten()
                for j in range(K):
                    x = traj.latents[rows, j].clone()
                    sigma = traj.plan.sigmas[j].float().expand(len(rows))
                    xin = ms.calculate_input(sigma, x)
                    t = ms.timestep(sigma)
                    out = dm(torch.cat([xin, xin]), torch.cat([t, t]), context=ctx[g].repeat_interleave(len(rows), 0))
                    (out * out.detach()).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for p in params:
                p.grad = None

    # -- 2. trajectory sampler vs euler_ancestral ----------------------------------------------
    def ours_sampler():
        host.rollout(sess, prompts, G, steps=args.steps)

    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", args.steps).cpu()
    ea = comfy.samplers.sampler_object("euler_ancestral")
    conds = [(host.clip.encode_from_tokens_scheduled(host.clip.tokenize(p)),
              host.clip.encode_from_tokens_scheduled(host.clip.tokenize(""))) for p in prompts.draw(0)]

    def comfy_sampler():
        with torch.inference_mode():
            for pos, neg in conds:
                latent = torch.zeros(G, 3, 32, 32)
                noise = comfy.sample.prepare_noise(latent, 0)
                comfy.sample.sample_custom(model, noise, 4.0, ea, sigmas, pos, neg, latent, disable_pbar=True, seed=0)

    ours_update(), bare_update(), ours_sampler(), comfy_sampler()  # warm-up
    rows = []
    for name, a, b in (("PCPO update vs bare fwd+bwd", ours_update, bare_update),
                       ("Trajectory Sampler vs euler_ancestral", ours_sampler, comfy_sampler)):
        ta, tb = [], []
        for _ in range(args.repeats):  # interleaved, so machine load affects both alike
            ta += timed(a, 1)
            tb += timed(b, 1)
        rows.append((name, statistics.median(ta), statistics.median(tb)))
    unet = sum(p.numel() for p in dm.parameters())
    print(f"demo model (UNet {unet / 1e6:.2f} M params), {args.prompts} groups x {G}"
          f" samples, {args.steps} steps ({K} trained per sample), cfg 4, threads {args.threads}, "
          f"median of {args.repeats}")
    print(f"{'comparison':40s} | {'ours s':>8s} | {'baseline s':>10s} | {'ratio':>6s}")
    for name, a, b in rows:
        print(f"{name:40s} | {a:8.3f} | {b:10.3f} | {a / b:6.3f}")
    if not args.json:
        return 0
    data = {"config": {"unet_params": unet, "groups": args.prompts, "group_size": G, "steps": args.steps,
                       "trained_steps_per_sample": K, "cfg": 4.0, "threads": args.threads, "repeats": args.repeats,
                       "smoke": args.smoke},
            "rows": [{"comparison": name, "ours_s": a, "baseline_s": b, "ratio": a / b} for name, a, b in rows],
            "updates": [{k: st[k] for k in ("reward_mean", "reward_std", "grad_norm", "approx_kl", "pairs")}
                        for st in stats],
            "run_history": len(sess.history)}
    finite = {f"{r['comparison']} {k}": r[k] for r in data["rows"] for k in ("ours_s", "baseline_s", "ratio")}
    finite.update({f"update {i} {k}": v for i, st in enumerate(data["updates"]) for k, v in st.items()})
    return _smoke.finish(args.json, data, finite)


if __name__ == "__main__":
    sys.exit(main())
