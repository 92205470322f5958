"""The dashboard image of a run, drawn from its ``metrics.jsonl`` records (host-free).

:func:`render_dashboard` draws the stats as one RGB image (uint8 array), readable at node size:
with matplotlib when it is installed, else with Pillow alone (never required).  :func:`series` and
:func:`clip_heatmap` turn records into what the panels plot.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .metrics import RUNNING_MEAN_WINDOW

# ------------------------------------------------------------------------------ series for plots

def series(records: list, key: str, sub: Optional[str] = None) -> tuple:
    """(iterations, values) of ``key`` (or ``key[sub]``) over the records that have a number there."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def clip_heatmap(records: list, max_columns: int = 200) -> tuple:
    """(matrix (steps, columns) with NaN where unknown, first and last iteration of each column):
    the clip fraction per timestep over iterations, averaged into at most ``max_columns`` bins."""
    rows = [(int(r["iteration"]), r.get("clip_fraction_per_step")) for r in records
            if isinstance(r.get("clip_fraction_per_step"), list)]
    if not rows:
        return np.zeros((0, 0)), []
    steps = max(len(v) for _, v in rows)
    full = np.full((steps, len(rows)), np.nan)
    for j, (_, v) in enumerate(rows):
        for i, c in enumerate(v):
            if isinstance(c, (int, float)) and math.isfinite(c):
                full[i, j] = c
    n = len(rows)
    cols = min(n, max_columns)
    edges = np.linspace(0, n, cols + 1).round().astype(int)
    out = np.full((steps, cols), np.nan)
    spans = []
    for j in range(cols):
        a, b = edges[j], max(edges[j + 1], edges[j] + 1)
        block = full[:, a:b]
        with np.errstate(all="ignore"):
            cnt = np.sum(~np.isnan(block), 1)
            out[:, j] = np.where(cnt > 0, np.nansum(block, 1) / np.maximum(cnt, 1), np.nan)
        spans.append((rows[a][0], rows[b - 1][0]))
    return out, spans


# ------------------------------------------------------------------------------ the renderer

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
BG, FG, GRID, RED = (255, 255, 255), (20, 20, 20), (225, 225, 225), (214, 39, 40)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a != 0 and (a < 1e-2 or a >= 1e4):
        return f"{v:.2e}"
    return f"{v:.3f}" if a < 10 else f"{v:.1f}"


def _colour(c: float) -> tuple:
    """White -> orange -> dark red for a clip fraction in [0, 1]."""
    c = min(max(c, 0.0), 1.0)
    stops = [(0.0, (255, 255, 255)), (0.3, (253, 174, 97)), (0.6, (215, 48, 39)), (1.0, (103, 0, 13))]
    for (a, ca), (b, cb) in zip(stops, stops[1:]):
        if c <= b:
            t = (c - a) / (b - a)
            return tuple(int(round(x + t * (y - x))) for x, y in zip(ca, cb))
    return stops[-1][1]


class _Panel:
    def __init__(self, draw, box, title, font, small):
        self.d, self.font, self.small = draw, font, small
        x0, y0, x1, y1 = box
        self.x1 = x1
        draw.rectangle(box, outline=(180, 180, 180))
        draw.text((x0 + 8, y0 + 4), title, fill=FG, font=font)
        self.legend_x = x0 + 20 + int(draw.textlength(title, font=font))
        self.legend_y = y0 + 4 + max(0, (getattr(font, "size", 12) - getattr(small, "size", 10)) // 2)
        self.label_w = int(draw.textlength("-0.00e-00", font=small)) + 6
        self.plot = (x0 + self.label_w + 4, y0 + getattr(font, "size", 12) + 16, x1 - 12,
                     y1 - getattr(small, "size", 10) - 10)

    def frame(self, xr, yr):
        self.xr, self.yr = xr, yr
        px0, py0, px1, py1 = self.plot
        for k in range(3):
            y = py0 + (py1 - py0) * k / 2
            self.d.line([(px0, y), (px1, y)], fill=GRID)
            v = yr[1] - (yr[1] - yr[0]) * k / 2
            self.d.text((self.plot[0] - self.label_w, y - getattr(self.small, "size", 10) // 2), _fmt(v), fill=FG,
                        font=self.small)
        self.d.text((px0, py1 + 4), str(int(xr[0])), fill=FG, font=self.small)
        last = str(int(xr[1]))
        self.d.text((px1 - self.d.textlength(last, font=self.small), py1 + 4), last, fill=FG, font=self.small)

    def xy(self, x, y):
        px0, py0, px1, py1 = self.plot
        (a, b), (lo, hi) = self.xr, self.yr
        fx = 0.5 if b == a else (x - a) / (b - a)
        fy = 0.5 if hi == lo else (y - lo) / (hi - lo)
        return px0 + fx * (px1 - px0), py1 - fy * (py1 - py0)

    def line(self, xs, ys, colour, width=2):
        pts = [self.xy(x, y) for x, y in zip(xs, ys)]
        if len(pts) == 1:
            x, y = pts[0]
            self.d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        elif pts:
            self.d.line(pts, fill=colour, width=width)

    def dots(self, xs, ys, colour):
        for x, y in zip(xs, ys):
            px, py = self.xy(x, y)
            self.d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)

    def band(self, xs, lo, hi, colour):
        if len(xs) < 2:
            return
        pts = [self.xy(x, y) for x, y in zip(xs, hi)] + [self.xy(x, y) for x, y in zip(reversed(xs), reversed(lo))]
        self.d.polygon(pts, fill=colour)

    def vline(self, x, colour):
        px, _ = self.xy(x, self.yr[0])
        self.d.line([(px, self.plot[1]), (px, self.plot[3])], fill=colour, width=2)

    def legend(self, items):
        """Colour keys on the title row, right of the title."""
        x, y = self.legend_x, self.legend_y
        h = getattr(self.small, "size", 10)
        for label, colour in items:
            w = 28 + int(self.d.textlength(label, font=self.small))
            if x + w > self.x1 and x > self.plot[0] + 4:  # next row, inside the plot's top
                x, y = self.plot[0] + 4, (self.plot[1] + 2 if y == self.legend_y else y + h + 4)
            self.d.rectangle([x, y + h // 2 - 3, x + 14, y + h // 2 + 3], fill=colour)
            self.d.text((x + 18, y), label, fill=FG, font=self.small)
            x += w


def _range(values: list, pad: float = 0.05) -> tuple:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if hi == lo:
        d = abs(hi) * 0.05 or 0.5
        return (lo - d, hi + d)
    d = (hi - lo) * pad
    return (lo - d, hi + d)


def _empty(p: _Panel, text="no data yet"):
    px0, py0, px1, py1 = p.plot
    p.d.text(((px0 + px1) / 2 - 50, (py0 + py1) / 2 - 8), text, fill=(120, 120, 120), font=p.small)


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except Exception:
        return False


def render_dashboard(records: list, title: str = "", width: int = 1024, height: int = 768,
                     backend: str = "auto") -> np.ndarray:
    """The dashboard of ``records`` (from :func:`read_metrics`) as an (height, width, 3) uint8 image:
    training reward (mean, ±std band, running mean), held-out rewards with rollbacks marked, KL to
    the base model, gradient norm, zero-variance groups, and the clip fraction per timestep over
    iterations as a heatmap.  ``backend``: ``auto`` (matplotlib when installed, else the plain
    Pillow renderer), ``matplotlib`` or ``plain``."""
    if backend not in ("auto", "matplotlib", "plain"):
        raise ValueError(f"unknown dashboard backend {backend!r}")
    if backend == "matplotlib" or (backend == "auto" and matplotlib_available()):
        return render_dashboard_matplotlib(records, title, width, height)
    return render_dashboard_plain(records, title, width, height)


def _headline(records: list, title: str) -> str:
    last = records[-1] if records else {}
    rollbacks = [r["rollback"] for r in records if isinstance(r.get("rollback"), dict)]
    head = f"{title}  iteration {last.get('iteration', 0)}"
    if records:
        head += f"  reward {_fmt(last.get('reward_mean'))}  running {_fmt(last.get('reward_running_mean'))}"
    if rollbacks:
        head += f"  rollbacks {len(rollbacks)} (last {rollbacks[-1].get('iteration')} -> {rollbacks[-1].get('to_iteration')})"
    return head


def render_dashboard_matplotlib(records: list, title: str = "", width: int = 1024, height: int = 768) -> np.ndarray:
    """:func:`render_dashboard` drawn with matplotlib (Agg, no display needed)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as e:
        raise ImportError("the matplotlib dashboard needs matplotlib: pip install matplotlib, or pick the plain "
                          "renderer") from e

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fs = max(7.0, height / 70)
    fig.suptitle(_headline(records, title), fontsize=fs * 1.2, x=0.01, ha="left")
    axes = fig.subplots(3, 2)
    rgb = [tuple(c / 255 for c in col) for col in PALETTE]
    rollbacks = [r for r in records if isinstance(r.get("rollback"), dict)]
    last = records[-1] if records else {}

    ax = axes[0, 0]
    ax.set_title("training reward", fontsize=fs, loc="left")
    xs, mean = series(records, "reward_mean")
    _, std = series(records, "reward_std")
    if xs:
        if len(std) == len(mean):
            ax.fill_between(xs, [m - v for m, v in zip(mean, std)], [m + v for m, v in zip(mean, std)],
                            color=rgb[0], alpha=0.2, lw=0)
        ax.plot(xs, mean, color=rgb[0], lw=1.2, label="mean ± std")
        ax.plot(*series(records, "reward_running_mean"), color=rgb[1], lw=2, label=f"running mean {RUNNING_MEAN_WINDOW}")
    ax = axes[0, 1]
    ax.set_title("held-out", fontsize=fs, loc="left")
    hx, hv = series(records, "heldout_reward")
    if hx:
        ax.plot(hx, hv, "o-", color=rgb[0], ms=3, label=str(last.get("heldout_reward_name") or "reward"))
    for k, g in enumerate(sorted({k for r in records for k in (r.get("heldout_guard") or {})})):
        ax.plot(*series(records, "heldout_guard", g), "o-", color=rgb[(k + 2) % len(rgb)], ms=3, label=g)
    for i, r in enumerate(rollbacks):
        ax.axvline(int(r["iteration"]), color=tuple(c / 255 for c in RED), lw=1.5, label="rollback" if i == 0 else None)
    ax = axes[1, 0]
    ax.set_title("KL", fontsize=fs, loc="left")
    kx, kv = series(records, "heldout_kl_base")
    if kx:
        ax.plot(kx, kv, "o-", color=rgb[3], ms=3, label="to base (held-out)")
    ax.plot(*series(records, "approx_kl"), color=rgb[4], lw=1, label="of each update")
    ax = axes[1, 1]
    ax.set_title("gradient norm", fontsize=fs, loc="left")
    ax.plot(*series(records, "grad_norm"), color=rgb[2], lw=1.2)
    ax = axes[2, 0]
    ax.set_title("zero-variance groups", fontsize=fs, loc="left")
    ax.plot(*series(records, "zero_std_fraction"), color=rgb[5], lw=1.2)
    ax.set_ylim(-0.02, 1.02)
    ax = axes[2, 1]
    ax.set_title("clip fraction per timestep", fontsize=fs, loc="left")
    mat, spans = clip_heatmap(records, max_columns=400)
    if mat.size:
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="OrRd", vmin=0, vmax=max(1e-6, np.nanmax(mat)),
                       interpolation="nearest", extent=(spans[0][0] - 0.5, spans[-1][1] + 0.5, mat.shape[0] - 0.5, -0.5))
        ax.set_ylabel("step", fontsize=fs * 0.8)
        fig.colorbar(im, ax=ax, pad=0.01)
    for a in axes.flat:
        a.tick_params(labelsize=fs * 0.8)
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=fs * 0.75, loc="best", framealpha=0.6)
        if not a.has_data():
            a.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=a.transAxes, fontsize=fs, color="0.5")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(buf[:height, :width]).astype(np.uint8)


def render_dashboard_plain(records: list, title: str = "", width: int = 1024, height: int = 768) -> np.ndarray:
    """:func:`render_dashboard` drawn with Pillow only (no plotting library)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (int(width), int(height)), BG)
    d = ImageDraw.Draw(img)
    font, small = _font(max(12, height // 32)), _font(max(10, height // 44))
    last = records[-1] if records else {}
    rollbacks = [r for r in records if isinstance(r.get("rollback"), dict)]
    d.text((10, 6), _headline(records, title), fill=FG, font=font)
    top = 10 + font.size + 8 if hasattr(font, "size") else 30
    W, H = int(width), int(height) - top
    cw, ch = W // 2, H // 3
    boxes = [(c * cw + 4, top + r * ch + 2, (c + 1) * cw - 4, top + (r + 1) * ch - 4) for r in range(3) for c in range(2)]
    its = [int(r["iteration"]) for r in records]
    xr = (min(its), max(its)) if its else (0, 1)

    # 1. training reward
    p = _Panel(d, boxes[0], "training reward", font, small)
    xs, mean = series(records, "reward_mean")
    _, std = series(records, "reward_std")
    rx, run = series(records, "reward_running_mean")
    if xs:
        lo = [m - s for m, s in zip(mean, std)] if len(std) == len(mean) else mean
        hi = [m + s for m, s in zip(mean, std)] if len(std) == len(mean) else mean
        p.frame(xr, _range(lo + hi + run))
        p.band(xs, lo, hi, (205, 225, 242))
        p.line(xs, mean, PALETTE[0])
        p.line(rx, run, PALETTE[1], width=3)
        p.legend([("mean ± std", PALETTE[0]), (f"running mean {RUNNING_MEAN_WINDOW}", PALETTE[1])])
    else:
        _empty(p)

    # 2. held-out rewards (+ rollbacks)
    p = _Panel(d, boxes[1], "held-out", font, small)
    hx, hv = series(records, "heldout_reward")
    guards = sorted({k for r in records for k in (r.get("heldout_guard") or {})})
    gser = [(g,) + series(records, "heldout_guard", g) for g in guards]
    if hx or any(s[1] for s in gser):
        allv = hv + [v for s in gser for v in s[2]]
        p.frame(xr, _range(allv))
        for r in rollbacks:
            p.vline(int(r["iteration"]), RED)
        items = []
        if hx:
            p.line(hx, hv, PALETTE[0])
            p.dots(hx, hv, PALETTE[0])
            items.append((str(last.get("heldout_reward_name") or "reward"), PALETTE[0]))
        for k, (g, gx, gv) in enumerate(gser):
            c = PALETTE[(k + 2) % len(PALETTE)]
            p.line(gx, gv, c)
            p.dots(gx, gv, c)
            items.append((g, c))
        p.legend(items + ([("rollback", RED)] if rollbacks else []))
    else:
        _empty(p, "no held-out evaluation yet")

    # 3. KL to the base model (held-out) or per update
    p = _Panel(d, boxes[2], "KL", font, small)
    kx, kv = series(records, "heldout_kl_base")
    ax, av = series(records, "approx_kl")
    if kx or ax:
        p.frame(xr, _range(kv + av))
        p.line(ax, av, PALETTE[4], width=1)
        if kx:
            p.line(kx, kv, PALETTE[3])
            p.dots(kx, kv, PALETTE[3])
        p.legend([("to base (held-out)", PALETTE[3]), ("of each update", PALETTE[4])])
    else:
        _empty(p)

    # 4. gradient norm
    p = _Panel(d, boxes[3], "gradient norm", font, small)
    gx, gv = series(records, "grad_norm")
    if gx:
        p.frame(xr, _range(gv))
        p.line(gx, gv, PALETTE[2])
    else:
        _empty(p)

    # 5. zero-variance groups
    p = _Panel(d, boxes[4], "zero-variance groups", font, small)
    zx, zv = series(records, "zero_std_fraction")
    if zx:
        p.frame(xr, (0.0, 1.0))
        p.line(zx, zv, PALETTE[5])
    else:
        _empty(p)

    # 6. clip fraction per timestep (heatmap)
    p = _Panel(d, boxes[5], "clip fraction per timestep", font, small)
    mat, spans = clip_heatmap(records, max_columns=max(1, int(p.plot[2] - p.plot[0])))
    if mat.size:
        px0, py0, px1, py1 = p.plot
        steps, cols = mat.shape
        cwid, rh = (px1 - px0) / cols, (py1 - py0) / steps
        for i in range(steps):
            for j in range(cols):
                v = mat[i, j]
                colour = (235, 235, 235) if np.isnan(v) else _colour(float(v))
                d.rectangle([px0 + j * cwid, py0 + i * rh, px0 + (j + 1) * cwid, py0 + (i + 1) * rh], fill=colour)
        d.text((px0 - p.label_w, py0), "step 0", fill=FG, font=small)
        d.text((px0 - p.label_w, py1 - getattr(small, "size", 10)), f"step {steps - 1}", fill=FG, font=small)
        d.text((px0, py1 + 4), str(spans[0][0]), fill=FG, font=small)
        d.text((px1 - d.textlength(str(spans[-1][1]), font=small), py1 + 4), str(spans[-1][1]), fill=FG, font=small)
        d.text(((px0 + px1) / 2 - 40, py1 + 4), f"max {_fmt(float(np.nanmax(mat)) if np.isfinite(mat).any() else float('nan'))}",
               fill=FG, font=small)
    else:
        _empty(p)
    return np.asarray(img, dtype=np.uint8).copy()
