"""OCR reward on the REAL PP-OCR weights that ship inside the rapidocr wheel, and the Reward Mix
(per-group normalisation and weights) in closed form, both through the nodes."""
from __future__ import annotations

import pytest
import torch

from test_reward_models import PROMPTS, fake_trajectory, images, score_node


def render(text: str, w: int = 384, h: int = 128) -> torch.Tensor:
    """Black text on white, as a ComfyUI IMAGE (1, H, W, 3)."""
    from PIL import Image, ImageDraw, ImageFont
    img = Image.new("RGB", (w, h), "white")
    try:
        font = ImageFont.load_default(size=44)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    ImageDraw.Draw(img).text((16, 36), text, fill="black", font=font)
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def test_ocr_formula_matches_flow_grpo():
    from comfyui_pcpo.rewards.ocr import levenshtein, ocr_accuracy, quoted_text
    assert quoted_text('a sign that says "Open Late" at night') == "Open Late"
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert ocr_accuracy("OPEN LATE", "open late") == 1.0  # case and spaces ignored
    assert ocr_accuracy("xx openlate yy", "open late") == 1.0  # contained: distance 0
    assert ocr_accuracy("opem late", "open late") == pytest.approx(1 - 1 / 8)
    assert ocr_accuracy("", "open") == 0.0 and ocr_accuracy("completely different", "ab") == 0.0  # capped
    with pytest.raises(ValueError, match="double quotes"):
        quoted_text("a sign without quotes")


@pytest.fixture(scope="module")
def ocr_reward(pcpo):
    pytest.importorskip("rapidocr")
    pytest.importorskip("onnxruntime")
    return pcpo.nodes["PCPOOCRReward"]().load(1)[0]


def test_ocr_reward_real_weights_right_and_wrong_text(pcpo, ocr_reward):
    imgs = torch.cat([render("PCPO 2049"), render("HELLO"), render("PCPO 2049")])
    prompts = ['a poster with the text "PCPO 2049"', 'a sign that says "HELLO"', 'a sign that says "WORLD"']
    out, mean = pcpo.nodes["PCPORewardScorer"]().score(imgs, fake_trajectory(prompts, latent=(4, 16, 48)), "brightness",
                                                      reward_model=ocr_reward)
    v = out.values
    print("OCR read", ocr_reward.last_read, "scores", v.tolist())
    assert v[0] >= 0.9 and v[1] >= 0.9, (ocr_reward.last_read, v)
    assert v[2] <= 0.4, (ocr_reward.last_read, v)
    # deterministic, and batched equals one by one (OCR runs per image)
    again = pcpo.nodes["PCPORewardScorer"]().score(imgs[2:], fake_trajectory(prompts[2:], latent=(4, 16, 48)),
                                                   "brightness", reward_model=ocr_reward)[0].values
    assert torch.equal(again, v[2:])


def test_ocr_reward_without_quotes_is_a_clear_error(pcpo, ocr_reward):
    with pytest.raises(ValueError, match="double quotes"):
        pcpo.nodes["PCPORewardScorer"]().score(render("X"), fake_trajectory(["no quotes here"], latent=(4, 16, 48)),
                                               "brightness", reward_model=ocr_reward)


def test_reward_mix_normalises_within_groups_then_weights(pcpo):
    """mix = sum_k w_k (r_k - mean_g r_k) / std_g r_k, with population std per group; the scorer reports each
    component's raw mean and the weighted sum of raw means."""
    builtin = pcpo.nodes["PCPOBuiltinReward"]()
    bright = builtin.load("brightness")[0]
    sat = builtin.load("saturation")[0]
    mix = pcpo.nodes["PCPORewardMix"]().mix(reward_1=bright, weight_1=2.0, reward_2=sat, weight_2=0.5)[0]
    imgs = images(6, seed=4)
    groups = [0, 0, 0, 1, 1, 1]
    out, mean = score_node(pcpo, imgs, [""] * 6, mix, groups=groups)
    x = imgs.double()
    b = x.mean(dim=(1, 2, 3))
    mx, mn = x.max(-1).values, x.min(-1).values
    s = ((mx - mn) / mx.clamp_min(1e-6)).mean(dim=(1, 2))

    def z(r):
        o = torch.empty_like(r)
        for g in (slice(0, 3), slice(3, 6)):
            o[g] = (r[g] - r[g].mean()) / (((r[g] - r[g].mean()) ** 2).mean().sqrt() + 1e-8)
        return o

    torch.testing.assert_close(out.values, 2.0 * z(b) + 0.5 * z(s), rtol=1e-9, atol=1e-9)
    assert out.components == pytest.approx({"brightness": float(b.mean()), "saturation": float(s.mean())})
    assert mean == pytest.approx(2.0 * float(b.mean()) + 0.5 * float(s.mean()))
    assert out.name == "mix(2*brightness, 0.5*saturation)"
    # a reward's scale cannot drown another: scaling one component leaves the mix unchanged
    scaled = type(bright)(bright.spec)
    scaled._score = lambda im, pr: 1000.0 * bright._score(im, pr)
    mix2 = pcpo.nodes["PCPORewardMix"]().mix(reward_1=scaled, weight_1=2.0, reward_2=sat, weight_2=0.5)[0]
    torch.testing.assert_close(score_node(pcpo, imgs, [""] * 6, mix2, groups=groups)[0].values, out.values,
                               rtol=1e-4, atol=1e-4)  # float32 rounding of the scaled reward


def test_reward_mix_edge_cases(pcpo):
    bright = pcpo.nodes["PCPOBuiltinReward"]().load("brightness")[0]
    node = pcpo.nodes["PCPORewardMix"]()
    with pytest.raises(ValueError, match="at least one"):
        node.mix(reward_1=bright, weight_1=0.0)
    mix = node.mix(reward_1=bright, weight_1=1.0, reward_2=bright, weight_2=1.0)[0]
    out = score_node(pcpo, images(3), PROMPTS, mix, groups=[0, 1, 1])[0]
    assert set(out.components) == {"brightness", "brightness#2"}
    assert out.values[0] == 0.0  # a one-sample group carries no signal
    with pytest.raises(ValueError, match="cannot contain another mix"):
        node.mix(reward_1=mix, weight_1=1.0)
