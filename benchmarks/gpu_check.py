"""One-shot GPU check: a few PCPO iterations through the real nodes on real-size models.

    python benchmarks/gpu_check.py                 # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --tiny          # the same code path on tiny models (runs on a CPU)
    python benchmarks/gpu_check.py --families sd15,sdxl --precisions bf16,fp16 --iterations 3 --json out.json

For each family (SD1.5 at 512 px, SDXL at 1024 px, FLUX.1-dev at 1024 px when the GPU has memory for
it; random weights, built through ComfyUI's own model classes and loaded as its loaders load them)
and each training precision, it runs PCPO LoRA -> Trajectory Sampler -> Reward Scorer -> LoRA Update
through the node classes, as ComfyUI's executor does (inside inference mode), with ComfyUI's
Dynamic VRAM patcher where the host enables it.  It prints per iteration the time, the peak VRAM,
the gradient norms and the first-update log-ratio (0 when the gradient pass replays the rollout
exactly), and exits non-zero on any failure: an error, a non-finite or all-zero gradient, a skipped
step in every update, or a first-update log-ratio above ``--max-log-ratio`` (GPU kernels may be
nondeterministic; the exact value is printed).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

GB = 1024 ** 3
FLUX_MIN_GB = 60  # FLUX.1-dev in bf16 plus activations of a 1024 px gradient pass


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models and 64 px images (a CPU dry run)")
    ap.add_argument("--families", default="sd15,sdxl,flux", help="comma list of sd15, sdxl, flux")
    ap.add_argument("--precisions", default="bf16,fp16", help="comma list of training precisions")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="sampling steps per rollout")
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--max-log-ratio", type=float, default=1e-3)
    ap.add_argument("--json", default=None, help="write the results here")
    return ap.parse_args(argv)


def load_host():
    import comfyui_host as host
    out = pathlib.Path(tempfile.mkdtemp(prefix="pcpo-gpu-check-"))
    host.load(install=False)  # prints "ComfyUI <version> at <path>"
    host.set_base_dirs(out / "comfyui")
    pack = host.load_pack_folder(ROOT, out / "custom_nodes", "comfyui-pcpo")
    if not pack.ok:
        raise RuntimeError("ComfyUI could not load the comfyui-pcpo node pack")
    import nodes
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("PCPO")}


def dynamic_vram() -> bool:
    try:
        import comfy.memory_management
        return bool(getattr(comfy.memory_management, "aimdo_enabled", False))
    except Exception:
        return False


def preview_images(model, latent):
    """A cheap RGB view of latents (ComfyUI's latent preview factors) to score, instead of a VAE."""
    fmt = model.model.latent_format
    f = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
    bias = getattr(fmt, "latent_rgb_factors_bias", None)
    rgb = torch.nn.functional.linear(fmt.process_in(latent.float()).movedim(1, -1), f.T,
                                     None if bias is None else torch.tensor(bias, dtype=torch.float32))
    return ((rgb + 1) / 2).clamp(0, 1)


def check_one(N, family: str, precision: str, a) -> dict:
    import _models
    import comfy.model_management as mm
    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    storage = torch.float32 if a.tiny and precision == "fp32" else {"fp16": torch.float16, "bf16": torch.bfloat16,
                                                                     "fp32": torch.float32}[precision]
    model, pos, neg = _models.build(family, tiny=a.tiny, dtype=storage, dynamic=dynamic_vram())
    size = _models.latent_size(family, a.tiny) * 8
    name = f"gpu_check_{family}_{precision}"
    rows, ok, why = [], True, []
    with torch.inference_mode():
        sess = N["PCPOLoRA"]().create(model, name, 16, 16.0, "attention", 1e-4, "AdamW", 0.0, 0, False,
                                      training_precision=precision, gradient_checkpointing=a.checkpointing)[1]
    info = {"family": family, "precision": precision, "compute": sess.options.precision.name,
            "checkpointing": sess.options.checkpointing, "dynamic_patcher": bool(getattr(model, "is_dynamic", lambda: False)()),
            "copy": getattr(sess.model, "pcpo_copy_strategy", "?"), "pixels": size, "device": str(dev)}
    for it in range(a.iterations):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            lat, batch = N["PCPOTrajectorySampler"]().sample(sess, a.steps, 4.0, a.group_size, it, 1.0 if family != "flux" else 0.7,
                                                             "uw-sigma", "constant", "simple", size, size, 1,
                                                             positive=pos, negative=neg)
            t1 = time.perf_counter()
            rewards = N["PCPORewardScorer"]().score(preview_images(model, lat["samples"]), batch, "brightness")[0]
            out = N["PCPOLoRAUpdate"]().update(sess, batch, rewards, "pcpo", 1e-4, 5.0, 0.5, 1, 1.0, 2, 1, 1)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        st = json.loads(out["result"][1])
        row = {"iteration": it + 1, "rollout_s": t1 - t0, "update_s": t2 - t1,
               "peak_vram_gb": torch.cuda.max_memory_allocated() / GB if cuda else float("nan"),
               "grad_norms": st["grad_norms"], "first_update_log_ratio": st["first_update_log_ratio"],
               "skipped_steps": st["skipped_steps"], "reward_mean": st["reward_mean"], "warnings": st["warnings"]}
        rows.append(row)
        print(f"  {family:5s} {precision:4s} it {it + 1}: rollout {row['rollout_s']:7.2f} s  update {row['update_s']:7.2f} s  "
              f"peak VRAM {row['peak_vram_gb']:6.2f} GB  grad norms {', '.join(f'{g:.3g}' for g in row['grad_norms'])}  "
              f"log-ratio {row['first_update_log_ratio']:.3g}  skipped {row['skipped_steps']}", flush=True)
        if not all(math.isfinite(g) for g in st["grad_norms"]) or not any(g > 0 for g in st["grad_norms"]):
            ok, _ = False, why.append(f"iteration {it + 1}: gradient norms {st['grad_norms']}")
        if st["skipped_steps"] >= len(st["grad_norms"]):
            ok, _ = False, why.append(f"iteration {it + 1}: every step skipped (fp16 overflow)")
        if not st["first_update_log_ratio"] <= a.max_log_ratio:
            ok, _ = False, why.append(f"iteration {it + 1}: first-update log-ratio {st['first_update_log_ratio']:.3g}")
    sess.state.history.clear()
    del sess
    mm.unload_all_models()
    mm.soft_empty_cache()
    return {**info, "ok": ok, "problems": why, "iterations": rows}


def main(argv=None) -> int:
    a = parse(argv)
    torch.manual_seed(0)
    N = load_host()
    import comfy.model_management as mm
    dev = mm.get_torch_device()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        print(f"device: {props.name}, {props.total_memory / GB:.0f} GB; Dynamic VRAM: {'on' if dynamic_vram() else 'off'}")
        total_gb = props.total_memory / GB
    else:
        print(f"device: {dev} (no GPU: {'tiny dry run' if a.tiny else 'real-size models on a CPU are slow'})")
        total_gb = float("inf")
    results, failed = [], False
    for family in [f for f in a.families.split(",") if f]:
        if family == "flux" and not a.tiny and total_gb < FLUX_MIN_GB:
            print(f"  flux skipped: {total_gb:.0f} GB < {FLUX_MIN_GB} GB")
            continue
        for precision in [p for p in a.precisions.split(",") if p]:
            try:
                r = check_one(N, family, precision, a)
            except Exception as e:  # report and go on with the next configuration
                traceback.print_exc()
                r = {"family": family, "precision": precision, "ok": False, "problems": [f"{type(e).__name__}: {e}"]}
            results.append(r)
            failed |= not r["ok"]
            print(f"{family} {precision}: {'OK' if r['ok'] else 'FAILED: ' + '; '.join(r['problems'])}", flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"device": str(dev), "results": results}, indent=1, default=str))
    print("gpu check:", "FAILED" if failed else "all OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
