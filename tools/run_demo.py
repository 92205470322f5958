"""The demo: PCPO aligns the embedded tiny text-to-image model on a CPU, through the shipped
workflow ``workflows/api/demo_tiny_pcpo.json`` executed by a real ComfyUI (in this process).

    bash tools/demo.sh                 # sets up .venv, then runs this script
    python tools/run_demo.py --iterations 25 --threads 2 --out outputs/demo

Every iteration is one execution of the workflow (Trajectory Sampler -> VAE Decode -> Reward
Scorer -> PCPO LoRA Update -> Export LoRA), what the LoRA Update node's re-queue does in the
ComfyUI app (here each execution is a press of the iterations left, so the run's target stays put).  Afterwards the exported LoRA is loaded back through ComfyUI's normal LoRA loader and
the base and aligned models are compared on all 90 captions with the same noise.  Outputs (printed
at the end): the LoRA, a before/after image grid, a reward-curve plot and summary.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import comfyui_host as host  # noqa: E402

WORKFLOW = ROOT / "workflows" / "api" / "demo_tiny_pcpo.json"
PACK_NAME = "comfyui-pcpo"


def load_host(out: pathlib.Path):
    """Import ComfyUI (``comfyui_host.load``), point its folders into ``out`` and load this repository
    as a custom node pack; returns (folders, {"session"|"demo"|"sampler": pack module})."""
    host.load(extra_nodes=False, install=False)  # tools/env.sh installed the tree's requirements
    dirs = host.set_base_dirs(out / "comfyui")
    logging.getLogger().setLevel(logging.ERROR)  # keep ComfyUI's start-up chatter out of the demo output
    host.load()  # the comfy_extras nodes
    loaded = host.load_pack_folder(ROOT, out / "custom_nodes", PACK_NAME)
    if not loaded.ok:
        raise RuntimeError("ComfyUI could not load the comfyui-pcpo node pack (see the log above)")
    pack = {name: loaded.module(f"nodes.{name}") for name in ("session", "demo", "sampler")}
    return dirs, pack


def execute(executor, prompt: dict, extra_data: dict) -> None:
    try:
        host.execute_prompt(prompt, executor=executor, extra_data=extra_data)
    except host.PromptError as e:
        err = e.details if isinstance(e.details, dict) else {}
        if "node_type" in err:
            raise RuntimeError(f"the demo workflow failed in node {err.get('node_type')}: "
                               f"{err.get('exception_message')}") from e
        raise RuntimeError(f"the demo workflow failed: {e}") from e


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, clip, vae, prompts, seed: int, steps: int, cfg: float, sampler_fn):
    """Sample every prompt once with fixed noise; return (images (B,H,W,3), rewards (B,), colour ok (B,))."""
    import torch
    import comfy.sample
    import comfy.samplers
    from comfyui_pcpo.rewards import score
    from comfyui_pcpo.rewards.colour import colour_analysis

    pos = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])
    neg = clip.encode_from_tokens(clip.tokenize("")).repeat(len(prompts), 1, 1)
    latent = torch.zeros(len(prompts), 3, 32, 32)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    sampler = comfy.samplers.KSAMPLER(sampler_fn, {"eta": 1.0, "variant": "native", "flow_noise_rule": "constant"})
    with torch.inference_mode():
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, [[pos, {}]], [[neg, {}]], latent,
                                         disable_pbar=True, seed=seed)
        images = vae.decode(out).float().cpu()
    rewards = score("prompt-colour-agreement", images, prompts)
    ok = colour_analysis(images, prompts)["dominant_correct"] > 0.5
    return images, rewards, ok


def save_grid(path, before, after, prompts, n: int = 24, cols: int = 4, scale: int = 3):
    """Pairs (before | after) of the first ``n`` prompts, ``cols`` pairs per row, captions below."""
    from PIL import Image, ImageDraw

    n = min(n, len(prompts))
    cell = 32 * scale
    pair_w, pair_h = 2 * cell + 6, cell + 30
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (pair_w + 16) + 8, rows * (pair_h + 10) + 28), (24, 24, 24))
    d = ImageDraw.Draw(canvas)
    d.text((8, 8), "each pair: before (base model) | after (PCPO LoRA), same prompt and noise", fill=(230, 230, 230))
    for k in range(n):
        x0 = 8 + (k % cols) * (pair_w + 16)
        y0 = 28 + (k // cols) * (pair_h + 10)
        for j, imgs in enumerate((before, after)):
            arr = (imgs[k].clamp(0, 1).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (x0 + j * (cell + 6), y0))
        words = prompts[k].replace(" background", "").split(" on ")
        d.text((x0, y0 + cell + 3), words[0], fill=(210, 210, 210))
        if len(words) > 1:
            d.text((x0, y0 + cell + 15), "on " + words[1].replace("a ", "", 1) + " background", fill=(160, 160, 160))
    canvas.save(path)


def save_curve(path, train_rewards, before: float, after: float, label: str = "evaluation"):
    from PIL import Image, ImageDraw

    W, H, m = 640, 360, 48
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vals = list(train_rewards) + [before, after]
    lo, hi = min(vals) - 0.02, max(vals) + 0.02
    n = max(len(train_rewards), 2)

    def xy(i, v):
        return m + (W - 2 * m) * i / (n - 1), H - m - (H - 2 * m) * (v - lo) / (hi - lo)

    d.line([(m, H - m), (W - m, H - m)], fill="black")
    d.line([(m, m), (m, H - m)], fill="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        d.text((4, xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
    for i in range(0, n, max(1, n // 10)):
        x = xy(i, lo)[0]
        d.line([(x, H - m), (x, H - m + 4)], fill="black")
        d.text((x - 4, H - m + 6), str(i + 1), fill="black")
    d.text((W // 2 - 40, H - m + 22), "iteration", fill="black")
    d.text((m, 12), f"prompt-colour agreement: training batches (dots), running mean of 5 (line), {label}",
           fill="black")
    for v, colour, name in ((before, (200, 60, 60), "before"), (after, (40, 140, 40), "after")):
        y = xy(0, v)[1]
        d.line([(m, y), (W - m, y)], fill=colour)
        d.text((W - m - 70, y - 14), f"{name} {v:.3f}", fill=colour)
    pts = [xy(i, v) for i, v in enumerate(train_rewards)]
    for p in pts:
        d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(120, 150, 220))
    run = [sum(train_rewards[max(0, i - 4): i + 1]) / len(train_rewards[max(0, i - 4): i + 1])
           for i in range(len(train_rewards))]
    if len(run) > 1:
        d.line([xy(i, v) for i, v in enumerate(run)], fill=(30, 60, 190), width=3)
    img.save(path)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=30, help="PCPO iterations (workflow executions)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder")
    ap.add_argument("--objective", default=None, help="override the workflow's objective (pcpo, grpo-clip, ddpo)")
    ap.add_argument("--eval-prompts", type=int, default=90, help="captions in the before/after evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-iteration", type=int, default=None, help="override the workflow's value")
    ap.add_argument("--group-size", type=int, default=None, help="override the workflow's value")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(max(1, args.threads))
    t_start = time.time()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dirs, pack = load_host(out)
    session_mod, demo_mod, sampler_mod = pack["session"], pack["demo"], pack["sampler"]
    print(f"ComfyUI loaded with the comfyui-pcpo pack ({time.time() - t_start:.1f} s)", flush=True)

    prompt = json.loads(WORKFLOW.read_text())
    upd = next(k for k, v in prompt.items() if v["class_type"] == "PCPOLoRAUpdate")
    sess_node = next(k for k, v in prompt.items() if v["class_type"] == "PCPOLoRA")
    exp_node = next(k for k, v in prompt.items() if v["class_type"] == "PCPOExportLoRA")
    samp_node = next(k for k, v in prompt.items() if v["class_type"] == "PCPOTrajectorySampler")
    run_name = prompt[sess_node]["inputs"]["run_name"]
    prompt[samp_node]["inputs"]["seed"] = args.seed
    if args.objective:
        prompt[upd]["inputs"]["objective"] = args.objective
    prompts_node = next(k for k, v in prompt.items() if v["class_type"] == "PCPOPrompts")
    if args.prompts_per_iteration:
        prompt[prompts_node]["inputs"]["prompts_per_iteration"] = args.prompts_per_iteration
    if args.group_size:
        prompt[samp_node]["inputs"]["group_size"] = args.group_size
        prompt[upd]["inputs"]["micro_batch"] = min(prompt[upd]["inputs"]["micro_batch"], args.group_size)
    shutil.rmtree(os.path.join(dirs["output"], "pcpo", run_name), ignore_errors=True)  # a fresh run
    session_mod.SESSIONS.pop(run_name, None)

    executor = host.new_executor()
    inp = prompt[upd]["inputs"]
    print(f"training: {args.iterations} iterations x {prompt[prompts_node]['inputs']['prompts_per_iteration']} prompts x "
          f"{prompt[samp_node]['inputs']['group_size']} samples, objective {inp['objective']}", flush=True)
    t_train = time.time()
    # With no server queue to re-queue on, each execution is a press of the remaining iterations: the
    # run's target stays --iterations (checkpoints fall where the app's loop puts them).
    for it in range(args.iterations):
        t0 = time.time()
        inp["iterations_per_queue"] = args.iterations - it
        execute(executor, prompt, {})
        h = session_mod.SESSIONS[run_name].history[-1]
        print(f"iter {h['iteration']:3d}/{args.iterations}  reward {h['reward_mean']:.3f} ± {h['reward_std']:.3f}  "
              f"clip fraction {h['clip_fraction']:.3f}  kl {h['approx_kl']:.1e}  ({time.time() - t0:.1f} s)", flush=True)
    train_s = time.time() - t_train
    sess = session_mod.SESSIONS[run_name]

    # the exported LoRA, loaded back through ComfyUI's normal path
    import comfy.sd
    import comfy.utils
    lora_path = pathlib.Path(dirs["loras"]) / (prompt[exp_node]["inputs"]["filename"] + ".safetensors")
    lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    not_loaded = []

    class _Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "lora key not loaded" in msg or "NOT LOADED" in msg:
                not_loaded.append(msg)

    handler = _Catch()
    logging.getLogger().addHandler(handler)
    base, clip, vae = demo_mod.load_demo()
    tuned = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]
    logging.getLogger().removeHandler(handler)

    from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS, all_specs
    train_set = set(TRAINING_CAPTIONS)
    prompts = [s.text for s in all_specs()][: args.eval_prompts]
    steps, cfg = prompt[samp_node]["inputs"]["steps"], prompt[samp_node]["inputs"]["cfg"]
    img_b, r_b, ok_b = evaluate(base, clip, vae, prompts, 12345, steps, cfg, sampler_mod.pcpo_sample)
    img_a, r_a, ok_a = evaluate(tuned, clip, vae, prompts, 12345, steps, cfg, sampler_mod.pcpo_sample)
    in_train = torch.tensor([p in train_set for p in prompts])

    grid = out / "before_after.png"
    curve = out / "reward_curve.png"
    show = [i for i, p in enumerate(prompts) if p in train_set] + [i for i, p in enumerate(prompts) if p not in train_set]
    save_grid(grid, img_b[show], img_a[show], [prompts[i] for i in show])
    if in_train.any():  # the training batches draw training captions: compare with those
        save_curve(curve, [h["reward_mean"] for h in sess.history], float(r_b[in_train].mean()),
                   float(r_a[in_train].mean()), f"evaluation on the {int(in_train.sum())} training captions")
    else:
        save_curve(curve, [h["reward_mean"] for h in sess.history], float(r_b.mean()), float(r_a.mean()))
    summary = {
        "iterations": args.iterations, "objective": inp["objective"], "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1), "threads": args.threads,
        "eval_prompts": len(prompts), "eval_reward_before": float(r_b.mean()), "eval_reward_after": float(r_a.mean()),
        "colour_correct_before": float(ok_b.float().mean()), "colour_correct_after": float(ok_a.float().mean()),
        "train_captions_eval": int(in_train.sum()),
        "eval_reward_before_train_captions": float(r_b[in_train].mean()) if in_train.any() else None,
        "eval_reward_after_train_captions": float(r_a[in_train].mean()) if in_train.any() else None,
        "eval_reward_before_other_captions": float(r_b[~in_train].mean()) if (~in_train).any() else None,
        "eval_reward_after_other_captions": float(r_a[~in_train].mean()) if (~in_train).any() else None,
        "lora": str(lora_path), "lora_keys": len(lora), "lora_keys_not_loaded": len(not_loaded),
        "train_reward_first": sess.history[0]["reward_mean"], "train_reward_last": sess.history[-1]["reward_mean"],
        "history": sess.history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"evaluation on {len(prompts)} captions, same noise, {steps} steps, cfg {cfg}:")
    print(f"  prompt-colour agreement  before {summary['eval_reward_before']:.3f}  after {summary['eval_reward_after']:.3f}")
    if in_train.any() and (~in_train).any():
        print(f"    the {int(in_train.sum())} training captions  before {summary['eval_reward_before_train_captions']:.3f}"
              f"  after {summary['eval_reward_after_train_captions']:.3f};  the other {int((~in_train).sum())}  before "
              f"{summary['eval_reward_before_other_captions']:.3f}  after {summary['eval_reward_after_other_captions']:.3f}")
    print(f"  shape has the prompted colour  before {100 * summary['colour_correct_before']:.0f}%  "
          f"after {100 * summary['colour_correct_after']:.0f}%")
    print(f"  exported LoRA reloaded through ComfyUI: {len(lora)} tensors, {len(not_loaded)} keys not loaded")
    print(f"outputs:\n  LoRA          {lora_path}\n  before/after  {grid}\n  reward curve  {curve}\n"
          f"  summary       {out / 'summary.json'}")
    print(f"done in {time.time() - t_start:.0f} s (training {train_s:.0f} s)")
    return 0 if not not_loaded else 1


if __name__ == "__main__":
    sys.exit(main())
