"""ImageReward v1.0 through transformers' BLIP vision/text classes (the ``image-reward`` package does not
import on current transformers).  Spec section 4.

Files, in one folder: ``ImageReward.pt`` (a plain state dict: ``blip.visual_encoder.*`` BLIP ViT-L/16,
``blip.text_encoder.*`` BERT-base with cross-attention, ``blip.vision_proj/text_proj``, ``mlp.layers.*``),
``med_config.json`` and the ``bert-base-uncased`` tokenizer (``vocab.txt``) in a ``bert-base-uncased/``
subfolder.  The BLIP ViT's timm-style names are mapped to ``BlipVisionModel``'s; the text encoder's
names are the same in both.  Score: ``(mlp(text_encoder(ids, image tokens)[:, 0]) - 0.16717) / 1.03334``.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .base import ModelReward
from .clip_models import AestheticHead
from .preprocess import check_keys, clip_preprocess, read_state_dict

IR_FILE = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_DIR = "bert-base-uncased"
IR_URL = "the Hugging Face repository THUDM/ImageReward (ImageReward.pt and med_config.json)"
BERT_URL = "the Hugging Face repository google-bert/bert-base-uncased (vocab.txt, tokenizer_config.json)"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
VISION_PREFIX, TEXT_PREFIX = "blip.visual_encoder.", "blip.text_encoder."
UNUSED = ("blip.vision_proj.", "blip.text_proj.")  # contrastive projections, not used by the score

_VISION_RULES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def vision_key(k: str) -> str:
    """BLIP ViT (timm naming) -> transformers ``BlipVisionModel``."""
    for pat, rep in _VISION_RULES:
        new, n = re.subn(pat, rep, k)
        if n:
            return new
    raise KeyError(f"unknown BLIP vision key {k!r}")


def split_checkpoint(sd: dict, path: str = "", where: str = "") -> tuple[dict, dict, dict]:
    """-> (vision state dict in HF names, text state dict, head state dict ``layers.*``).  An unknown key is
    an error naming ``path`` (the file) and where to get the right one."""
    vision, text, head = {}, {}, {}
    for k, v in sd.items():
        unexpected = False
        if k.startswith(VISION_PREFIX):
            try:
                vision[vision_key(k[len(VISION_PREFIX):])] = v
            except KeyError:
                unexpected = True
        elif k.startswith(TEXT_PREFIX):
            if not k.endswith("position_ids"):
                text[k[len(TEXT_PREFIX):]] = v
        elif k.startswith("mlp."):
            head[k[len("mlp."):]] = v
        elif not k.startswith(UNUSED):
            unexpected = True
        if unexpected:
            raise ValueError(f"{where}unexpected key {k!r} in {path or 'the ImageReward checkpoint'}: it is not "
                             f"the published ImageReward checkpoint; use {IR_FILE} from {IR_URL}")
    return vision, text, head


def configs(sd: dict, med: dict):
    """BlipVisionConfig / BlipTextConfig from the checkpoint's shapes and ``med_config.json``."""
    from transformers import BlipTextConfig, BlipVisionConfig
    w = sd[VISION_PREFIX + "cls_token"].shape[-1]
    patch = sd[VISION_PREFIX + "patch_embed.proj.weight"].shape[-1]
    n_pos = sd[VISION_PREFIX + "pos_embed"].shape[1]
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(VISION_PREFIX + "blocks."))
    vcfg = BlipVisionConfig(hidden_size=w, intermediate_size=sd[VISION_PREFIX + "blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=w // 64, patch_size=patch,
                            image_size=int(round((n_pos - 1) ** 0.5)) * patch, layer_norm_eps=1e-6,
                            hidden_act="gelu")
    tcfg = BlipTextConfig(vocab_size=sd[TEXT_PREFIX + "embeddings.word_embeddings.weight"].shape[0],
                          hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
                          num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"],
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                          encoder_hidden_size=w, pad_token_id=med.get("pad_token_id", 0))
    return vcfg, tcfg


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vcfg, tcfg):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(vcfg)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        self.head = AestheticHead(tcfg.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        img = self.vision(pixel_values=pixel_values).last_hidden_state
        img_att = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        txt = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                        encoder_attention_mask=img_att, return_dict=True).last_hidden_state[:, 0, :]
        return (self.head(txt.float()).squeeze(1) - MEAN) / STD


def load_tokenizer(folder: str, where: str = ""):
    """BLIP's ``init_tokenizer``: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` (vocab 30524)."""
    if not os.path.isfile(os.path.join(folder, "vocab.txt")):
        raise FileNotFoundError(f"{where}no BERT tokenizer at {folder} (vocab.txt): put the tokenizer files of "
                                f"{BERT_URL} into that folder")
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_imagereward(path: str, dtype: torch.dtype = torch.float32, where: str = ""):
    """(ImageRewardModel in eval mode, tokenizer) from ``path`` with ``med_config.json`` and
    ``bert-base-uncased/`` beside it."""
    folder = os.path.dirname(path)
    med_path = os.path.join(folder, MED_CONFIG)
    if not os.path.isfile(med_path):
        raise FileNotFoundError(f"{where}{MED_CONFIG} must lie beside {os.path.basename(path)} in {folder} "
                                f"(from {IR_URL})")
    with open(med_path, encoding="utf-8") as f:
        med = json.load(f)
    tok = load_tokenizer(os.path.join(folder, TOKENIZER_DIR), where)
    sd = read_state_dict(path, where)
    need = [VISION_PREFIX + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")]
    need.append(TEXT_PREFIX + "embeddings.word_embeddings.weight")
    if any(k not in sd for k in need):
        raise ValueError(f"{where}{path} is not an ImageReward checkpoint (no {[k for k in need if k not in sd][0]}); "
                         f"use {IR_FILE} from {IR_URL}")
    check_keys(sd, AestheticHead.expected_shapes(med["hidden_size"], "mlp."), path, f"Use {IR_FILE} from {IR_URL}.")
    vision, text, head = split_checkpoint(sd, path, where)
    vcfg, tcfg = configs(sd, med)
    with torch.device("meta"):
        model = ImageRewardModel(vcfg, tcfg)
    state = {**{f"vision.{k}": v for k, v in vision.items()}, **{f"text.{k}": v for k, v in text.items()},
             **{f"head.{k}": v for k, v in head.items()}}
    want = set(model.state_dict())
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise ValueError(f"{where}{path} does not match ImageReward's BLIP (missing {missing[:4]}, unexpected "
                         f"{extra[:4]}); use {IR_FILE} from {IR_URL}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    for mod in model.modules():  # non-persistent buffers (position ids) are rebuilt on the CPU
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                if "position_ids" not in name:
                    raise RuntimeError(f"ImageReward model buffer {name!r} is not in the checkpoint")
                mod._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    model.vision.to(dtype)
    model.text.to(dtype)  # the head stays float32, as in ImageReward (``txt_features.float()``)
    return model.eval(), tok


class ImageRewardReward(ModelReward):
    needs_prompt = True

    def __init__(self, model: ImageRewardModel, tokenizer, batch_size: int = 8, name: str = "imagereward"):
        self.module, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.description = "ImageReward v1.0 human preference, standardised (mean 0, std 1 on its data)"

    def _score_batch(self, images, prompts):
        m = self.module
        size = m.vision.config.image_size
        px = clip_preprocess(images, size, size).to(next(m.vision.parameters()).dtype)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt").to(px.device)
        return m(px, tok["input_ids"], tok["attention_mask"])
