"""Validation of the demo domain's FD and diversity metrics (comfyui_pcpo/demo/domain_encoder.py) before
any benchmark uses them: the FD of true against true images (its sampling spread), and the FD as true
images are degraded step by step (Gaussian noise, Gaussian blur, dropped modes: fewer shape colours),
which must rise monotonically; and the within-caption diversity of true, half-collapsed and collapsed
sets.  ``tests/test_domain_metrics.py`` asserts on these same series.

    python benchmarks/domain_metric.py            # prints the tables (about 30 s)
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfyui_pcpo.demo import domain_encoder as de  # noqa: E402
from comfyui_pcpo.demo import shapes  # noqa: E402

NOISE = (0.0, 0.05, 0.1, 0.2, 0.4)        # std of added Gaussian noise (images in [0, 1])
BLUR = (0.0, 0.7, 1.2, 2.0, 3.0)          # std of the Gaussian blur, pixels
KEEP = (6, 4, 2, 1)                       # shape colours kept (of 6), the same number of images


def captions(n_per: int = 8, specs=None) -> list:
    specs = specs if specs is not None else shapes.all_specs()
    return [shapes.caption_text(s) for s in specs for _ in range(n_per)]


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W, 3) images (replicate padding); sigma 0 = unchanged."""
    if sigma == 0:
        return images
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = torch.tensor(k / k.sum(), dtype=torch.float32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x.permute(0, 2, 3, 1).numpy()


def series(n_per: int = 8, seed: int = 100) -> dict:
    """FDs against a reference true set (every caption x ``n_per`` renders): true-against-true for 3
    independent sets, uniform-noise images (the scale), and each degradation series."""
    caps = captions(n_per)
    n = len(caps)
    f_ref = de.features(de.true_images(caps, seed=seed))

    def fd(images):
        return de.frechet_distance(de.features(images), f_ref)

    clean = de.true_images(caps, seed=seed + 200)
    rng = np.random.default_rng(seed + 5)
    kept = []
    for k in KEEP:
        specs = [s for s in shapes.all_specs() if s.colour in shapes.COLOURS[:k]]
        kept.append(de.true_images(captions(int(np.ceil(n / len(specs))), specs)[:n], seed=seed + 300))
    return {
        "true_vs_true": [fd(de.true_images(caps, seed=seed + 100 + i)) for i in range(3)],
        "uniform_noise": fd(np.random.default_rng(seed + 1).random(clean.shape).astype(np.float32)),
        "noise": [fd(np.clip(clean + s * rng.standard_normal(clean.shape).astype(np.float32), 0, 1)) for s in NOISE],
        "blur": [fd(blur(clean, s)) for s in BLUR],
        "dropped_modes": [fd(im) for im in kept],
        "_ref": (caps, f_ref),
    }


def main() -> int:
    torch.set_num_threads(1)
    s = series()
    caps, f_ref = s.pop("_ref")
    print(f"domain FD against {len(caps)} true images (every caption x 8 renders), 64-d encoder features")
    print(f"true vs true (3 independent sets): {', '.join(f'{v:.4f}' for v in s['true_vs_true'])}")
    print(f"uniform noise images: {s['uniform_noise']:.3f}")
    for name, levels, vals in (("Gaussian noise std", NOISE, s["noise"]), ("blur sigma (px)", BLUR, s["blur"]),
                               ("shape colours kept", KEEP, s["dropped_modes"])):
        print(f"| {name} | " + " | ".join(f"{v:g}" for v in levels) + " |")
        print("| FD | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    true_div = de.within_caption_diversity(f_ref, caps)
    half = np.repeat(de.true_images(caps[::2], seed=11), 2, axis=0)
    one = np.repeat(de.true_images(caps[::8], seed=9), 8, axis=0)
    print(f"within-caption diversity: true {true_div:.4f}, half collapsed (4 distinct of 8) "
          f"{de.within_caption_diversity(de.features(half), caps):.4f}, collapsed "
          f"{de.within_caption_diversity(de.features(one), caps):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
