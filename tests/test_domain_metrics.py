"""The demo domain's quality and diversity metrics (comfyui_pcpo/demo/domain_encoder.py), validated
before any benchmark uses them: the Fréchet distance against closed forms, true-against-true FD near 0
within its sampling spread, FD rising monotonically as images are degraded (noise, blur, dropped
modes), and within-caption diversity (0 for a collapsed set, the true images' own level otherwise)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from comfyui_pcpo.demo import domain_encoder as de
from comfyui_pcpo.demo import shapes

torch.set_num_threads(1)


def load_validation():
    """benchmarks/domain_metric.py (the series the benchmark prints are the ones asserted here)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "domain_metric.py"
    spec = importlib.util.spec_from_file_location("domain_metric", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


V = load_validation()
captions = V.captions


@pytest.fixture(scope="module")
def validation():
    return V.series()


@pytest.fixture(scope="module")
def ref(validation):
    """Features of the reference set of true images (every caption, 8 renders each)."""
    return validation["_ref"]


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    # same set: 0 up to rounding
    assert abs(de.frechet_distance(a, a)) < 1e-9
    # a pure shift by d: FD = |d|^2 exactly (the covariances are identical)
    d = np.array([1.0, -2.0, 0.5])
    assert de.frechet_distance(a, a + d) == pytest.approx(float(d @ d), rel=1e-9)
    # a scaling by s of a set with mean mu, covariance S: FD = (1 - s)^2 (|mu|^2 + tr S)
    s = 3.0
    S = np.cov(a, rowvar=False)
    mu = a.mean(0)
    assert de.frechet_distance(a, s * a) == pytest.approx((1 - s) ** 2 * (np.trace(S) + mu @ mu), rel=1e-6)
    # two Gaussians with diagonal covariances: sum (sqrt(v1) - sqrt(v2))^2 + |mu1 - mu2|^2 (float64 reference)
    x = rng.standard_normal((200000, 2)) * [1.0, 2.0]
    y = rng.standard_normal((200000, 2)) * [3.0, 0.5] + [1.0, 0.0]
    expect = (1 - 3) ** 2 + (2 - 0.5) ** 2 + 1.0
    assert de.frechet_distance(x, y) == pytest.approx(expect, rel=0.02)
    with pytest.raises(ValueError, match="at least 2 samples"):
        de.frechet_distance(a[:1], a)


def test_shipped_encoder_is_small_and_knows_the_domain():
    """The weights ship under 2 MB, load through safetensors, and the encoder tells what it was
    trained to tell on fresh images (so its features carry the domain's factors)."""
    assert os.path.getsize(de.WEIGHTS_PATH) < 2 * 1024 * 1024
    enc = de.load_encoder()
    caps = captions(2)
    x = de.as_nchw(de.true_images(caps, seed=7))
    with torch.no_grad():
        out = enc(x)
    specs = [shapes.parse_caption(c) for c in caps]
    for head, names, field in (("colour", shapes.COLOURS, "colour"), ("shape", shapes.SHAPES, "shape"),
                               ("background", shapes.COLOURS, "background")):
        truth = torch.tensor([names.index(getattr(s, field)) for s in specs])
        acc = float((out[head].argmax(1) == truth).float().mean())
        assert acc > 0.9, (head, acc)
    assert de.features(de.true_images(caps[:3], seed=1)).shape == (3, de.FEATURES)


def test_true_against_true_is_near_zero_and_degradations_raise_fd_monotonically(validation):
    tt = validation["true_vs_true"]  # the sampling spread of FD between independent true sets of this size
    floor = max(tt)
    assert floor < 0.02 * validation["uniform_noise"], (tt, validation["uniform_noise"])
    for name in ("noise", "blur", "dropped_modes"):
        fd = validation[name]
        assert fd[0] <= 2 * floor + 1e-9, (name, fd, tt)  # level 0 is undegraded (all shape colours kept)
        assert all(b > a for a, b in zip(fd, fd[1:])), (name, fd)
        assert fd[1] > 3 * floor, (name, fd, tt)  # the mildest degradation is beyond the sampling spread


def test_within_caption_diversity(ref):
    caps, f_ref = ref
    true_div = de.within_caption_diversity(f_ref, caps)
    assert true_div > 0
    # a collapsed model: every sample of a caption the same image -> 0
    one = de.true_images(caps[::8], seed=9)
    collapsed = np.repeat(one, 8, axis=0)
    assert de.within_caption_diversity(de.features(collapsed), caps) == pytest.approx(0.0, abs=1e-9)
    # half collapsed (4 distinct renders per caption, each twice) lies between
    half = np.repeat(de.true_images(caps[::2], seed=11), 2, axis=0)
    d_half = de.within_caption_diversity(de.features(half), caps)
    assert 0.3 * true_div < d_half < true_div
    # another independent true set: the same diversity within a few percent
    other = de.within_caption_diversity(de.features(de.true_images(caps, seed=12)), caps)
    assert other == pytest.approx(true_div, rel=0.05)
    # closed form on hand-made features: two samples at distance 5, the other caption's at 1
    f = np.array([[0, 0], [3, 4], [1, 1], [1, 2]], dtype=float)
    assert de.within_caption_diversity(f, ["a", "a", "b", "b"]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="2 or more samples"):
        de.within_caption_diversity(f[:2], ["a", "b"])


def test_inputs_are_checked():
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        de.features(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="not a demo caption"):
        de.true_images(["a cat"])
    # other sizes are resized to the encoder's 32x32
    big = np.repeat(np.repeat(de.true_images(captions(1)[:4], seed=3), 2, axis=1), 2, axis=2)
    assert de.features(big).shape == (4, de.FEATURES)
