#!/usr/bin/env python
"""Evaluate the embedded demo model's prompt-colour agreement and write a sample grid.

    . /work/venv/bin/activate
    python tools/eval_demo_model.py                    # shipped weights, own DDIM loop
    python tools/eval_demo_model.py --comfy            # same, sampled through ComfyUI's KSampler
    python tools/eval_demo_model.py --ckpt /tmp/pcpo_demo_ckpt/step_00400.pt --no-grid
    python tools/eval_demo_model.py --write-config     # record the base score in demo_config.json

Evaluation set: all 90 captions "a <colour> <shape> on a <colour> background" (6 colours x 3
shapes x 5 other background colours), one image each, image i drawn from seed ``seed + i``.
Sampler: DDIM (eta configurable) over ``steps`` evenly spaced DDPM timesteps, classifier-free
guidance ``cfg`` against the empty prompt.  Reported: mean ``prompt-colour-agreement`` reward,
% of images whose dominant non-background colour is the prompted one, % with the prompted
background.  The grid (``tools/demo_model_samples.png``) has one row per prompted shape colour;
under each sample a strip shows the prompted shape colour (left) and background (right).
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

GRID_PATH = os.path.join(ROOT, "tools", "demo_model_samples.png")


def load_models(ckpt: str | None):
    """(unet, encoder, tokenizer, config) from a training checkpoint or the shipped weights."""
    import train_demo_model as T
    from comfyui_pcpo.demo import model as M
    from comfyui_pcpo.demo.text import VOCAB, TinyTextEncoder, WordTokenizer

    cfg = M.load_config()
    unet = T.build_unet(cfg["unet_config"], init=False)
    if ckpt:
        ck = torch.load(ckpt, map_location="cpu")
        unet.load_state_dict(ck["unet"])
        enc = TinyTextEncoder(**cfg["text_encoder_config"])
        enc.load_state_dict(ck["text_encoder"])
        enc.eval().requires_grad_(False)
        tok = WordTokenizer(VOCAB, max_length=cfg["text_encoder_config"]["max_length"])
        cfg = dict(cfg, training_steps=ck["step"])
    else:
        unet.load_state_dict(M.load_unet_state_dict())
        enc, tok = M.load_text_encoder(config=cfg)
    unet.eval().requires_grad_(False)
    return unet, enc, tok, cfg


@torch.no_grad()
def ddim_sample(unet, cond, uncond, noise, abar, steps=20, cfg_scale=4.0, eta=1.0, generator=None):
    """DDIM / DDPM-ancestral (eta=1) sampling of a v-prediction model in pixel space [-1, 1]."""
    T = abar.shape[0]
    ts = torch.linspace(T - 1, 0, steps).round().long()
    x = noise
    n = x.shape[0]
    for i, t in enumerate(ts):
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        tt = torch.full((2 * n,), float(t))
        v_both = unet(torch.cat([x, x]), tt, context=torch.cat([cond, uncond]))
        v_c, v_u = v_both.chunk(2)
        v = v_u + cfg_scale * (v_c - v_u)
        x0 = a.sqrt() * x - (1 - a).sqrt() * v
        eps = (1 - a).sqrt() * x + a.sqrt() * v
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
        if i + 1 < steps and eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator)
    return x


def build_comfy_model(unet_sd, cfg):
    """ComfyUI MODEL (ModelPatcher) from the shipped config: the recipe for the node layer."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base

    class DemoPixelUNet(comfy.supported_models_base.BASE):
        unet_config = dict(cfg["unet_config"])
        unet_extra_config = {}
        sampling_settings = dict(cfg["sampling_settings"])
        latent_format = comfy.latent_formats.ChromaRadiance
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32]

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.V_PREDICTION

    mc = DemoPixelUNet(DemoPixelUNet.unet_config)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(unet_sd, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def comfy_sample(patcher, cond, uncond, noise, steps, cfg_scale, sampler, scheduler, seed):
    import comfy.sample

    latent = torch.zeros_like(noise)
    out = comfy.sample.sample(patcher, noise, steps, cfg_scale, sampler, scheduler,
                              [[cond, {}]], [[uncond, {}]], latent, disable_pbar=True, seed=seed)
    return out


def write_grid(images: np.ndarray, specs, path: str, scale: int = 3, cols: int = 15) -> None:
    from PIL import Image

    from comfyui_pcpo.demo.shapes import PALETTE

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    ch, cw, strip, pad = h * scale, w * scale, 6, 2
    grid = np.full((rows * (ch + strip + pad) + pad, cols * (cw + pad) + pad, 3), 40, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + strip + pad), pad + c * (cw + pad)
        im = (images[i] * 255).round().clip(0, 255).astype(np.uint8)
        grid[y:y + ch, x:x + cw] = im.repeat(scale, 0).repeat(scale, 1)
        fg = (np.asarray(PALETTE[specs[i].colour]) * 255).astype(np.uint8)
        bg = (np.asarray(PALETTE[specs[i].background]) * 255).astype(np.uint8)
        grid[y + ch + 1:y + ch + strip, x:x + cw // 2] = fg
        grid[y + ch + 1:y + ch + strip, x + cw // 2:x + cw] = bg
    Image.fromarray(grid).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="training checkpoint (default: shipped weights)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="images per caption (seeds seed + i + 90 k)")
    ap.add_argument("--comfy", action="store_true", help="sample through ComfyUI's KSampler instead")
    ap.add_argument("--sampler", default="ddim", help="ComfyUI sampler name for --comfy")
    ap.add_argument("--scheduler", default="ddim_uniform", help="ComfyUI scheduler for --comfy")
    ap.add_argument("--grid", default=GRID_PATH)
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--write-config", action="store_true", help="store the result as base_eval in demo_config.json")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    import train_demo_model as T

    T.prepare_comfy_import()
    from comfyui_pcpo.demo import model as M
    from comfyui_pcpo.demo.shapes import all_specs
    from comfyui_pcpo.rewards.colour import colour_analysis

    unet, enc, tok, cfg = load_models(args.ckpt)
    specs = all_specs() * args.repeats
    prompts = [s.text for s in specs]
    n = len(specs)
    size = cfg["image_size"]
    with torch.no_grad():
        cond = enc(tok(prompts))
        uncond = enc(tok([""] * n))
    noise = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(args.seed + i))
                         for i in range(n)])

    t0 = time.time()
    xs = []
    bs = 30
    if args.comfy:
        patcher = build_comfy_model(unet.state_dict(), cfg)
        for i in range(0, n, bs):
            xs.append(comfy_sample(patcher, cond[i:i + bs], uncond[i:i + bs], noise[i:i + bs], args.steps,
                                   args.cfg, args.sampler, args.scheduler, args.seed + i))
        how = f"ComfyUI KSampler {args.sampler}/{args.scheduler}"
    else:
        abar = T.alphas_cumprod_from_comfy(cfg["sampling_settings"])
        gen = torch.Generator().manual_seed(args.seed + 12345)
        for i in range(0, n, bs):
            xs.append(ddim_sample(unet, cond[i:i + bs], uncond[i:i + bs], noise[i:i + bs], abar,
                                  args.steps, args.cfg, args.eta, gen))
        how = f"DDIM eta={args.eta}"
    x = torch.cat(xs)
    images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()  # ComfyUI pixel VAE decode
    a = colour_analysis(images, prompts)
    res = {
        "training_steps": cfg.get("training_steps"),
        "sampler": how, "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "n_images": n,
        "mean_reward": round(float(a["reward"].mean()), 4),
        "dominant_colour_correct": round(float(a["dominant_correct"].mean()), 4),
        "background_correct": round(float(a["background_correct"].mean()), 4),
        "mean_shape_score": round(float(a["shape_score"].mean()), 4),
        "reward": "prompt-colour-agreement",
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(res))
    if not args.no_grid:
        write_grid(images.numpy(), specs, args.grid)
        print(f"wrote {args.grid}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.write_config:
        with open(M.CONFIG_PATH) as f:
            c = json.load(f)
        c["base_eval"] = res
        with open(M.CONFIG_PATH, "w") as f:
            json.dump(c, f, indent=2)
            f.write("\n")
        print(f"updated {M.CONFIG_PATH}")


if __name__ == "__main__":
    main()
