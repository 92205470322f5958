"""Train the demo domain's image encoder (comfyui_pcpo/demo/domain_encoder.py) on procedural images.

Every step draws fresh images from ``shapes``' generator (random caption, shape size and position,
colour jitter: the same renderer as the demo's training data), and the encoder learns to name the
shape's colour, kind and background colour (cross-entropy) and to locate and size it (centre x, y
and sqrt(area) of the shape's pixels, in units of the image side; squared error).  Its pooled
features are then the domain's analogue of Inception / DINO features for the Fréchet distance.

    python tools/train_domain_encoder.py            # writes comfyui_pcpo/demo/weights/domain_encoder.safetensors
                                                    # and tools/train_domain_encoder.log (deterministic, ~2 min)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from comfyui_pcpo.demo import shapes  # noqa: E402
from comfyui_pcpo.demo.domain_encoder import WEIGHTS_PATH, DomainEncoder  # noqa: E402


def batch(n: int, rng: np.random.Generator, size: int = 32):
    """Images (n, 3, size, size) and targets: colour, shape, background indices; geometry (n, 3)."""
    specs = shapes.sample_specs(n, rng=rng)
    imgs, geo = [], []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for s in specs:
        fg = np.asarray(shapes.PALETTE[s.colour], np.float32) + rng.uniform(-0.03, 0.03, 3)
        bg = np.asarray(shapes.PALETTE[s.background], np.float32) + rng.uniform(-0.03, 0.03, 3)
        mask = shapes._shape_mask(s.shape, size, rng)
        imgs.append(np.clip(np.where(mask[..., None], fg, bg), 0, 1))
        area = max(int(mask.sum()), 1)
        geo.append([xx[mask].mean() / size, yy[mask].mean() / size, np.sqrt(area) / size])
    x = torch.from_numpy(np.stack(imgs).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    t = {"colour": torch.tensor([shapes.COLOURS.index(s.colour) for s in specs]),
         "shape": torch.tensor([shapes.SHAPES.index(s.shape) for s in specs]),
         "background": torch.tensor([shapes.COLOURS.index(s.background) for s in specs]),
         "geometry": torch.tensor(np.asarray(geo, np.float32))}
    return x, t


def losses(out: dict, t: dict) -> dict:
    ce = torch.nn.functional.cross_entropy
    return {"colour": ce(out["colour"], t["colour"]), "shape": ce(out["shape"], t["shape"]),
            "background": ce(out["background"], t["background"]),
            "geometry": 100.0 * torch.nn.functional.mse_loss(out["geometry"], t["geometry"])}


def evaluate(enc, rng, n: int = 2000) -> dict:
    x, t = batch(n, rng)
    with torch.no_grad():
        out = enc(x)
    acc = {k: float((out[k].argmax(1) == t[k]).float().mean()) for k in ("colour", "shape", "background")}
    acc["geometry_rmse_px"] = float(((out["geometry"] - t["geometry"]) ** 2).mean().sqrt() * 32)
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=WEIGHTS_PATH)
    ap.add_argument("--log", default=os.path.join(ROOT, "tools", "train_domain_encoder.log"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    enc = DomainEncoder()
    opt = torch.optim.AdamW(enc.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    lines = [f"python tools/train_domain_encoder.py --steps {args.steps} --batch {args.batch} --lr {args.lr} "
             f"--seed {args.seed}", f"torch {torch.__version__}, 1 thread; "
             f"{sum(p.numel() for p in enc.parameters())} parameters"]
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x, t = batch(args.batch, rng)
        ls = losses(enc(x), t)
        loss = sum(ls.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == 1:
            lines.append(f"step {step:5d} loss {float(loss):.4f} " + " ".join(f"{k} {float(v):.4f}" for k, v in ls.items())
                         + f" ({time.time() - t0:.0f} s)")
            print(lines[-1], flush=True)
    enc.eval()
    acc = evaluate(enc, np.random.default_rng(args.seed + 1))
    lines.append("held-out (2000 fresh images): " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    print(lines[-1])
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in enc.state_dict().items()}
    tmp = args.out + ".tmp"
    save_file(sd, tmp, metadata={"what": "demo domain encoder (tools/train_domain_encoder.py)"})
    os.replace(tmp, args.out)
    lines.append(f"wrote {os.path.relpath(args.out, ROOT)} ({os.path.getsize(args.out)} bytes) in {time.time() - t0:.0f} s")
    print(lines[-1])
    with open(args.log, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
