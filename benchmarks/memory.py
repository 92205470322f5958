"""Peak memory of one PCPO gradient pass on real-size SD1.5 (512 px) and SDXL (1024 px) UNets with
random weights in bf16, on the CPU, with and without gradient checkpointing, next to a bare
forward+backward of the same model through the same ComfyUI model call.

    python benchmarks/memory.py                       # all configurations, results in benchmarks/memory.json
    python benchmarks/memory.py --families sd15        # a subset; finished configurations are kept (resumable)
    python benchmarks/memory.py --table                # re-tabulate the saved JSON
    python benchmarks/memory.py --smoke --json /tmp/memory.json   # 2 configurations on tiny models, seconds

Each configuration runs in a fresh process.  The weights are created as ordinary frozen tensors,
so training shares them (a model from ComfyUI's loaders would get a trainable copy first: a second
set of weights, not part of the pass).  After the model is built and the LoRA attached, the process's peak resident set (``VmHWM``) is reset (``/proc/self/clear_refs``),
one pass runs (micro-batch 1, one timestep, cfg 4: cond and uncond batched, as ComfyUI samples),
and the peak above that baseline is the pass's memory.  "ours" is the LoRA Update node's gradient
pass (two samples of a group, one trained timestep each, so two passes; the peak is per pass);
"bare" is one forward+backward of ``mean(prediction)`` through ``run_in_guider``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import _smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "memory.json"
GB = 1024 ** 3
# SDXL at 1024 px without checkpointing needs more than this 24 GB machine has: only with it
CONFIGS = [("sd15", m, ck) for ck in ("off", "on") for m in ("bare", "ours")] + \
    [("sdxl", m, "on") for m in ("bare", "ours")]
# the smoke mode: each pass, each checkpointing setting and each family once, on the tiny models
SMOKE_CONFIGS = [("sd15", "bare", "off"), ("sdxl", "ours", "on")]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(family: str, mode: str, checkpointing: str, threads: int, tiny: bool = False) -> dict:
    """One configuration's pass (``tiny``: the tiny model of the family at 64 px, the smoke mode)."""
    import torch
    torch.set_num_threads(threads)
    import gpu_check
    import _models
    N = gpu_check.load_host()
    from comfyui_pcpo.rewards import score  # noqa: F401  (registry import before measuring)
    model, pos, neg = _models.build(family, tiny=tiny, dtype=torch.bfloat16, as_loaded=False)  # one weights copy
    size = _models.latent_size(family, tiny)
    with torch.inference_mode():
        sess = N["PCPOLoRA"]().create(model, f"mem_{family}", 16, 16.0, "attention", 1e-4, "AdamW", 0.0, 0, False,
                                      training_precision="bf16", gradient_checkpointing=checkpointing)[1]
    import sys as _s
    hooks = [m for k, m in _s.modules.items() if k.endswith("comfyui-pcpo.nodes.model_hooks")][0]
    latent = (4, size, size)
    weights = sum(p.numel() * p.element_size() for p in sess.model.model.parameters())
    hooks.load_for_training(sess.model, latent, 1)
    if mode == "bare":
        def run():
            def fn(predict):
                x = torch.randn(1, *latent)
                s = torch.full((1,), 5.0)
                predict(x, s).float().mean().backward()
            with hooks.training_mode():
                hooks.run_in_guider(sess.model, pos, neg, 4.0, (1, *latent), torch.tensor([14.6, 5.0, 0.0]), fn)
    else:
        from comfyui_pcpo.step_plan import diffusion_plan
        from comfyui_pcpo.rollout import make_trajectory
        sig = torch.tensor([14.6146, 5.0, 0.0292], dtype=torch.float64)
        plan = diffusion_plan(sig, eta=1.0, variant="uw-sigma")
        rec = {"latents": torch.randn(2, 3, *latent), "eps_old": torch.randn(2, 2, *latent),
               "pred_old": torch.randn(2, 2, *latent)}
        traj = make_trajectory([rec], plan, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), [""],
                               {"eta": 1.0})
        S = [m for k, m in _s.modules.items() if k.endswith("comfyui-pcpo.nodes.sampler")][0]
        R = [m for k, m in _s.modules.items() if k.endswith("comfyui-pcpo.nodes.reward")][0]
        batch = S.RolloutBatch(traj, [(pos, neg)], 4.0, latent, sess.run_name, sess.iteration, "mem", sess.family,
                               sess.token)
        rewards = R.Rewards(torch.tensor([0.6, 0.4], dtype=torch.float64), "memory", "mem")

        def run():
            with torch.inference_mode():
                N["PCPOLoRAUpdate"]().update(sess, batch, rewards, "pcpo", 1e-4, 5.0, 1.0, 1, 1.0, 1, 1, 100)
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"family": family, "mode": mode, "checkpointing": checkpointing == "on", "pixels": size * 8,
            "weights_gb": weights / GB, "baseline_rss_gb": base / GB, "peak_above_baseline_gb": (peak - base) / GB,
            "seconds": seconds, "passes": 1 if mode == "bare" else 2, "threads": threads, "tiny": tiny}


def table(results: list) -> str:
    lines = ["| model | pass | checkpointing | weights (GB) | peak above loaded model (GB) | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['family']} {r['pixels']} px | {r['mode']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['weights_gb']:.2f} | {r['peak_above_baseline_gb']:.2f} | {r['seconds']:.0f} |")
    by = {(r["family"], r["mode"], r["checkpointing"]): r for r in results}
    lines.append("")
    for fam in ("sd15", "sdxl"):
        for ck in (False, True):
            bare, ours = by.get((fam, "bare", ck)), by.get((fam, "ours", ck))
            if bare and ours:
                lines.append(f"{fam}, checkpointing {'on' if ck else 'off'}: ours / bare forward+backward = "
                             f"{ours['peak_above_baseline_gb'] / bare['peak_above_baseline_gb']:.2f}")
        on, off = by.get((fam, "ours", True)), by.get((fam, "ours", False))
        if on and off:
            lines.append(f"{fam}: checkpointing on / off = {on['peak_above_baseline_gb'] / off['peak_above_baseline_gb']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", action="store_true", help="only print the table of the saved results")
    ap.add_argument("--json", default="", help="results file, kept and resumed (default benchmarks/memory.json)")
    ap.add_argument("--smoke", action="store_true", help="both passes, both checkpointing settings and both "
                    "families once, on the tiny models at 64 px, one thread, in seconds; needs --json outside "
                    "benchmarks/")
    ap.add_argument("--one", nargs=3, metavar=("FAMILY", "MODE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(*a.one, threads=a.threads, tiny=a.tiny)), flush=True)
        return 0
    if a.smoke:
        a.json, a.threads = _smoke.json_path(a.json), 1
    path = pathlib.Path(a.json or RESULTS)
    results = json.loads(path.read_text()) if path.exists() else []
    failed = 0
    if not a.table:
        done = {(r["family"], r["mode"], r["checkpointing"]) for r in results}
        for fam, mode, ck in (SMOKE_CONFIGS if a.smoke else CONFIGS):
            if fam not in a.families.split(",") or (fam, mode, ck == "on") in done:
                continue
            print(f"running {fam} {mode} checkpointing {ck} ...", flush=True)
            p = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--one", fam, mode, ck]
                               + (["--tiny"] if a.smoke else []),
                               capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(f"  failed (exit {p.returncode}): {p.stderr[-1500:]}", flush=True)
                failed += 1
                continue
            results.append(json.loads(line[len("RESULT "):]))
            path.write_text(json.dumps(results, indent=1))
            print("  " + json.dumps(results[-1]), flush=True)
    print(table(results))
    if a.smoke:
        finite = {f"{r['family']} {r['mode']} checkpointing {r['checkpointing']} {k}": r[k] for r in results
                  for k in ("weights_gb", "peak_above_baseline_gb", "seconds")}
        return _smoke.finish(str(path), results, finite) or int(failed > 0)
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
