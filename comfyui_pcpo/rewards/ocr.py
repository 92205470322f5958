"""OCR text accuracy (Flow-GRPO's OCR reward) with RapidOCR, whose PP-OCR ONNX weights ship inside the
``rapidocr`` wheel (run by ``onnxruntime`` on the CPU; nothing is downloaded).  Spec section 6.

    target = the prompt's first quoted span ("..."), rec = all recognised text joined;
    both lower-cased with spaces removed;
    dist = 0 if target is contained in rec else min(levenshtein(rec, target), len(target));
    reward = 1 - dist / len(target)            in [0, 1]
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .base import Reward

OCR_INSTALL = "pip install rapidocr onnxruntime"


def quoted_text(prompt: str) -> str:
    """The first span between double quotes (Flow-GRPO: ``prompt.split('"')[1]``)."""
    parts = (prompt or "").split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(f'the OCR reward scores the text in double quotes in the prompt, and prompt {prompt!r} '
                         'has none: write the text to render in quotes, e.g. a sign that says "OPEN"')
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _clean(s: str) -> str:
    return s.lower().replace(" ", "")


def ocr_accuracy(recognised: str, target: str) -> float:
    rec, tgt = _clean(recognised), _clean(target)
    if not tgt:
        raise ValueError(f"the quoted text {target!r} is empty once spaces are removed")
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


def make_engine(threads: int = 0):
    try:
        from rapidocr import RapidOCR
        import onnxruntime  # noqa: F401  (rapidocr does not declare it)
    except ImportError as e:
        raise ImportError(f"the OCR reward needs rapidocr and onnxruntime, which are not installed ({e}); in "
                          f"ComfyUI's Python environment run: {OCR_INSTALL}  (or pip install "
                          "'comfyui-pcpo[rewards]')") from None
    params = {"Global.log_level": "warning"}
    if threads > 0:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
    return RapidOCR(params=params)


def read_text(engine, image_u8: np.ndarray) -> str:
    """All text RapidOCR reads in an RGB uint8 (H, W, 3) image, joined (boxes with score > 0)."""
    out = engine(np.ascontiguousarray(image_u8[..., ::-1]))  # ndarray input is BGR
    txts, scores = getattr(out, "txts", None), getattr(out, "scores", None)
    if not txts:
        return ""
    return "".join(t for t, s in zip(txts, scores or [1.0] * len(txts)) if s > 0)


class OCRReward(Reward):
    needs_prompt = True

    def __init__(self, engine=None, threads: int = 0, name: str = "ocr"):
        self.name, self._engine, self.threads = name, engine, threads
        self.description = "OCR text accuracy: 1 - edit distance / length of the prompt's quoted text (Flow-GRPO)"
        self.last_read: list = []

    @property
    def engine(self):
        if self._engine is None:
            self._engine = make_engine(self.threads)
        return self._engine

    def _score(self, images: torch.Tensor, prompts: Optional[Sequence[str]]):
        targets = [quoted_text(p) for p in prompts]  # every prompt checked before any OCR runs
        arr = (images.detach().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        self.last_read = [read_text(self.engine, a) for a in arr]
        return torch.tensor([ocr_accuracy(r, t) for r, t in zip(self.last_read, targets)], dtype=torch.float64)
