"""Tiny word-level tokenizer and text encoder of the embedded demo model (pure torch).

No download: the vocabulary is the fixed word list of :mod:`comfyui_pcpo.demo.shapes`.
The encoder maps token ids (B, L) to a cross-attention context (B, L, context_dim); the
node layer wraps that into a ComfyUI CONDITIONING ``[[context, {}]]``.  The empty prompt
"" encodes to the unconditional context used for classifier-free guidance.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from .shapes import VOCAB_WORDS

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + VOCAB_WORDS
PAD, BOS, EOS, UNK = 0, 1, 2, 3
MAX_LENGTH = 10  # <bos> + 8 caption words + <eos>

_WORD = re.compile(r"[a-z]+")


class WordTokenizer:
    """Lower-cases, splits on non-letters, maps words to ids (unknown -> <unk>), pads."""

    def __init__(self, vocab: Sequence[str] = VOCAB, max_length: int = MAX_LENGTH):
        self.vocab = tuple(vocab)
        self.max_length = int(max_length)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [BOS] + [self.index.get(w, UNK) for w in _WORD.findall(text.lower())]
        ids = ids[: self.max_length - 1] + [EOS]
        return ids + [PAD] * (self.max_length - len(ids))

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def decode(self, ids) -> str:
        words = [self.vocab[int(i)] for i in ids]
        return " ".join(w for w in words if w not in SPECIAL_TOKENS)


class TinyTextEncoder(nn.Module):
    """Token + position embedding, a few pre-norm transformer layers, final LayerNorm.

    forward(ids (B, L) long) -> (B, L, context_dim) float.
    """

    def __init__(self, vocab_size: int = len(VOCAB), context_dim: int = 64, num_layers: int = 2,
                 num_heads: int = 4, ff_mult: int = 2, max_length: int = MAX_LENGTH):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, context_dim=context_dim, num_layers=num_layers,
                           num_heads=num_heads, ff_mult=ff_mult, max_length=max_length)
        self.token_embedding = nn.Embedding(vocab_size, context_dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, context_dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(context_dim, num_heads, dim_feedforward=ff_mult * context_dim,
                                       dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(context_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


def encode_prompts(encoder: TinyTextEncoder, tokenizer: WordTokenizer, prompts: Sequence[str] | str) -> torch.Tensor:
    """Convenience: prompts -> context (B, L, context_dim) on the encoder's device/dtype."""
    p = next(encoder.parameters())
    with torch.no_grad():
        return encoder(tokenizer(prompts).to(p.device))
