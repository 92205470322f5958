#!/usr/bin/env python
"""Train the embedded demo *flow* model: a tiny SD3-shaped rectified-flow MMDiT (ComfyUI's own
``mmdit`` class, the one ``comfy.model_base.SD3`` builds) in 32x32 pixel space, on the same
procedurally generated captioned shapes as the diffusion demo model, conditioned by the diffusion
demo's text encoder (the shipped weights, frozen: not trained here, not shipped twice).

Reproduce the shipped weights (one CPU thread, deterministic):

    python tools/train_demo_flow_model.py --steps 1200 --ckpt-every 100
    python tools/train_demo_flow_model.py --export /tmp/pcpo_demo_flow_ckpt/step_XXXXX.pt

Loss: rectified flow, x_t = (1 - t) x0 + t noise, target v = noise - x0 (what ComfyUI's
ModelSamplingDiscreteFlow/CONST expects: denoised = x_t - t v), mean squared error.  Time t: SD3's
logit-normal (u = sigmoid(n), n ~ N(0, 1)) pushed through the model's shift 3 (t = 3u / (1 + 2u)),
so training time is spent where the shifted 16-step sampling grid spends it; the model's timestep
input is 1000 t (multiplier 1000).  Classifier-free guidance: 10% of captions dropped to "".

Every ``--ckpt-every`` steps a checkpoint is written and evaluated: prompt-colour agreement of one
image per caption (all 90 captions, and the 29 RL training captions) with the deterministic 16-step
Euler sampler on the shift-3 grid, cfg 4, fixed noise.  Nothing depends on the total step count
(constant learning rate after warm-up), so the checkpoint at step k equals ``--steps k``; the
shipped checkpoint is the one that leaves RL headroom (agreement about 0.5-0.7 on the training
captions), exported with ``--export``.  Writes ``tools/train_demo_flow_model.log``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
LOG_PATH = os.path.join(ROOT, "tools", "train_demo_flow_model.log")


def build_mmdit(unet_config: dict, init: bool = True):
    """ComfyUI's MMDiT (the SD3 wrapper) with the given config, float32 on CPU; DiT-style init:
    PyTorch default init of linears/convs/norms, zero adaLN modulations and output layer, fixed
    2-d sin-cos position embedding."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed_torch

    m = OpenAISignatureMMDITWrapper(**unet_config, dtype=torch.float32, device="cpu",
                                    operations=comfy.ops.disable_weight_init)
    nn = torch.nn
    with torch.no_grad():
        if init:
            for mod in m.modules():
                for cls in (nn.Conv2d, nn.Linear, nn.LayerNorm):
                    if isinstance(mod, cls):
                        cls.reset_parameters(mod)
                        break
            for name, mod in m.named_modules():
                if name.endswith("adaLN_modulation"):
                    nn.init.zeros_(mod[-1].weight)
                    nn.init.zeros_(mod[-1].bias)
            nn.init.zeros_(m.final_layer.linear.weight)
            nn.init.zeros_(m.final_layer.linear.bias)
        g = unet_config["pos_embed_max_size"]
        m.pos_embed.copy_(get_2d_sincos_pos_embed_torch(m.hidden_size, g, g).reshape(1, -1, m.hidden_size))
    return m


@torch.no_grad()
def euler_sample(model, cond, uncond, noise, steps: int = 16, cfg_scale: float = 4.0, shift: float = 3.0):
    """Deterministic Euler on the shifted grid t_i = shift(linspace(1, 0, steps + 1))."""
    from comfyui_pcpo.demo.flow_model import shift_time

    ts = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    x = noise
    n = x.shape[0]
    for i in range(steps):
        t = float(ts[i])
        tt = torch.full((2 * n,), t * 1000.0)
        v_c, v_u = model(torch.cat([x, x]), tt, context=torch.cat([cond, uncond])).chunk(2)
        x = x + float(ts[i + 1] - ts[i]) * (v_u + cfg_scale * (v_c - v_u))
    return x


def evaluate(model, enc, tok, seed: int = 0, steps: int = 16, cfg_scale: float = 4.0, shift: float = 3.0):
    """{"all90": ..., "training29": ...}: prompt-colour agreement etc., one image per caption."""
    from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS, all_specs
    from comfyui_pcpo.rewards.colour import colour_analysis

    out = {}
    model.eval()
    for name, prompts in (("all90", [s.text for s in all_specs()]), ("training29", list(TRAINING_CAPTIONS))):
        n = len(prompts)
        with torch.no_grad():
            cond, uncond = enc(tok(prompts)), enc(tok([""] * n))
        noise = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed + i))
                             for i in range(n)])
        x = euler_sample(model, cond, uncond, noise, steps, cfg_scale, shift)
        images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()
        a = colour_analysis(images, prompts)
        out[name] = {"mean_reward": round(float(a["reward"].mean()), 4),
                     "dominant_colour_correct": round(float(a["dominant_correct"].mean()), 4),
                     "background_correct": round(float(a["background_correct"].mean()), 4),
                     "n_images": n}
    model.train()
    return out


def save_shipped(sd: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    from comfyui_pcpo.demo import flow_model as F

    save_file({k: v.contiguous().float() for k, v in sd.items()}, F.FLOW_WEIGHTS_PATH,
              metadata={"format": "pt", "model": "comfyui-pcpo demo flow (tiny pixel-space SD3-shaped MMDiT)",
                        "prediction_type": meta["prediction_type"],
                        "sampling_settings": json.dumps(meta["sampling_settings"]),
                        "unet_config": json.dumps(meta["unet_config"]),
                        "training_steps": str(meta["training_steps"]), "seed": str(meta["seed"])})
    with open(F.FLOW_CONFIG_PATH, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for p in (F.FLOW_WEIGHTS_PATH, F.FLOW_CONFIG_PATH):
        os.chmod(p, 0o644)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint + evaluation every N steps (0: none)")
    ap.add_argument("--ckpt-dir", default="/tmp/pcpo_demo_flow_ckpt")
    ap.add_argument("--log", default=LOG_PATH)
    ap.add_argument("--export", default=None, help="write the shipped files from this checkpoint and exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    import train_demo_model as T

    T.prepare_comfy_import()
    from comfyui_pcpo.demo import flow_model as F
    from comfyui_pcpo.demo import model as M
    from comfyui_pcpo.demo.text import VOCAB

    enc, tok = M.load_text_encoder()  # the shipped demo text encoder, frozen
    shift = F.FLOW_SAMPLING_SETTINGS["shift"]
    meta = {
        "unet_config": dict(F.FLOW_UNET_CONFIG),
        "model_class": "comfy.model_base.SD3 (mmdit.OpenAISignatureMMDITWrapper), ModelType.FLOW",
        "sampling_settings": dict(F.FLOW_SAMPLING_SETTINGS),
        "prediction_type": F.FLOW_PREDICTION_TYPE,
        "image_size": M.IMAGE_SIZE, "context_dim": M.CONTEXT_DIM, "pixel_range": [-1.0, 1.0],
        "vocab": list(VOCAB),
        "text_encoder": "demo_text_encoder.safetensors (the diffusion demo's, frozen)",
        "latent_format": "3-channel identity (pixel space)",
        "time_distribution": f"logit-normal(0, 1) then shift {shift:g}",
        "seed": args.seed, "batch_size": args.batch, "learning_rate": args.lr, "warmup_steps": args.warmup,
        "cfg_dropout": args.cfg_dropout,
        "recommended_sampling": dict(F.FLOW_RECOMMENDED_SAMPLING),
    }

    if args.export:
        ck = torch.load(args.export, map_location="cpu")
        for k in ("seed", "batch", "lr", "warmup", "cfg_dropout"):  # the run's settings (else the flags given)
            if k in ck.get("args", {}):
                setattr(args, k, ck["args"][k])
        meta.update(seed=args.seed, batch_size=args.batch, learning_rate=args.lr, warmup_steps=args.warmup,
                    cfg_dropout=args.cfg_dropout)
        meta.update(training_steps=ck["step"], train_seconds=round(ck.get("elapsed", 0.0), 1),
                    command=f"{ck.get('command', '?')}; then --export {args.export} (== --steps {ck['step']} "
                            f"--lr {args.lr:g})",
                    params=sum(v.numel() for k, v in ck["model"].items() if k != "pos_embed"),
                    base_eval={"sampler": "Euler (deterministic), shift-3 grid", "steps": 16, "cfg": 4.0, "seed": 0,
                               "reward": "prompt-colour-agreement", **ck["eval"]})
        save_shipped(ck["model"], meta)
        msg = (f"# exported step {ck['step']} ({args.export}) as the shipped model: {meta['params']:,} params, "
               f"{os.path.getsize(F.FLOW_WEIGHTS_PATH) / 1e6:.2f} MB; base eval all90 agreement "
               f"{ck['eval']['all90']['mean_reward']:.3f}, training29 {ck['eval']['training29']['mean_reward']:.3f}")
        if os.path.exists(args.log):
            with open(args.log) as f:
                done = msg in f.read()
            if not done:
                with open(args.log, "a") as f:
                    f.write(msg + "\n")
        print(msg)
        return

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = build_mmdit(F.FLOW_UNET_CONFIG)
    model.pos_embed.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    log = open(args.log, "w")
    command = "python tools/train_demo_flow_model.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def emit(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    emit(f"# {command}")
    emit(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, seed {args.seed}")
    emit(f"# model: SD3-shaped MMDiT (ComfyUI mmdit.OpenAISignatureMMDITWrapper) depth {F.DEPTH}, hidden "
         f"{model.hidden_size}, heads {model.num_heads}, patch {F.PATCH_SIZE} ({F.GRID}x{F.GRID} tokens), "
         f"in/out 3 channels (pixels), context 64 -> {model.hidden_size}, no pooled vector")
    emit(f"# params {n_params:,} ({n_params * 4 / 1e6:.2f} MB float32); text encoder: shipped demo encoder, frozen")
    emit(f"# loss: rectified flow, v = noise - x0, t = shift{shift:g}(sigmoid(N(0,1))), timestep input 1000 t")
    emit(f"# batch {args.batch} lr {args.lr} warmup {args.warmup} cfg_dropout {args.cfg_dropout} steps {args.steps}")
    emit("# eval: prompt-colour agreement, 1 image per caption, Euler 16 steps on the shift-3 grid, cfg 4, seed 0")

    t0 = time.time()
    ema = None
    for step in range(1, args.steps + 1):
        x0, prompts = T.make_batch(rng, args.batch, M.IMAGE_SIZE, args.cfg_dropout)
        with torch.no_grad():
            ctx = enc(tok(prompts))
        u = torch.sigmoid(torch.randn(args.batch, generator=gen))
        t = F.shift_time(u, shift)
        noise = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        pred = model(xt, t * 1000.0, context=ctx)
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        el = time.time() - t0
        if step % 25 == 0 or step == args.steps:
            emit(f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  gnorm {gn:.3f}  "
                 f"{step * args.batch / el:.1f} img/s  {el / 60:.1f} min")
        if args.ckpt_every and step % args.ckpt_every == 0:
            ev = evaluate(model, enc, tok, shift=shift)
            emit(f"eval step {step:5d}  all90 agreement {ev['all90']['mean_reward']:.3f} dominant "
                 f"{ev['all90']['dominant_colour_correct']:.3f} background {ev['all90']['background_correct']:.3f}  |  "
                 f"training29 agreement {ev['training29']['mean_reward']:.3f} dominant "
                 f"{ev['training29']['dominant_colour_correct']:.3f}")
            os.makedirs(args.ckpt_dir, exist_ok=True)
            torch.save({"step": step, "elapsed": el, "model": model.state_dict(), "eval": ev, "command": command,
                        "args": vars(args)},
                       os.path.join(args.ckpt_dir, f"step_{step:05d}.pt"))
    emit(f"# done: {args.steps} steps in {(time.time() - t0) / 60:.1f} min")
    log.close()


if __name__ == "__main__":
    main()
