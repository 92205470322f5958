"""Quality and diversity metrics for the demo domain (torch and numpy, no ComfyUI).

The demo's images are procedural (``shapes.render``), so the true distribution of every caption
can be sampled without limit.  What Inception features are to FID, the features of a small
*domain* encoder are here: a CNN trained on procedural images only (``tools/train_domain_encoder.py``,
its log next to it) to tell a shape's colour, kind and background and to locate and size it; its
pooled 64-d features feed

* :func:`frechet_distance` between generated and true images (an FD-DINO analogue on this domain;
  not Inception's FID, and not comparable with published FID numbers), and
* :func:`within_caption_diversity`: the mean pairwise feature distance of samples of one caption
  drawn with different noise (a collapsed model gives 0).

``tests/test_domain_metrics.py`` validates the metric: true against true gives an FD near 0 (with
its sampling spread), and the FD rises monotonically as images are degraded (noise, blur, dropped
modes).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import shapes

WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "domain_encoder.safetensors")
FEATURES = 64
# heads: shape colour, shape kind, background colour (classes); centre x, centre y, sqrt(area) (regression)
HEADS = {"colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES), "background": len(shapes.COLOURS), "geometry": 3}


class DomainEncoder(nn.Module):
    """32x32 RGB in [0, 1] -> 64 pooled features (``features``) and the training heads (``forward``)."""

    def __init__(self):
        super().__init__()
        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*block(3, 32, 1), *block(32, 32, 1),
                                  *block(32, 64, 2),          # 16x16
                                  *block(64, 64, 2),          # 8x8
                                  *block(64, FEATURES, 2))    # 4x4
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES * 2, n) for k, n in HEADS.items()})

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) -> (N, 64): the spatial mean of the last feature map."""
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> dict:
        p = self.pooled(x)
        return {k: head(p) for k, head in self.heads.items()}


_CACHE: dict = {}


def load_encoder(path: str = WEIGHTS_PATH) -> DomainEncoder:
    """The shipped encoder (safetensors), in eval mode, float32, CPU; cached per path."""
    if path not in _CACHE:
        from safetensors.torch import load_file
        enc = DomainEncoder()
        enc.load_state_dict(load_file(path))
        enc.eval().requires_grad_(False)
        _CACHE[path] = enc
    return _CACHE[path]


def as_nchw(images) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] (ComfyUI's IMAGE layout, numpy or torch) -> (N, 3, 32, 32) float32."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float()
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) in [0, 1], got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).clamp(0, 1)
    if x.shape[-2:] != (32, 32):
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def features(images, encoder: Optional[DomainEncoder] = None, batch: int = 256) -> np.ndarray:
    """(N, 64) float64 domain features of ``images`` ((N, H, W, 3) in [0, 1])."""
    enc = encoder or load_encoder()
    x = as_nchw(images)
    with torch.no_grad():
        out = [enc.features(x[i:i + batch]) for i in range(0, x.shape[0], batch)]
    return torch.cat(out).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of two feature sets (N, d), float64."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.shape[0] < 2 or f2.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples in each set")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ev, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(np.clip(ev, 0, None))) @ V.T
    m = r1 @ s2 @ r1
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def within_caption_diversity(feats: np.ndarray, captions: Sequence[str]) -> float:
    """Mean over captions (with >= 2 samples) of the mean pairwise Euclidean feature distance of the
    caption's samples."""
    feats = np.asarray(feats, np.float64)
    by = {}
    for i, c in enumerate(captions):
        by.setdefault(c, []).append(i)
    vals = []
    for idx in by.values():
        if len(idx) < 2:
            continue
        f = feats[idx]
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        n = len(idx)
        vals.append(d.sum() / (n * (n - 1)))
    if not vals:
        raise ValueError("within-caption diversity needs at least one caption with 2 or more samples")
    return float(np.mean(vals))


def true_images(captions: Sequence[str], seed: int = 0, size: int = 32) -> np.ndarray:
    """One true (procedural) image per entry of ``captions``: (N, size, size, 3) float32."""
    rng = np.random.default_rng(seed)
    specs = [shapes.parse_caption(c) for c in captions]
    bad = [c for c, s in zip(captions, specs) if s is None or not s.shape or not s.background]
    if bad:
        raise ValueError(f"not a demo caption (a <colour> <shape> on a <colour> background): {bad[0]!r}")
    return shapes.render_batch(specs, size, rng)
