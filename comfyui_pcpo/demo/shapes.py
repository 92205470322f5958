"""Procedural captioned images for the embedded demo model (pure numpy/torch, no ComfyUI).

Every image is one flat-coloured geometric shape on a flat-coloured background, captioned
"a <colour> <shape> on a <colour> background", e.g. "a red circle on a blue background".
The same palette is used by the ``prompt-colour-agreement`` reward to classify pixels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Six well separated colours (RGB in [0, 1]).  Order is fixed: indices are used in the
# reward and in the shipped config, so append only.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.14, 0.70, 0.22),
    "blue": (0.16, 0.30, 0.88),
    "yellow": (0.96, 0.84, 0.14),
    "purple": (0.58, 0.22, 0.78),
    "white": (0.95, 0.95, 0.95),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PALETTE_ARRAY = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (C, 3)

# Words of the caption template (the tokenizer's fixed vocabulary is built from these).
TEMPLATE_WORDS: tuple[str, ...] = ("a", "on", "background")
VOCAB_WORDS: tuple[str, ...] = TEMPLATE_WORDS + COLOURS + SHAPES


@dataclass(frozen=True)
class CaptionSpec:
    colour: str  # shape colour
    shape: str
    background: str  # background colour

    @property
    def text(self) -> str:
        return caption_text(self)


def caption_text(spec: CaptionSpec) -> str:
    return f"a {spec.colour} {spec.shape} on a {spec.background} background"


def all_specs() -> list[CaptionSpec]:
    """Every valid (shape colour != background colour) caption, in a fixed order (90)."""
    return [
        CaptionSpec(c, s, b)
        for c in COLOURS
        for s in SHAPES
        for b in COLOURS
        if b != c
    ]


def sample_specs(n: int, seed: Optional[int] = None, rng: Optional[np.random.Generator] = None) -> list[CaptionSpec]:
    """``n`` random caption specs (uniform over shape colour, shape, background != colour)."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = int(rng.integers(len(COLOURS)))
        b = int(rng.integers(len(COLOURS) - 1))
        b = b + 1 if b >= c else b
        s = int(rng.integers(len(SHAPES)))
        out.append(CaptionSpec(COLOURS[c], SHAPES[s], COLOURS[b]))
    return out


def sample_captions(n: int, seed: Optional[int] = None) -> list[str]:
    """``n`` random caption strings, reproducible from ``seed``."""
    return [caption_text(s) for s in sample_specs(n, seed=seed)]


_WORD = re.compile(r"[a-z]+")


def parse_caption(prompt: str) -> Optional[CaptionSpec]:
    """Parse a caption into a :class:`CaptionSpec`; ``None`` if it names no shape colour.

    Tolerant: the first colour word is the shape colour; a colour word directly before
    "background" is the background colour (otherwise the second colour word, if any).
    """
    words = _WORD.findall(prompt.lower())
    colour = background = shape = None
    for i, w in enumerate(words):
        if w in PALETTE:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if nxt == "background":
                background = w
            elif colour is None:
                colour = w
            elif background is None:
                background = w
        elif w in SHAPES and shape is None:
            shape = w
    if colour is None:
        return None
    return CaptionSpec(colour, shape or "", background or "")


def colour_words(prompt: str) -> tuple[Optional[str], Optional[str]]:
    """(shape colour name, background colour name) named in ``prompt``; ``None`` where absent."""
    spec = parse_caption(prompt)
    if spec is None:
        return None, None
    return spec.colour, (spec.background or None)


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size, size) mask of one randomly sized and placed shape."""
    r = rng.uniform(0.20, 0.32) * size  # "radius" (half extent)
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.88
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # upright isosceles triangle inscribed in the circle of radius r (apex up)
        top, bottom = -r, 0.6 * r
        t = (dy - top) / (bottom - top)  # 0 at apex, 1 at base
        half_w = t * r * 1.05
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_w)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: CaptionSpec, size: int = 32, rng: Optional[np.random.Generator] = None,
           jitter: float = 0.03) -> np.ndarray:
    """Render ``spec`` as an (size, size, 3) float32 image in [0, 1].

    Colours get a small random jitter (``jitter`` per channel) so the data is not perfectly
    flat; the shape's size and position are random.
    """
    rng = rng if rng is not None else np.random.default_rng()
    fg = np.asarray(PALETTE[spec.colour], dtype=np.float32) + rng.uniform(-jitter, jitter, 3)
    bg = np.asarray(PALETTE[spec.background], dtype=np.float32) + rng.uniform(-jitter, jitter, 3)
    mask = _shape_mask(spec.shape, size, rng)
    img = np.where(mask[..., None], fg[None, None, :], bg[None, None, :])
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_batch(specs: Sequence[CaptionSpec], size: int = 32, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """(N, size, size, 3) float32 images for ``specs``."""
    rng = rng if rng is not None else np.random.default_rng()
    return np.stack([render(s, size, rng) for s in specs])


def nearest_palette_index(images) -> "np.ndarray":
    """Index into :data:`COLOURS` of the nearest palette colour of every pixel.

    ``images``: (..., 3) array or tensor in [0, 1]; returns an int array of shape (...).
    """
    x = np.asarray(images, dtype=np.float32)
    d = ((x[..., None, :] - PALETTE_ARRAY) ** 2).sum(-1)
    return d.argmin(-1)


# The demo's training captions: those the base model (400 training steps) paints in the prompted
# colour sometimes but not always -- mean prompt-colour agreement between 0.3 and 0.8 over 4 seeds,
# 10 DDIM steps, cfg 4.  Captions it always gets right, or never (every sample of a group scores
# the same), give a group no reward variance and so no gradient.
TRAINING_CAPTIONS = [
    "a green triangle on a red background", "a white triangle on a green background",
    "a green circle on a red background", "a white triangle on a red background",
    "a blue triangle on a red background", "a blue square on a red background",
    "a blue circle on a white background", "a white square on a green background",
    "a blue circle on a red background", "a purple square on a white background",
    "a white square on a red background", "a white circle on a green background",
    "a white triangle on a purple background", "a white circle on a red background",
    "a yellow square on a purple background", "a white square on a blue background",
    "a white circle on a blue background", "a yellow square on a blue background",
    "a yellow circle on a blue background", "a blue square on a white background",
    "a purple circle on a red background", "a green square on a white background",
    "a purple triangle on a green background", "a green square on a yellow background",
    "a green circle on a yellow background", "a yellow circle on a purple background",
    "a purple triangle on a red background", "a purple circle on a green background",
    "a purple triangle on a white background",
]
