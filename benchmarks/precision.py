"""Precision of the two log-ratio forms: analytic (ours, every objective) vs the difference of two
log-probabilities (the reference code bases; the baselines' ``log_ratio="difference"``).

a. Error study.  A real rollout of the embedded demo model (fp32), then one real grpo-clip update
   through the LoRA Update node: the second optimizer pass of that update sees pred_new after one
   AdamW step (lr ``--lr``), the perturbation the hinge decides on.  Every (sample, step) pair of
   that pass is recorded and its log rho recomputed: float64 reference, and per working dtype
   (float32, bf16, fp16) and form:
     analytic-f32   D from the dtype's predictions, M in float32 (what the trainer runs)
     analytic-wd    the same formula, every operation in the working dtype
     difference     the reference code bases: mean mu = a x_t - c pred in the working dtype,
                    log-densities in float32 (DanceGRPO; latents in the working dtype)
     difference-f32 inputs rounded to the working dtype, all arithmetic float32 (DDPO / Flow-GRPO)
     difference-wd  also the log-densities in the working dtype (worst case)
   Errors against float64 on the same (dtype-rounded) predictions: median / max |error|, median
   relative error, per timestep bin, share of pairs whose sign of rho - 1 flips, and share whose
   clip decision (rho outside [1 - xi, 1 + xi]) or hinge gate (xi|A| - A(rho - 1) < 0) differs.
   Also the total error against float64 of the fp32 predictions (includes the 16-bit rounding of
   the model output, which both forms share).

b. Training effect.  grpo-clip runs through the nodes (training_precision fp32 / bf16 / fp16,
   log_ratio analytic / difference), same seeds: reward per iteration, clip fraction,
   log_approx_error, log_ratio_gap (|used log rho - analytic|), non-finite values, and the LoRA
   weights' relative distance to the fp32-analytic run of the same seed (and, for a difference run,
   to the analytic run of the same precision) after the first and the last iteration.  fp16 runs
   few iterations by default: fp16 compute on a CPU is 20-50x slower than bf16.

    python benchmarks/precision.py --json benchmarks/precision.json
    python benchmarks/precision.py --report benchmarks/precision.json      # tables of a finished run
    python benchmarks/precision.py --smoke --json /tmp/precision.json      # seconds: the smallest configuration

``--smoke``: one 3-step error grid and one 1-iteration training run per (precision, form), 1 prompt
x 2 samples, 3 steps; a fresh JSON (outside benchmarks/), non-zero exit on a non-finite result.

Resumable: with --json, finished parts are kept and skipped on a re-run.  One thread.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

import _smoke
from _common import Host

F64 = torch.float64
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREC = {"float32": "fp32", "bf16": "bf16", "fp16": "fp16"}
FORMS = ("analytic-f32", "analytic-wd", "difference", "difference-f32", "difference-wd")


# ----------------------------------------------------------------------------- node plumbing

def update_module():
    """The pack's nodes.update module as ComfyUI loaded it."""
    for name, m in list(sys.modules.items()):
        if name.endswith("nodes.update") and isinstance(m.__dict__.get("PCPOLoRAUpdate"), type):
            return m
    raise RuntimeError("the PCPO LoRA Update node module is not loaded")


@contextlib.contextmanager
def log_ratio_form(form: str):
    """The LoRA Update node builds its PCPOConfig with ``log_ratio=form`` (the node has no input for it)."""
    mod = update_module()
    orig = mod.PCPOConfig
    mod.PCPOConfig = lambda **kw: orig(**kw, log_ratio=form)
    try:
        yield
    finally:
        mod.PCPOConfig = orig


@contextlib.contextmanager
def recording(store: list):
    """Record every ObjectiveInputs the trainer builds; the update itself runs the analytic form."""
    import comfyui_pcpo.trainer as T
    orig = T.get_objective

    def get(name):
        fn = orig(name)

        def rec(inp, **kw):
            store.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inp.__dict__.items()})
            kw.pop("log_ratio", None)
            kw.pop("work_dtype", None)
            return fn(inp, **kw)
        return rec
    T.get_objective = get
    try:
        yield
    finally:
        T.get_objective = orig


def session(host, name, precision, lr, seed):
    host.pack["session"].SESSIONS.pop(name, None)
    return host.N["PCPOLoRA"]().create(host.model, name, 8, 8.0, "attention+mlp", lr, "AdamW", 0.0, seed, False,
                                       training_precision=precision)[1]


def rollout(host, sess, prompts, group, steps, seed, variant):
    with torch.inference_mode():
        return host.N["PCPOTrajectorySampler"]().sample(sess, steps, 4.0, group, seed, 1.0, variant, "constant",
                                                        "simple", 32, 32, 1, prompts=prompts)


def update(host, sess, batch, rewards, train_fraction, group):
    with torch.inference_mode():
        out = host.N["PCPOLoRAUpdate"]().update(sess, batch, rewards, "grpo-clip", 1e-4, 5.0, train_fraction, group,
                                                1.0, 2, 1, 10 ** 6)
    return json.loads(out["result"][1])


# ----------------------------------------------------------------------------- a. error study

def record_pairs(host, steps, variant, args):
    """Inputs of the second (off-policy) pass of one real grpo-clip update, float64, concatenated."""
    sess = session(host, f"prec_rec_{steps}", "fp32", args.lr, 0)
    prompts = host.prompts(args.prompts, seed=0)
    lat, batch = rollout(host, sess, prompts, args.group, steps, 0, variant)
    rewards = host.score(lat, batch)
    store = []
    with recording(store), log_ratio_form("difference"):
        update(host, sess, batch, rewards, 1.0, args.group)
    second = store[len(store) // 2:]  # 2 updates, the same number of calls each
    keys = ("advantages", "pred_new", "pred_old", "x_t", "x_prev", "mean_x", "mean_pred", "std", "w_native",
            "step_index")
    rec = {k: torch.cat([r[k] for r in second]).to(F64 if k != "step_index" else torch.long) for k in keys}
    plan = batch.traj.plan
    return rec, plan


def _rows(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def log_ratios(rec, wd):
    """{form: log rho (P,) float64} in working dtype ``wd`` and the float64 reference of the same
    ``wd``-rounded predictions; ``ref_exact``: float64 of the fp32 predictions."""
    from comfyui_pcpo.objectives import ObjectiveInputs, difference_log_ratio, neg_log_ratio
    x_t, x_prev = rec["x_t"], rec["x_prev"]
    # the kernel's own weight w = c / s (equal to the plan's w_native up to its float32 rounding)
    a, c, s = rec["mean_x"], rec["mean_pred"], rec["std"]
    w = c / s
    pn, po = rec["pred_new"].to(wd).to(F64), rec["pred_old"].to(wd).to(F64)
    # eps_old that makes x_prev = mu_old + s eps_old hold exactly in float64 (both forms agree there)
    eps = (x_prev - (_rows(a, x_t) * x_t - _rows(c, x_t) * po)) / _rows(s, x_t)
    out = {"ref": -neg_log_ratio(pn - po, eps, w)}
    eps_x = (x_prev - (_rows(a, x_t) * x_t - _rows(c, x_t) * rec["pred_old"])) / _rows(s, x_t)
    out["ref_exact"] = -neg_log_ratio(rec["pred_new"] - rec["pred_old"], eps_x, w)
    f = torch.float32
    out["analytic-f32"] = -neg_log_ratio(pn.to(f) - po.to(f), eps.to(f), w.to(f))
    out["analytic-wd"] = -neg_log_ratio(pn.to(wd) - po.to(wd), eps.to(wd), w.to(wd))

    def inp(xt, xp, p_new, p_old):
        return ObjectiveInputs(rec["advantages"], p_new, p_old, eps, w, w, x_t=xt, x_prev=xp, mean_x=a,
                               mean_pred=c, std=s)
    out["difference"] = difference_log_ratio(inp(x_t, x_prev, pn, po), wd)
    r = lambda t: t.to(wd).to(f)  # noqa: E731  (inputs rounded to wd, arithmetic float32)
    out["difference-f32"] = difference_log_ratio(inp(r(x_t), r(x_prev), r(pn), r(po)), f)
    out["difference-wd"] = difference_log_ratio(inp(x_t, x_prev, pn, po), wd, density_dtype=wd)
    return {k: v.detach().to(F64) for k, v in out.items()}


def _q(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))] if v else float("nan")


def error_table(rec, plan, xi, bins):
    A = rec["advantages"]
    steps = rec["step_index"]
    S = plan.num_steps
    edges = [round(i * S / bins) for i in range(bins + 1)]
    res = {"pairs": int(A.numel()), "latent_elements": int(rec["pred_new"][0].numel()), "dtypes": {}}
    ref_exact = None
    for name, wd in DTYPES.items():
        lr = log_ratios(rec, wd)
        ref_exact = lr["ref_exact"]
        ref = lr["ref"]
        rows = {}
        for form in FORMS:
            v = lr[form]
            finite = torch.isfinite(v)
            # a non-finite log rho (fp16 overflow) counts in the rates (as a flip / disagreement) and in
            # non_finite; the error statistics are over the finite pairs
            err = (v - ref).abs()
            rel = err / ref.abs().clamp_min(1e-300)
            flip = (torch.sign(v) != torch.sign(ref)) | ~finite
            clip = (((v.exp() - 1).abs() > xi) != ((ref.exp() - 1).abs() > xi)) | ~finite
            gate = (((xi * A.abs() - A * (v.exp() - 1)) < 0) != ((xi * A.abs() - A * (ref.exp() - 1)) < 0)) | ~finite
            per_bin = []
            for b in range(bins):
                m = (steps >= edges[b]) & (steps < edges[b + 1])
                mf = m & finite
                if m.any():
                    per_bin.append({"steps": [edges[b], edges[b + 1] - 1], "pairs": int(m.sum()),
                                    "median_abs_error": float(err[mf].median()) if mf.any() else float("nan"),
                                    "median_rel_error": float(rel[mf].median()) if mf.any() else float("nan"),
                                    "median_abs_log_rho": float(ref[m].abs().median()),
                                    "median_std": float(rec["std"][m].median()),
                                    "sign_flip_rate": float(flip[m].double().mean()),
                                    "non_finite": int((m & ~finite).sum())})
            # decisions against those of the fp32 model's predictions (includes the 16-bit output rounding)
            t_flip = (torch.sign(v) != torch.sign(ref_exact)) | ~finite
            t_gate = (((xi * A.abs() - A * (v.exp() - 1)) < 0)
                      != ((xi * A.abs() - A * (ref_exact.exp() - 1)) < 0)) | ~finite
            ef, rf = err[finite], rel[finite]
            rows[form] = {
                "median_abs_error": float(ef.median()), "max_abs_error": float(ef.max()),
                "median_rel_error": float(rf.median()), "p90_rel_error": _q(rf.tolist(), 0.9),
                "total_median_abs_error": float((v - ref_exact)[finite].abs().median()),
                "total_sign_flip_rate": float(t_flip.double().mean()),
                "total_gate_disagreement": float(t_gate.double().mean()),
                "sign_flip_rate": float(flip.double().mean()), "clip_disagreement": float(clip.double().mean()),
                "gate_disagreement": float(gate.double().mean()), "non_finite": int((~finite).sum()),
                "per_bin": per_bin}
        res["dtypes"][name] = {"median_abs_log_rho": float(ref.abs().median()),
                               "max_abs_log_rho": float(ref.abs().max()),
                               "input_rounding_median_abs": float((ref - ref_exact).abs().median()),
                               "forms": rows}
    res["median_abs_log_rho_exact"] = float(ref_exact.abs().median())
    res["share_abs_log_rho_below_xi"] = float((ref_exact.abs() < xi).double().mean())
    res["float64_forms_gap"] = float((log_ratios(rec, F64)["difference"] - ref_exact).abs().max())
    return res


def print_errors(name, r):
    print(f"\n== error study: {name}  ({r['pairs']} pairs, {r['latent_elements']} latent elements; median |log rho| "
          f"{r['median_abs_log_rho_exact']:.3g}, {100 * r['share_abs_log_rho_below_xi']:.0f}% below xi; float64 "
          f"forms agree to {r['float64_forms_gap']:.1e})")
    print("against float64 of the same (dtype-rounded) predictions | total: against float64 of the fp32 predictions")
    print(f"{'dtype':8} {'form':15} {'med |err|':>10} {'max |err|':>10} {'med rel':>9} "
          f"{'sign flip':>9} {'clip dis.':>9} {'gate dis.':>9} {'non-fin':>7} | {'total med':>10} {'flip':>6} "
          f"{'gate':>6}")
    for dt, d in r["dtypes"].items():
        for form, x in d["forms"].items():
            print(f"{dt:8} {form:15} {x['median_abs_error']:10.2e} {x['max_abs_error']:10.2e} "
                  f"{x['median_rel_error']:9.2e} {100 * x['sign_flip_rate']:8.1f}% "
                  f"{100 * x['clip_disagreement']:8.1f}% {100 * x['gate_disagreement']:8.1f}% {x['non_finite']:7d} | "
                  f"{x['total_median_abs_error']:10.2e} {100 * x.get('total_sign_flip_rate', float('nan')):5.1f}% "
                  f"{100 * x.get('total_gate_disagreement', float('nan')):5.1f}%")
    for dt in ("bf16", "fp16"):
        d = r["dtypes"][dt]
        bins = d["forms"]["analytic-f32"]["per_bin"]
        print(f"per timestep bin, {dt}: median |err| (median |err| / |log rho|)")
        print(f"{'steps':>8} {'std':>8} {'|log rho|':>10}" + "".join(f" {f:>20}" for f in FORMS))
        for i, b in enumerate(bins):
            cells = [d["forms"][f]["per_bin"][i] for f in FORMS]
            print(f"{b['steps'][0]:>3}-{b['steps'][1]:<4} {b['median_std']:8.3g} {b['median_abs_log_rho']:10.2e}"
                  + "".join(f" {c['median_abs_error']:9.2e} ({c['median_rel_error']:7.1e})" for c in cells))


# ----------------------------------------------------------------------------- b. training effect

def train_run(host, precision, form, seed, iterations, args, prompts_n, group, store):
    """``store``: {"<precision>/<form>/<seed>": {iteration: LoRA weight vector}}; this run adds its
    own and reports after every iteration its relative distance to the fp32-analytic run of the
    same seed and, for a difference run, to the analytic run of the same precision."""
    sess = session(host, f"prec_{precision}_{form}_{seed}", precision, args.lr, seed)
    prompts = host.prompts(prompts_n, seed=seed)
    out = {"reward": [], "clip_fraction": [], "log_approx_error": [], "log_ratio_gap": [], "approx_kl": [],
           "grad_norm": [], "skipped_steps": 0, "non_finite": 0, "weight_rel_distance": [],
           "weight_rel_distance_to_analytic": []}
    mine = store.setdefault(f"{precision}/{form}/{seed}", {})

    def dist(w, key, it):
        w0 = store.get(key, {}).get(it)
        return None if w0 is None else float((w - w0).norm() / w0.norm())
    t0 = time.time()
    with log_ratio_form(form):
        for _ in range(iterations):
            lat, batch = rollout(host, sess, prompts, group, args.steps, seed, "uw-sigma")
            st = update(host, sess, batch, host.score(lat, batch), args.train_fraction, group)
            for k in ("clip_fraction", "log_approx_error", "log_ratio_gap", "approx_kl", "grad_norm"):
                v = st.get(k)
                out[k].append(v)
                out["non_finite"] += int(v is None or not math.isfinite(v))
            out["reward"].append(st["reward_mean"])
            out["skipped_steps"] += int(st.get("skipped_steps", 0))
            w = torch.cat([p.detach().flatten().double().cpu() for p in sess.params()])
            out["non_finite"] += int(not bool(torch.isfinite(w).all()))
            it = len(out["reward"])
            mine[it] = w
            out["weight_rel_distance"].append(dist(w, f"fp32/analytic/{seed}", it))
            out["weight_rel_distance_to_analytic"].append(dist(w, f"{precision}/analytic/{seed}", it))
    out["seconds"] = time.time() - t0
    host.pack["session"].SESSIONS.pop(sess.run_name, None)
    return out


def summarize_training(runs):
    """Per config: mean reward per iteration over seeds, mean clip fraction etc., weight distance."""
    out = {}
    for key, per_seed in runs.items():
        rs = list(per_seed.values())
        dist = [r["weight_rel_distance"][-1] for r in rs if r["weight_rel_distance"][-1] is not None]
        dist_a = [r["weight_rel_distance_to_analytic"][-1] for r in rs
                  if r["weight_rel_distance_to_analytic"][-1] is not None]
        its = len(rs[0]["reward"])
        flat = lambda k: [v for r in rs for v in r[k] if v is not None]  # noqa: E731
        out[key] = {
            "seeds": len(rs), "iterations": its,
            "reward_per_iteration": [statistics.fmean(r["reward"][i] for r in rs) for i in range(its)],
            "final_reward": statistics.fmean(r["reward"][-1] for r in rs),
            "clip_fraction": statistics.fmean(flat("clip_fraction")),
            "log_approx_error": statistics.fmean(flat("log_approx_error")),
            "log_ratio_gap": statistics.fmean(flat("log_ratio_gap")),
            "approx_kl": statistics.fmean(flat("approx_kl")),
            "non_finite": sum(r["non_finite"] for r in rs), "skipped_steps": sum(r["skipped_steps"] for r in rs),
            "weight_rel_distance_to_fp32_analytic": dist,
            "weight_rel_distance_to_same_precision_analytic": dist_a,
            "after_first_iteration": {
                "to_fp32_analytic": [r["weight_rel_distance"][0] for r in rs],
                "to_same_precision_analytic": [r["weight_rel_distance_to_analytic"][0] for r in rs]},
            "seconds_per_iteration": statistics.fmean(r["seconds"] / its for r in rs),
        }
    return out


def print_training(summary):
    print("\n== training effect: grpo-clip, analytic vs difference log-ratio")
    print(f"{'precision/form':18} {'seeds':>5} {'its':>3} {'final R':>8} {'clip':>6} {'log-approx err':>14} "
          f"{'|lr - analytic|':>15} {'non-fin':>7} {'skipped':>7} {'s/it':>6}  |W - W_ref| / |W_ref| per seed")
    for key, s in summary.items():
        d = ", ".join(f"{x:.1e}" for x in s["weight_rel_distance_to_fp32_analytic"])
        da = ", ".join(f"{x:.1e}" for x in s["weight_rel_distance_to_same_precision_analytic"])
        print(f"{key:18} {s['seeds']:5d} {s['iterations']:3d} {s['final_reward']:8.4f} {s['clip_fraction']:6.3f} "
              f"{s['log_approx_error']:14.2e} {s['log_ratio_gap']:15.2e} {s['non_finite']:7d} {s['skipped_steps']:7d} "
              f"{s['seconds_per_iteration']:6.1f}  ref fp32/analytic: {d}"
              + (f"; ref {key.split('/')[0]}/analytic: {da}" if key.endswith("difference") and
                 not key.startswith("fp32") else ""))
        f = s["after_first_iteration"]
        print(f"{'':18} after iteration 1: ref fp32/analytic "
              + ", ".join("-" if x is None else f"{x:.1e}" for x in f["to_fp32_analytic"])
              + (f"; ref {key.split('/')[0]}/analytic " + ", ".join("-" if x is None else f"{x:.1e}"
                                                                  for x in f["to_same_precision_analytic"])
                 if key.endswith("difference") and not key.startswith("fp32") else ""))
        print(f"{'':22} rewards: " + " ".join(f"{r:.3f}" for r in s["reward_per_iteration"]))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="write the results here (and resume from it)")
    ap.add_argument("--report", default="", help="print the tables of an earlier --json run")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate (the demo's)")
    ap.add_argument("--xi", type=float, default=1e-4)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per rollout")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--grids", default="50:native,10:uw-sigma", help="error-study grids, steps:variant")
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="training runs: steps per rollout")
    ap.add_argument("--train-fraction", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--fp16-seeds", type=int, default=1, help="fp16 on CPU is ~50x slower than bf16")
    ap.add_argument("--fp16-iterations", type=int, default=1)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration, in seconds (see above)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.grids, args.bins, args.prompts, args.group, args.steps = "3:uw-sigma", 2, 1, 2, 3
        args.seeds = args.iterations = args.fp16_seeds = args.fp16_iterations = 1
        args.skip_training = False
    if args.report:
        res = json.load(open(args.report))
        for name, r in res.get("errors", {}).items():
            print_errors(name, r)
        if res.get("training"):
            print_training(summarize_training(res["training"]))
        return 0
    res = json.load(open(args.json)) if args.json and os.path.exists(args.json) else {}
    res.setdefault("errors", {})
    res.setdefault("training", {})
    res["args"] = vars(args)
    res["torch"] = torch.__version__

    def save():
        if args.json:
            _smoke.save_atomic(args.json, res)

    host = Host(threads=1)
    for grid in args.grids.split(","):
        steps, variant = grid.split(":")
        name = f"{steps} steps, eta 1, {variant}"
        if name not in res["errors"]:
            t0 = time.time()
            rec, plan = record_pairs(host, int(steps), variant, args)
            res["errors"][name] = error_table(rec, plan, args.xi, args.bins)
            res["errors"][name]["seconds"] = time.time() - t0
            save()
        print_errors(name, res["errors"][name])
    if not args.skip_training:
        plan = [("fp32", f, s, args.iterations) for s in range(args.seeds) for f in ("analytic", "difference")]
        plan += [("bf16", f, s, args.iterations) for s in range(args.seeds) for f in ("analytic", "difference")]
        plan += [("fp16", f, s, args.fp16_iterations) for s in range(args.fp16_seeds)
                 for f in ("analytic", "difference")]
        # every run's LoRA weights per iteration (the references of the distances), kept for resuming
        wpath = os.path.join(tempfile.gettempdir(), os.path.basename(args.json or "precision") + ".weights.pt")
        resumable = args.json and not args.smoke  # a smoke run starts afresh and leaves no weights file
        store = torch.load(wpath) if resumable and os.path.exists(wpath) else {}
        for prec, form, seed, its in plan:
            key = f"{prec}/{form}"
            if str(seed) in res["training"].get(key, {}) and f"{key}/{seed}" in store:
                continue
            r = train_run(host, prec, form, seed, its, args, args.prompts, args.group, store)
            if resumable:
                torch.save(store, wpath)
            res["training"].setdefault(key, {})[str(seed)] = r
            print(f"{key} seed {seed}: rewards {' '.join(f'{x:.3f}' for x in r['reward'])}, "
                  f"{r['seconds']:.0f} s", flush=True)
            save()
        print_training(summarize_training(res["training"]))
    save()
    if not args.smoke:
        return 0
    finite = {f"{name} {dt} {form} median_abs_error": x["median_abs_error"]
              for name, r in res["errors"].items() for dt, d in r["dtypes"].items() for form, x in d["forms"].items()
              if dt != "fp16" or form.startswith("analytic")}  # fp16 difference forms may overflow (counted)
    finite.update({f"{key} {k}": s[k] for key, s in summarize_training(res["training"]).items()
                   for k in ("final_reward", "clip_fraction", "log_approx_error", "approx_kl")})
    return _smoke.finish(args.json, res, finite)


if __name__ == "__main__":
    sys.exit(main())
