"""The published LAION aesthetic heads, loaded through the pack's Aesthetic loader in a real ComfyUI.

The files are real (``shared/data/real_rewards``, see its README.md; never committed into this
repository): they are copied into a temp ``models/pcpo_rewards`` folder and loaded by the
``PCPOAestheticReward`` node.  The CLIP ViT-L/14 backbone is not available, so the reward scores LAION's
own real ViT-L/14 image embeddings (of images rated 0..9) through its head
(``AestheticReward.score_embeddings``, where the full path ends) and through the PCPO Reward Scorer
with a CLIP_VISION stand-in that returns those embeddings.  The reference is the published MLP
(improved-aesthetic-predictor ``simple_inference.py``) written here in plain torch, float64.

Shared data: ``$PCPO_SHARED_DIR`` (the shared folder, or its ``data/real_rewards``), else
``<repo>/../shared/data/real_rewards``; absent: the tests skip.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import types
import uuid

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
V2 = "improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
RELU = "improved-aesthetic-predictor/ava+logos-l14-reluMSE.pth"
V1 = "laion-aesthetic-predictor-v1/sa_0_4_vit_l_14_linear.pth"
EMB = "laion-aesthetic-predictor-v1/vit_l_14_embeddings/rating{}.npy"
RATINGS = range(10)


def real_rewards_dir():
    cands = []
    env = os.environ.get("PCPO_SHARED_DIR")
    if env:
        cands += [pathlib.Path(env) / "data" / "real_rewards", pathlib.Path(env)]
    cands.append(REPO_ROOT.parent / "shared" / "data" / "real_rewards")
    for c in cands:
        if (c / V2).is_file():
            return c
    return None


REAL = real_rewards_dir()
pytestmark = pytest.mark.skipif(REAL is None, reason="real reward files not found: set PCPO_SHARED_DIR or put "
                                "shared/data/real_rewards beside the repository (see its README.md)")


def published_md5():
    out = {}
    for line in (REAL / "MD5SUMS").read_text(encoding="utf-8").splitlines():
        if line.strip():
            md5, name = line.split(None, 1)
            out[name.strip().removeprefix("./")] = md5
    return out


def md5(path):
    return hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture
def real_heads(pcpo, comfy_dirs, tmp_path):
    """The three published heads copied (and checked against MD5SUMS) into a temp models/pcpo_rewards that
    ComfyUI's folder_paths points at for this test."""
    import folder_paths
    d = tmp_path / "models" / "pcpo_rewards"
    d.mkdir(parents=True)
    sums = published_md5()
    for rel in (V2, RELU, V1):
        dst = d / os.path.basename(rel)
        shutil.copyfile(REAL / rel, dst)
        os.chmod(dst, 0o644)
        assert md5(dst) == sums[rel], rel
    saved = folder_paths.folder_names_and_paths.get("pcpo_rewards")
    folder_paths.folder_names_and_paths["pcpo_rewards"] = ([str(d)], saved[1] if saved else {".pth"})
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    try:
        yield d
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["pcpo_rewards"] = saved
        if isinstance(cache, dict):
            cache.clear()


def real_embeddings(tmp_path):
    """(10, 768) float32: the real CLIP ViT-L/14 image embeddings of images rated 0..9 (copied first)."""
    rows = []
    for r in RATINGS:
        dst = tmp_path / f"rating{r}.npy"
        shutil.copyfile(REAL / EMB.format(r), dst)
        rows.append(np.load(dst, allow_pickle=False))
    e = np.concatenate(rows, 0)
    assert e.shape == (10, 768) and e.dtype == np.float32
    return torch.from_numpy(e)


def reference_scores(head_file, emb):
    """simple_inference.py's MLP (no activations, dropouts between) in float64 on embeddings normalised
    to unit L2 norm as its ``normalized`` does; the file read with torch.load(weights_only=True)."""
    nn = torch.nn
    mlp = nn.Module()  # simple_inference.py's MLP keeps its Sequential as ``layers``
    mlp.layers = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                               nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    mlp.double().eval()
    sd = torch.load(head_file, map_location="cpu", weights_only=True)
    mlp.load_state_dict({k: v.double() for k, v in sd.items()}, strict=True)
    x = emb.double().numpy()
    norm = np.atleast_1d(np.linalg.norm(x, 2, -1))
    norm[norm == 0] = 1
    with torch.no_grad():
        return mlp.layers(torch.from_numpy(x / norm[:, None])).squeeze(1)


class RealEmbeddingClipVision:
    """Stands in for a CLIP_VISION of the OpenAI ViT-L/14 (the reward calls ``encode_image(...).image_embeds``):
    image i (all pixels i/255) gets real embedding i, scaled by (i + 1) so the reward's normalisation counts."""

    def __init__(self, emb):
        self.emb = emb

    def encode_image(self, im):
        idx = (im[:, 0, 0, 0] * 255).round().long()
        return types.SimpleNamespace(image_embeds=self.emb[idx] * (idx[:, None] + 1).float())


def load_v2(pcpo, emb, batch_size=4):
    node = pcpo.nodes["PCPOAestheticReward"]
    assert os.path.basename(V2) in node.INPUT_TYPES()["required"]["head"][0]
    return node().load(os.path.basename(V2), "(none)", "fp32", batch_size, False,
                       clip_vision=RealEmbeddingClipVision(emb))[0]


def test_real_v2_head_scores_real_embeddings_as_the_published_mlp(pcpo, real_heads, tmp_path):
    emb = real_embeddings(tmp_path)
    reward = load_v2(pcpo, emb)
    with torch.inference_mode():
        got = reward.score_embeddings(emb).double().cpu()
    ref = reference_scores(real_heads / os.path.basename(V2), emb)
    print("real v2 head on ratings 0..9:", [round(float(v), 4) for v in got])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # the pack's head runs in float32
    assert bool((got[1:] > got[:-1]).all()), got  # rises with the human rating
    assert 1.5 < float(got[0]) < 1.9, float(got[0])
    assert 5.5 < float(got[9]) < 6.0, float(got[9])
    # the embedding's norm does not matter (the head sees e / |e|)
    with torch.inference_mode():
        torch.testing.assert_close(reward.score_embeddings(3.0 * emb).double().cpu(), got, rtol=1e-6, atol=1e-6)


def test_real_v2_head_through_the_reward_scorer(pcpo, real_heads, tmp_path):
    """The full path: PCPO Reward Scorer -> ModelPatcher load -> CLIP_VISION embedding -> normalise -> head."""
    emb = real_embeddings(tmp_path)
    reward = load_v2(pcpo, emb, batch_size=4)
    imgs = (torch.arange(10, dtype=torch.float32) / 255).view(10, 1, 1, 1).expand(10, 8, 8, 3).contiguous()
    n = imgs.shape[0]
    traj = types.SimpleNamespace(batch_size=n, group_ids=torch.zeros(n, dtype=torch.long))
    trajectory = types.SimpleNamespace(traj=traj, prompts=["a photo"] * n, latent_shape=(4, 1, 1), uid=uuid.uuid4().hex)
    got = pcpo.nodes["PCPORewardScorer"]().score(imgs, trajectory, "brightness", reward_model=reward)[0].values
    ref = reference_scores(real_heads / os.path.basename(V2), emb)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_real_v1_head_is_refused_saying_what_it_is(pcpo, real_heads):
    node = pcpo.nodes["PCPOAestheticReward"]()
    with pytest.raises(ValueError, match=r"sa_0_4_vit_l_14_linear\.pth is LAION's aesthetic predictor v1 linear head "
                       r"\(one Linear 768->1.*not the v2 MLP head.*download sac\+logos\+ava1-l14-linearMSE\.pth "
                       r"from https://github\.com/christophschuhmann/improved-aesthetic-predictor"):
        node.load(os.path.basename(V1), "(none)", "fp32", 2, False)


def test_real_relu_head_is_refused_saying_what_it_is(pcpo, real_heads):
    """The ReLU head's Linears sit at layers.0/3/6/9/11 (ReLUs between), the linear v2's at layers.0/2/4/6/7:
    the key sets tell them apart (the shapes are the same)."""
    sd = torch.load(real_heads / os.path.basename(RELU), map_location="cpu", weights_only=True)
    assert sorted({int(k.split(".")[1]) for k in sd}) == [0, 3, 6, 9, 11]
    node = pcpo.nodes["PCPOAestheticReward"]()
    with pytest.raises(ValueError, match=r"ava\+logos-l14-reluMSE\.pth is the ReLU variant of the "
                       r"improved-aesthetic-predictor head.*not the v2 MLP head.*"
                       r"download sac\+logos\+ava1-l14-linearMSE\.pth"):
        node.load(os.path.basename(RELU), "(none)", "fp32", 2, False)
