#!/usr/bin/env python
"""Train the embedded demo model: a tiny SD1.5-shaped ComfyUI UNet in 32x32 pixel space
plus a tiny text encoder, on procedurally generated captioned shapes.

Reproduce the shipped weights (one CPU thread, deterministic; 12 minutes at
~35 images/s on a shared 2-core machine):

    . /work/venv/bin/activate
    python tools/train_demo_model.py --steps 400

The run writes ``tools/train_demo_model.log`` and, at the end,
``comfyui_pcpo/demo/weights/{demo_unet,demo_text_encoder}.safetensors`` and
``demo_config.json``; then ``python tools/eval_demo_model.py --write-config`` measures the base
model's prompt-colour agreement and records it in ``demo_config.json``.

Nothing here depends on the total step count (constant learning rate after warm-up), so
the checkpoint at step k of a longer run equals the result of ``--steps k``: intermediate
checkpoints (``--ckpt-every``) let one pick the budget, and ``--export CKPT`` writes the
shipped files from such a checkpoint.

The training budget is deliberately small: the base model must leave visible headroom for
RL alignment (the shape's colour should often disagree with the prompt).  Never run this in
CI or in the demo.
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
DEFAULT_COMFY = os.path.expanduser("~/.cache/comfyui-pcpo/comfyui-0.3.75")
LOG_PATH = os.path.join(ROOT, "tools", "train_demo_model.log")

_TV_LIB = None  # keep the torchvision op shim alive


def prepare_comfy_import(comfy_dir: str | None = None) -> None:
    """Make ComfyUI importable on a CPU-only machine without torchvision's compiled ops."""
    global _TV_LIB
    comfy_dir = comfy_dir or os.environ.get("COMFYUI_DIR", DEFAULT_COMFY)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    if _TV_LIB is None:
        try:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TV_LIB = lib
        except RuntimeError:  # already defined (e.g. by tools/comfyui_host.py)
            _TV_LIB = True
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def build_unet(unet_config: dict, init: bool = True):
    """ComfyUI's UNetModel with the given config (float32, CPU), properly initialised."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = UNetModel(**unet_config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    if init:
        nn = torch.nn
        for m in unet.modules():
            for cls in (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding):
                if isinstance(m, cls):
                    cls.reset_parameters(m)
                    break
        # LDM-style zero init of residual-branch outputs and the final conv.
        for m in unet.modules():
            if isinstance(m, ResBlock):
                torch.nn.init.zeros_(m.out_layers[-1].weight)
                torch.nn.init.zeros_(m.out_layers[-1].bias)
            elif isinstance(m, SpatialTransformer):
                torch.nn.init.zeros_(m.proj_out.weight)
                torch.nn.init.zeros_(m.proj_out.bias)
        torch.nn.init.zeros_(unet.out[-1].weight)
        torch.nn.init.zeros_(unet.out[-1].bias)
    return unet


def alphas_cumprod_from_comfy(sampling_settings: dict) -> torch.Tensor:
    """The schedule exactly as ComfyUI's ModelSamplingDiscrete builds it."""
    import comfy.model_sampling

    class _Cfg:
        pass

    cfg = _Cfg()
    cfg.sampling_settings = dict(sampling_settings)
    ms = comfy.model_sampling.ModelSamplingDiscrete(cfg)
    sigmas = ms.sigmas.double()
    return (1.0 / (sigmas**2 + 1.0)).float()  # alpha_bar_t, t = 0..T-1


def count_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def make_batch(rng: np.random.Generator, batch: int, size: int, cfg_dropout: float):
    from comfyui_pcpo.demo import shapes

    specs = shapes.sample_specs(batch, rng=rng)
    imgs = shapes.render_batch(specs, size=size, rng=rng)
    x0 = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
    drop = rng.random(batch) < cfg_dropout
    prompts = ["" if d else s.text for s, d in zip(specs, drop)]
    return x0, prompts


def save_shipped(unet_sd: dict, text_sd: dict, meta: dict, out_dir: str) -> None:
    from safetensors.torch import save_file

    from comfyui_pcpo.demo import model as demo_model

    os.makedirs(out_dir, exist_ok=True)
    st_meta = {
        "format": "pt",
        "model": "comfyui-pcpo demo (tiny pixel-space SD1.5-shaped UNet)",
        "prediction_type": meta["prediction_type"],
        "sampling_settings": json.dumps(meta["sampling_settings"]),
        "training_steps": str(meta["training_steps"]),
        "seed": str(meta["seed"]),
    }
    save_file({k: v.contiguous().float() for k, v in unet_sd.items()},
              os.path.join(out_dir, os.path.basename(demo_model.UNET_PATH)),
              metadata={**st_meta, "unet_config": json.dumps(meta["unet_config"])})
    save_file({k: v.contiguous().float() for k, v in text_sd.items()},
              os.path.join(out_dir, os.path.basename(demo_model.TEXT_ENCODER_PATH)),
              metadata={**st_meta, "text_encoder_config": json.dumps(meta["text_encoder_config"]),
                        "vocab": json.dumps(meta["vocab"])})
    cfg_path = os.path.join(out_dir, os.path.basename(demo_model.CONFIG_PATH))
    old = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
    if old.get("training_steps") == meta["training_steps"] and "base_eval" in old:
        meta = {**meta, "base_eval": old["base_eval"]}
    with open(cfg_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for name in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, name), 0o644)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps (the shipped model's budget)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=0, help="save a checkpoint every N steps (0: none)")
    ap.add_argument("--ckpt-dir", default="/tmp/pcpo_demo_ckpt")
    ap.add_argument("--out-dir", default=None, help="where to write the shipped files (default: package weights/)")
    ap.add_argument("--log", default=LOG_PATH)
    ap.add_argument("--export", default=None, help="write the shipped files from this checkpoint and exit")
    ap.add_argument("--bench", type=int, default=0, help="only time N steps and print parameter counts")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    prepare_comfy_import()
    from comfyui_pcpo.demo import model as demo_model
    from comfyui_pcpo.demo.text import VOCAB, TinyTextEncoder, WordTokenizer

    out_dir = args.out_dir or demo_model.WEIGHTS_DIR
    unet_config = dict(demo_model.UNET_CONFIG)
    enc_config = dict(demo_model.TEXT_ENCODER_CONFIG)
    meta = {
        "unet_config": unet_config,
        "text_encoder_config": enc_config,
        "sampling_settings": dict(demo_model.SAMPLING_SETTINGS),
        "prediction_type": demo_model.PREDICTION_TYPE,
        "image_size": demo_model.IMAGE_SIZE,
        "context_dim": demo_model.CONTEXT_DIM,
        "pixel_range": [-1.0, 1.0],
        "vocab": list(VOCAB),
        "latent_format": "comfy.latent_formats.ChromaRadiance (3-channel identity)",
        "seed": args.seed,
        "batch_size": args.batch,
        "learning_rate": args.lr,
        "warmup_steps": args.warmup,
        "cfg_dropout": args.cfg_dropout,
        "command": "python tools/train_demo_model.py --steps {steps}",
    }

    if args.export:
        ck = torch.load(args.export, map_location="cpu")
        meta.update(training_steps=ck["step"], command=meta["command"].format(steps=ck["step"]),
                    train_seconds=round(ck.get("elapsed", 0.0), 1),
                    params={"unet": sum(v.numel() for v in ck["unet"].values()),
                            "text_encoder": sum(v.numel() for v in ck["text_encoder"].values())})
        save_shipped(ck["unet"], ck["text_encoder"], meta, out_dir)
        print(f"exported step {ck['step']} to {out_dir}")
        return

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)

    unet = build_unet(unet_config)
    encoder = TinyTextEncoder(**enc_config)
    tokenizer = WordTokenizer(VOCAB, max_length=enc_config["max_length"])
    abar = alphas_cumprod_from_comfy(demo_model.SAMPLING_SETTINGS)
    T = abar.shape[0]
    n_unet, n_enc = count_params(unet), count_params(encoder)

    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    total = args.bench or args.steps
    log = None if args.bench else open(args.log, "w")

    def emit(msg):
        print(msg, flush=True)
        if log:
            log.write(msg + "\n")
            log.flush()

    emit(f"# train_demo_model.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    emit(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, seed {args.seed}")
    emit(f"# unet params {n_unet:,}  text encoder params {n_enc:,}  total {n_unet + n_enc:,}")
    emit(f"# schedule {demo_model.SAMPLING_SETTINGS}  alpha_bar[0]={abar[0]:.6f} alpha_bar[-1]={abar[-1]:.2e}  "
         f"prediction {demo_model.PREDICTION_TYPE}")
    emit(f"# batch {args.batch} lr {args.lr} warmup {args.warmup} cfg_dropout {args.cfg_dropout} steps {total}")

    unet.train()
    encoder.train()
    t0 = time.time()
    ema_loss = None
    for step in range(1, total + 1):
        x0, prompts = make_batch(rng, args.batch, demo_model.IMAGE_SIZE, args.cfg_dropout)
        ids = tokenizer(prompts)
        t = torch.randint(0, T, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0  # v
        ctx = encoder(ids)
        pred = unet(xt, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(pred, target)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        el = time.time() - t0
        if step % 10 == 0 or step == total:
            emit(f"step {step:5d}  loss {loss.item():.4f}  ema {ema_loss:.4f}  gnorm {gn:.3f}  "
                 f"{step * args.batch / el:.1f} img/s  {el / 60:.1f} min")
        if args.ckpt_every and step % args.ckpt_every == 0 and not args.bench:
            os.makedirs(args.ckpt_dir, exist_ok=True)
            torch.save({"step": step, "elapsed": el, "unet": unet.state_dict(),
                        "text_encoder": encoder.state_dict()},
                       os.path.join(args.ckpt_dir, f"step_{step:05d}.pt"))
    if args.bench:
        return
    el = time.time() - t0
    meta.update(training_steps=total, train_seconds=round(el, 1),
                command=meta["command"].format(steps=total),
                params={"unet": n_unet, "text_encoder": n_enc})
    save_shipped(unet.state_dict(), encoder.state_dict(), meta, out_dir)
    emit(f"# done: {total} steps in {el / 60:.1f} min; wrote {out_dir}")
    log.close()


if __name__ == "__main__":
    main()
