"""Learned reward models as ComfyUI nodes, on tiny random-weight models built from the real config classes
with the published key names and written to the folder layout the loaders expect.

Every loader is called as ComfyUI calls it (the node class from the loaded pack), the reward goes
through the PCPO Reward Scorer (ModelPatcher load/unload), and each test checks determinism, batched
== one-by-one, and the score against a hand-computed reference.  Real-size key sets are checked on
the meta device (no memory).
"""
from __future__ import annotations

import json
import os
import types
import uuid

import pytest
import torch

pytest.importorskip("transformers")

SIZE = 32  # tiny models see 32x32 images


# ----------------------------------------------------------------------------- helpers

@pytest.fixture
def reward_dir(pcpo, comfy_dirs, tmp_path):
    """models/pcpo_rewards and models/clip pointed at this test's tmp folder."""
    import folder_paths
    legacy = getattr(folder_paths, "map_legacy", lambda n: n)  # "clip" is "text_encoders" on newer ComfyUI
    names = {"pcpo_rewards": "pcpo_rewards", "clip": legacy("clip"), "clip_vision": "clip_vision"}
    saved = {k: folder_paths.folder_names_and_paths.get(k) for k in names.values()}
    d = tmp_path / "models"
    for short, k in names.items():
        (d / short).mkdir(parents=True, exist_ok=True)
        exts = saved[k][1] if saved[k] else set()
        folder_paths.folder_names_and_paths[k] = ([str(d / short)], exts)
    folder_paths.filename_list_cache.clear() if isinstance(getattr(folder_paths, "filename_list_cache", None), dict) else None
    try:
        yield d
    finally:
        for k, v in saved.items():
            if v is not None:
                folder_paths.folder_names_and_paths[k] = v
        if isinstance(getattr(folder_paths, "filename_list_cache", None), dict):
            folder_paths.filename_list_cache.clear()


def fake_trajectory(prompts, groups=None, latent=(4, SIZE // 8, SIZE // 8)):
    """What the scorer reads of a PCPO_TRAJECTORY: batch size, group ids, per-sample prompts, latent shape, uid."""
    n = len(prompts)
    gid = torch.as_tensor(groups if groups is not None else [0] * n)
    traj = types.SimpleNamespace(batch_size=n, group_ids=gid)
    return types.SimpleNamespace(traj=traj, prompts=list(prompts), latent_shape=latent, uid=uuid.uuid4().hex)


def images(n, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def score_node(pcpo, imgs, prompts, reward_model, groups=None):
    node = pcpo.nodes["PCPORewardScorer"]()
    return node.score(imgs, fake_trajectory(prompts, groups), "brightness", reward_model=reward_model)


def assert_batched_equals_single(pcpo, reward, imgs, prompts):
    full = score_node(pcpo, imgs, prompts, reward)[0].values
    again = score_node(pcpo, imgs, prompts, reward)[0].values
    assert torch.equal(full, again)  # deterministic
    one = torch.cat([score_node(pcpo, imgs[i:i + 1], prompts[i:i + 1], reward)[0].values for i in range(len(prompts))])
    torch.testing.assert_close(full, one, rtol=1e-5, atol=1e-5)
    return full


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_hf_clip(folder, seed=0, vision_hidden=32, projection=16):
    """A tiny HF CLIP folder: CLIPModel weights + a byte-level CLIP tokenizer + preprocessor_config.json."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=projection)
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"crop_size": {"height": SIZE, "width": SIZE}, "size": {"shortest_edge": SIZE},
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "do_center_crop": True, "do_resize": True, "resample": 3}, f)
    return model.eval()


def hand_clip_pixels(imgs):
    """The reference for 32x32 inputs at crop 32: no resize, no crop; 8-bit levels, OpenAI mean/std."""
    x = (imgs * 255).round() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((x - mean) / std).permute(0, 3, 1, 2)


def proj(out):
    return out if torch.is_tensor(out) else out.pooler_output


PROMPTS = ["a red cat", "a blue dog", "a green fox"]


# ----------------------------------------------------------------------------- preprocessing

def test_clip_preprocessing_against_hand_computed_resize_and_crop():
    from comfyui_pcpo.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, clip_preprocess, letterbox_preprocess
    img = images(1, seed=3, size=32)
    wide = torch.cat([torch.zeros(1, 32, 16, 3), img, torch.ones(1, 32, 16, 3)], dim=2)  # 32 x 64
    out = clip_preprocess(wide, size=32, crop=32)  # shortest side already 32: centre crop only
    torch.testing.assert_close(out, hand_clip_pixels(img), rtol=0, atol=1e-6)
    # resizing keeps a flat colour flat: a 64 x 96 grey image -> 32 x 48 -> crop 32, every pixel (0.5-mean)/std
    flat = clip_preprocess(torch.full((1, 64, 96, 3), 128 / 255), size=32, crop=32)
    assert flat.shape == (1, 3, 32, 32)
    for c in range(3):
        assert torch.allclose(flat[0, c], torch.tensor((128 / 255 - OPENAI_MEAN[c]) / OPENAI_STD[c]), atol=1e-5)
    # letterbox: a 32 x 16 (H x W) image becomes 16 x 8 scaled ... padded with black to 16 x 16
    tall = img[:, :, :16]
    lb = letterbox_preprocess(tall, size=16)
    black = [(0 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)]
    for c in range(3):
        assert torch.allclose(lb[0, c, :, :4], torch.tensor(black[c]), atol=1e-6)
        assert torch.allclose(lb[0, c, :, 12:], torch.tensor(black[c]), atol=1e-6)
    square = letterbox_preprocess(img, size=32)
    torch.testing.assert_close(square, hand_clip_pixels(img), rtol=0, atol=1e-6)


def test_clip_preprocessing_close_to_transformers_image_processor(comfy):
    """At real size (224, from a 256 x 320 image) the torch path stays within 8-bit rounding noise of
    transformers' CLIPImageProcessor on the uint8 image (PIL bicubic vs torch antialiased bicubic)."""
    from transformers import CLIPImageProcessor
    from comfyui_pcpo.rewards.preprocess import clip_preprocess
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 16, 20, 3, generator=g)
    img = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2), size=(256, 320), mode="bilinear").permute(0, 2, 3, 1)
    ours = clip_preprocess(img)
    u8 = (img[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    ref = torch.as_tensor(CLIPImageProcessor()(images=[u8], return_tensors="np")["pixel_values"])
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02, float((ours - ref).abs().mean())


# ----------------------------------------------------------------------------- aesthetic

def published_aesthetic_shapes():
    """The key -> shape list of sac+logos+ava1-l14-linearMSE.pth recorded in shared/spec/rewards.md."""
    return {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
            "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
            "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


def test_aesthetic_head_real_size_keys_equal_the_published_file():
    from comfyui_pcpo.rewards.clip_models import AestheticHead
    head = AestheticHead(768)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == published_aesthetic_shapes()
    assert AestheticHead.expected_shapes(768) == published_aesthetic_shapes()


def write_aesthetic_head(path, in_dim, seed=1, fmt="pth"):
    from comfyui_pcpo.rewards.clip_models import AestheticHead
    torch.manual_seed(seed)
    head = AestheticHead(in_dim)
    sd = {k: v.clone() for k, v in head.state_dict().items()}
    if fmt == "pth":
        torch.save(sd, path)  # a plain OrderedDict pickle, as published
    else:
        from safetensors.torch import save_file
        save_file(sd, path)
    return head.eval()


def test_aesthetic_reward_from_hf_folder_through_the_node(pcpo, reward_dir):
    clip = write_tiny_hf_clip(reward_dir / "clip" / "clip-vit-large-patch14", projection=24)
    head = write_aesthetic_head(reward_dir / "pcpo_rewards" / "sac+logos+ava1-l14-linearMSE.pth", 24)
    node = pcpo.nodes["PCPOAestheticReward"]
    req = node.INPUT_TYPES()["required"]
    assert "sac+logos+ava1-l14-linearMSE.pth" in req["head"][0]
    assert "clip/clip-vit-large-patch14" in req["backbone"][0]
    reward = node().load("sac+logos+ava1-l14-linearMSE.pth", "clip/clip-vit-large-patch14", "fp32", 2, False)[0]
    imgs = images(3)
    got = assert_batched_equals_single(pcpo, reward, imgs, PROMPTS)
    with torch.no_grad():
        e = proj(clip.get_image_features(pixel_values=hand_clip_pixels(imgs)))
        ref = head(e / e.norm(dim=-1, keepdim=True)).squeeze(1).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_aesthetic_reward_with_comfy_clip_vision_backbone(pcpo, reward_dir):
    """CLIP_VISION input: the embedding is ComfyUI's encode_image(...).image_embeds, normalised, through the head."""
    head = write_aesthetic_head(reward_dir / "pcpo_rewards" / "head.safetensors", 12, fmt="safetensors")
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(5))

    class StubClipVision:  # the part of comfy.clip_vision.ClipVisionModel the reward uses
        def encode_image(self, im):
            return types.SimpleNamespace(image_embeds=im.mean(dim=(1, 2)) @ w)

    reward = pcpo.nodes["PCPOAestheticReward"]().load("head.safetensors", "(none)", "fp32", 2, False,
                                                      clip_vision=StubClipVision())[0]
    imgs = images(3, seed=2)
    got = assert_batched_equals_single(pcpo, reward, imgs, PROMPTS)
    e = imgs.mean(dim=(1, 2)) @ w
    with torch.no_grad():
        ref = head(e / e.norm(dim=-1, keepdim=True)).squeeze(1).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(3, 5)  # a CLIP vision model of another width than the head's
    with pytest.raises(ValueError, match="gives 5-d embeddings.*ViT-L/14"):
        score_node(pcpo, imgs, PROMPTS, reward)


def test_aesthetic_missing_or_wrong_file_errors_name_folder_and_source(pcpo, reward_dir):
    node = pcpo.nodes["PCPOAestheticReward"]()
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth into .*models/pcpo_rewards.*improved-aesthetic"):
        node.load("(none)", "(none)", "fp32", 2, False)
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, reward_dir / "pcpo_rewards" / "wrong.pth")
    with pytest.raises(ValueError, match=r"missing .* keys.*improved-aesthetic"):
        node.load("wrong.pth", "(none)", "fp32", 2, False)
    torch.save({"x": types.SimpleNamespace()}, reward_dir / "pcpo_rewards" / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        node.load("pickled.pt", "(none)", "fp32", 2, False)


# ----------------------------------------------------------------------------- PickScore and CLIP score

def test_pickscore_real_size_key_shapes_match_clip_h():
    """PickScore_v1 is an HF CLIPModel with ViT-H-14 dimensions: the keys the spec lists, with their shapes."""
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16),
                     vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=16, patch_size=14, image_size=224), projection_dim=1024)
    with torch.device("meta"):
        sd = CLIPModel(cfg).state_dict()
    assert tuple(sd["visual_projection.weight"].shape) == (1024, 1280)
    assert tuple(sd["text_projection.weight"].shape) == (1024, 1024)
    assert tuple(sd["logit_scale"].shape) == ()
    assert {k.split(".")[0] for k in sd} == {"vision_model", "text_model", "visual_projection", "text_projection",
                                             "logit_scale"}


@pytest.mark.parametrize("node_name,convention,expect", [
    ("PCPOPickScoreReward", "pickscore (logit_scale.exp() * cos)", lambda s, c: s * c),
    ("PCPOPickScoreReward", "flow-grpo (logit_scale.exp() * cos / 26)", lambda s, c: s * c / 26),
    ("PCPOPickScoreReward", "cosine (DanceGRPO)", lambda s, c: c),
    ("PCPOCLIPScoreReward", "torchmetrics (max(100 * cos, 0))", lambda s, c: (100 * c).clamp_min(0)),
    ("PCPOCLIPScoreReward", "flow-grpo (logit_scale.exp() * cos / 30)", lambda s, c: s * c / 30),
])
def test_clip_alignment_rewards_through_the_node(pcpo, reward_dir, node_name, convention, expect):
    clip = write_tiny_hf_clip(reward_dir / "pcpo_rewards" / "PickScore_v1")
    node = pcpo.nodes[node_name]
    assert "pcpo_rewards/PickScore_v1" in node.INPUT_TYPES()["required"]["model"][0]
    reward = node().load("pcpo_rewards/PickScore_v1", convention, "fp32", 2, False)[0]
    imgs = images(3, seed=1)
    got = assert_batched_equals_single(pcpo, reward, imgs, PROMPTS)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(reward_dir / "pcpo_rewards" / "PickScore_v1"))
    with torch.no_grad():
        i = proj(clip.get_image_features(pixel_values=hand_clip_pixels(imgs)))
        t_in = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        t = proj(clip.get_text_features(**t_in))
        cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
        ref = expect(clip.logit_scale.exp(), cos).double()
    # a tiny random CLIP starts at logit scale exp = 14.3 (transformers' init), not 100
    assert abs(float(clip.logit_scale.detach().exp()) - 14.2857) < 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_clip_reward_needs_prompts_and_a_clip_folder(pcpo, reward_dir):
    write_tiny_hf_clip(reward_dir / "pcpo_rewards" / "PickScore_v1")
    reward = pcpo.nodes["PCPOPickScoreReward"]().load("pcpo_rewards/PickScore_v1", "cosine (DanceGRPO)", "fp32", 2,
                                                      False)[0]
    with pytest.raises(ValueError, match="reads the prompt"):
        score_node(pcpo, images(2), ["", ""], reward)
    with pytest.raises(FileNotFoundError, match="yuvalkirstain/PickScore_v1"):
        pcpo.nodes["PCPOPickScoreReward"]().load("(none)", "cosine (DanceGRPO)", "fp32", 2, False)
    (reward_dir / "pcpo_rewards" / "PickScore_v1" / "vocab.json").unlink()
    (reward_dir / "pcpo_rewards" / "PickScore_v1" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14"):
        pcpo.nodes["PCPOPickScoreReward"]().load("pcpo_rewards/PickScore_v1", "cosine (DanceGRPO)", "fp32", 2, False)


def test_reward_weights_are_loaded_for_scoring_and_given_back(pcpo, reward_dir):
    """The reward's ModelPatcher is among ComfyUI's loaded models only while it scores (keep_loaded off)."""
    import comfy.model_management as mm
    write_tiny_hf_clip(reward_dir / "pcpo_rewards" / "PickScore_v1")
    node = pcpo.nodes["PCPOPickScoreReward"]()
    reward = node.load("pcpo_rewards/PickScore_v1", "cosine (DanceGRPO)", "fp32", 2, False)[0]
    seen = []
    orig = reward._score_batch

    def spy(im, pr):
        seen.append(any(lm.model is reward.patcher for lm in mm.current_loaded_models))
        return orig(im, pr)

    reward._score_batch = spy
    score_node(pcpo, images(2), PROMPTS[:2], reward)
    assert seen == [True]
    assert not any(lm.model is reward.patcher for lm in mm.current_loaded_models)
    kept = node.load("pcpo_rewards/PickScore_v1", "cosine (DanceGRPO)", "fp32", 2, True)[0]
    score_node(pcpo, images(2), PROMPTS[:2], kept)
    assert any(lm.model is kept.patcher for lm in mm.current_loaded_models)
    pcpo.mod("nodes.reward_models").release(kept.patcher)
    assert not any(lm.model is kept.patcher for lm in mm.current_loaded_models)


# ----------------------------------------------------------------------------- HPSv2.1 (open_clip)

TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("open_clip_cfg")
    (d / "pcpo-tiny-ViT.json").write_text(json.dumps(TINY_OPEN_CLIP), encoding="utf-8")
    open_clip.add_model_config(str(d / "pcpo-tiny-ViT.json"))
    return open_clip


def test_hps_real_size_architecture_matches_the_published_checkpoint(comfy, open_clip_tiny):
    """ViT-H-14 as HPSv2 loads it: embed 1024, vision 32 x 1280 patch 14 at 224, text 24 x 1024, context 77, and
    the open_clip key names the spec lists."""
    cfg = open_clip_tiny.get_model_config("ViT-H-14")
    assert cfg["embed_dim"] == 1024 and cfg["vision_cfg"]["layers"] == 32 and cfg["vision_cfg"]["width"] == 1280
    assert cfg["vision_cfg"]["patch_size"] == 14 and cfg["vision_cfg"]["image_size"] == 224
    assert cfg["text_cfg"]["layers"] == 24 and cfg["text_cfg"]["width"] == 1024 and cfg["text_cfg"]["context_length"] == 77
    with torch.device("meta"):
        sd = open_clip_tiny.create_model("ViT-H-14", pretrained=None, device="meta").state_dict()
    for k in ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "positional_embedding",
              "text_projection", "logit_scale", "transformer.resblocks.23.attn.in_proj_weight",
              "visual.transformer.resblocks.31.mlp.c_fc.weight"):
        assert k in sd, k
    assert tuple(sd["text_projection"].shape) == (1024, 1024) and tuple(sd["visual.proj"].shape) == (1280, 1024)
    assert not any(k.startswith(("visual.transformer.resblocks.32", "transformer.resblocks.24")) for k in sd)


def test_hps_reward_through_the_node(pcpo, reward_dir, open_clip_tiny):
    torch.manual_seed(0)
    model = open_clip_tiny.create_model("pcpo-tiny-ViT", pretrained=None).eval()
    # published layout: {"state_dict": ...} in a torch pickle, loaded with weights_only=True
    torch.save({"state_dict": model.state_dict()}, reward_dir / "pcpo_rewards" / "HPS_v2.1_compressed.pt")
    node = pcpo.nodes["PCPOHPSReward"]
    assert "HPS_v2.1_compressed.pt" in node.INPUT_TYPES()["required"]["checkpoint"][0]
    reward = node().load("HPS_v2.1_compressed.pt", "pcpo-tiny-ViT", "fp32", 2, False)[0]
    imgs = images(3, seed=6)
    got = assert_batched_equals_single(pcpo, reward, imgs, PROMPTS)
    tok = open_clip_tiny.get_tokenizer("pcpo-tiny-ViT")
    with torch.no_grad():
        i = model.encode_image(hand_clip_pixels(imgs))  # square input at the model's size: letterbox is a no-op
        t = model.encode_text(tok(PROMPTS))
        ref = torch.nn.functional.cosine_similarity(i, t, dim=-1).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, reward_dir / "pcpo_rewards" / "other.pt")
    with pytest.raises(ValueError, match="not an open_clip pcpo-tiny-ViT checkpoint.*xswu/HPSv2"):
        node().load("other.pt", "pcpo-tiny-ViT", "fp32", 2, False)


# ----------------------------------------------------------------------------- ImageReward (BLIP)

def blip_vit_published_keys(depth: int) -> list:
    """The BLIP ViT's parameter names as ImageReward's checkpoint holds them (BLIP ``vit.py``: timm blocks)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return keys


def test_imagereward_key_map_covers_the_real_size_blip_vit_l16():
    from transformers import BlipVisionConfig, BlipVisionModel
    from comfyui_pcpo.rewards.imagereward import vision_key
    with torch.device("meta"):
        hf = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=224, patch_size=16)).state_dict()
    mapped = {vision_key(k) for k in blip_vit_published_keys(24)}
    assert mapped == set(hf)


MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
       "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 32,
       "add_cross_attention": True}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "blue", "dog", "green", "fox"]


def write_tiny_imagereward(folder, seed=0, vit_width=64, depth=2):
    """ImageReward.pt with the published key names (BLIP ViT in timm names, BERT text encoder, mlp head),
    med_config.json and a bert-base-uncased/ tokenizer folder; returns the state dict."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel
    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "bert-base-uncased"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    BertTokenizer(str(tok_dir / "vocab.txt")).save_pretrained(str(tok_dir))
    vocab = len(WORDS) + 2  # + [DEC], [ENC]
    (folder / "med_config.json").write_text(json.dumps(MED), encoding="utf-8")
    g = torch.Generator().manual_seed(seed)
    patch, n_pos, w = 16, (SIZE // 16) ** 2 + 1, vit_width
    shapes = {"cls_token": (1, 1, w), "pos_embed": (1, n_pos, w), "patch_embed.proj.weight": (w, 3, patch, patch),
              "patch_embed.proj.bias": (w,), "norm.weight": (w,), "norm.bias": (w,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.norm1.weight": (w,), f"blocks.{i}.norm1.bias": (w,),
                       f"blocks.{i}.attn.qkv.weight": (3 * w, w), f"blocks.{i}.attn.qkv.bias": (3 * w,),
                       f"blocks.{i}.attn.proj.weight": (w, w), f"blocks.{i}.attn.proj.bias": (w,),
                       f"blocks.{i}.norm2.weight": (w,), f"blocks.{i}.norm2.bias": (w,),
                       f"blocks.{i}.mlp.fc1.weight": (4 * w, w), f"blocks.{i}.mlp.fc1.bias": (4 * w,),
                       f"blocks.{i}.mlp.fc2.weight": (w, 4 * w), f"blocks.{i}.mlp.fc2.bias": (w,)})
    assert set(shapes) == set(blip_vit_published_keys(depth))
    sd = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * (0.2 if k.endswith("weight") and len(s) > 1 else 0.05)
        if "norm" in k and k.endswith("weight"):
            t = 1 + t
        sd["blip.visual_encoder." + k] = t
    torch.manual_seed(seed)
    text = BlipTextModel(BlipTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=w),
                         add_pooling_layer=False)
    for k, v in text.state_dict().items():
        sd["blip.text_encoder." + k] = v.clone()
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # persistent in BLIP's med.py
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = torch.randn(16, w, generator=g), torch.zeros(16)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = torch.randn(16, 32, generator=g), torch.zeros(16)
    from comfyui_pcpo.rewards.clip_models import AestheticHead
    head = AestheticHead(32)
    for k, v in head.state_dict().items():
        sd["mlp." + k] = v.clone()
    torch.save(sd, folder / "ImageReward.pt")
    return sd


def reference_blip_vit(sd, px, heads):
    """BLIP's ViT forward written out from its published weights (timm block: pre-norm attention and MLP,
    LayerNorm eps 1e-6, exact GELU), independent of transformers."""
    p = lambda k: sd["blip.visual_encoder." + k]  # noqa: E731
    F = torch.nn.functional
    x = F.conv2d(px, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([p("cls_token").expand(x.shape[0], -1, -1), x], 1) + p("pos_embed")[:, :x.shape[1] + 1]
    B, N, C = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in {k[len("blip.visual_encoder."):] for k in sd if k.startswith("blip.visual")}:
        b = f"blocks.{i}."
        h = F.layer_norm(x, (C,), p(b + "norm1.weight"), p(b + "norm1.bias"), 1e-6)
        qkv = F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias")).reshape(B, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        x = x + F.linear((a @ v).transpose(1, 2).reshape(B, N, C), p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        h = F.layer_norm(x, (C,), p(b + "norm2.weight"), p(b + "norm2.bias"), 1e-6)
        h = F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))), p(b + "mlp.fc2.weight"),
                     p(b + "mlp.fc2.bias"))
        x = x + h
        i += 1
    return F.layer_norm(x, (C,), p("norm.weight"), p("norm.bias"), 1e-6)


def test_imagereward_through_the_node(pcpo, reward_dir):
    sd = write_tiny_imagereward(reward_dir / "pcpo_rewards" / "ImageReward")
    node = pcpo.nodes["PCPOImageRewardReward"]
    name = "ImageReward/ImageReward.pt"
    assert name in node.INPUT_TYPES()["required"]["checkpoint"][0]
    reward = node().load(name, "fp32", 2, False)[0]
    imgs = images(3, seed=7)
    got = assert_batched_equals_single(pcpo, reward, imgs, PROMPTS)
    m = reward.module
    px = hand_clip_pixels(imgs)
    with torch.no_grad():
        vis = m.vision(pixel_values=px).last_hidden_state
        # the key map and LayerNorm eps reproduce BLIP's own ViT from the published weights
        torch.testing.assert_close(vis, reference_blip_vit(sd, px, heads=64 // 64), rtol=1e-4, atol=1e-4)
        tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert tok["input_ids"].shape == (3, 35) and len(reward.tokenizer) == len(WORDS) + 2
        txt = m.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=vis,
                     encoder_attention_mask=torch.ones(vis.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        ref = ((m.head(txt).squeeze(1) - 0.16717362830052426) / 1.0333394966054072).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_imagereward_missing_files_name_what_and_where(pcpo, reward_dir):
    write_tiny_imagereward(reward_dir / "pcpo_rewards" / "IR")
    node = pcpo.nodes["PCPOImageRewardReward"]()
    (reward_dir / "pcpo_rewards" / "IR" / "bert-base-uncased" / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="bert-base-uncased.*vocab.txt"):
        node.load("IR/ImageReward.pt", "fp32", 2, False)
    (reward_dir / "pcpo_rewards" / "IR" / "med_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="med_config.json.*THUDM/ImageReward"):
        node.load("IR/ImageReward.pt", "fp32", 2, False)


def test_imagereward_unexpected_key_error_names_the_file_and_source(pcpo, reward_dir):
    sd = write_tiny_imagereward(reward_dir / "pcpo_rewards" / "IR")
    node = pcpo.nodes["PCPOImageRewardReward"]()
    path = reward_dir / "pcpo_rewards" / "IR" / "ImageReward.pt"
    torch.save({**sd, "blip.itm_head.weight": torch.zeros(2, 32)}, path)
    with pytest.raises(ValueError, match=r"ImageReward: unexpected key 'blip\.itm_head\.weight' in .*IR/ImageReward\.pt"
                       r".*ImageReward\.pt from the Hugging Face repository THUDM/ImageReward"):
        node.load("IR/ImageReward.pt", "fp32", 2, False)
    torch.save({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(64)}, path)  # an unknown ViT key
    with pytest.raises(ValueError, match=r"unexpected key 'blip\.visual_encoder\.blocks\.0\.ls1\.gamma' in "
                       r".*IR/ImageReward\.pt.*THUDM/ImageReward"):
        node.load("IR/ImageReward.pt", "fp32", 2, False)


# ----------------------------------------------------------------------------- file lists and optional packages

def test_weight_file_lists_leave_out_files_inside_hf_model_folders(pcpo, reward_dir):
    """A Hugging Face folder (config.json) is offered whole as a CLIP folder; its weight files are not heads."""
    rewards = reward_dir / "pcpo_rewards"
    write_tiny_hf_clip(rewards / "PickScore_v1")
    (rewards / "PickScore_v1" / "pytorch_model.bin").write_bytes(b"")
    write_tiny_hf_clip(rewards / "models" / "clip-vit-large-patch14")  # two levels down
    write_aesthetic_head(rewards / "sac+logos+ava1-l14-linearMSE.pth", 8)
    (rewards / "heads").mkdir()
    write_aesthetic_head(rewards / "heads" / "mine.pth", 8)
    write_tiny_imagereward(rewards / "ImageReward")  # med_config.json, not config.json: a checkpoint folder
    for node_name, key in (("PCPOAestheticReward", "head"), ("PCPOHPSReward", "checkpoint"),
                           ("PCPOImageRewardReward", "checkpoint")):
        files = pcpo.nodes[node_name].INPUT_TYPES()["required"][key][0]
        assert "sac+logos+ava1-l14-linearMSE.pth" in files and "heads/mine.pth" in files, (node_name, files)
        assert "ImageReward/ImageReward.pt" in files, (node_name, files)
        assert not [f for f in files if f.startswith(("PickScore_v1/", "models/"))], (node_name, files)
    backbones = pcpo.nodes["PCPOAestheticReward"].INPUT_TYPES()["required"]["backbone"][0]
    assert {"pcpo_rewards/PickScore_v1", "pcpo_rewards/models/clip-vit-large-patch14"} <= set(backbones)
    assert not [b for b in backbones if b.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt"))]


def test_broken_open_clip_import_gives_the_install_hint(pcpo, reward_dir, tmp_path, monkeypatch):
    """open_clip installed but failing to import with another error than ImportError (here a RuntimeError, as
    from a torchvision built for another torch) is the pack's install hint, not a raw traceback."""
    import sys
    fake = tmp_path / "broken_site" / "open_clip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n',
                                      encoding="utf-8")
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.syspath_prepend(str(tmp_path / "broken_site"))
    torch.save({}, reward_dir / "pcpo_rewards" / "HPS_v2.1_compressed.pt")
    with pytest.raises(ImportError, match=r"open_clip_torch, which is installed but fails to import \(RuntimeError: "
                       r"operator torchvision::nms does not exist\).*pip install open_clip_torch"):
        pcpo.nodes["PCPOHPSReward"]().load("HPS_v2.1_compressed.pt", "ViT-H-14", "fp32", 2, False)
    assert "open_clip" not in sys.modules
