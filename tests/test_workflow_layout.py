"""The layout of the shipped UI workflows (workflows/*.json), from the JSON alone (no ComfyUI, no browser).

Opened in ComfyUI's page (frontend 1.32 restores the workflow's ``extra.ds`` view as stored; it fits the
graph to the window only when there is no ``ds``), every shipped workflow must be readable in a
1600x1000 browser window:

* the stored zoom ``extra.ds.scale`` is at least 0.6 (below 0.6 the frontend draws every node as an
  empty grey box, its low-quality mode);
* the first nodes of the chain (model loaders, PCPO LoRA or Implicit Reward Guidance, the sampler) lie
  whole, title bar included, inside the part of the canvas that the side bar and the top bars leave
  free (LiteGraph draws a graph point p at (p + offset) * scale);
* no two nodes overlap: a node's rectangle is pos .. pos + size plus the title bar above pos, and
  neighbours keep a gap of GAP canvas units.  tests/test_browser.py checks the same on the page with
  the sizes the frontend gives the nodes, also after a run has put images and text on them.
"""
from __future__ import annotations

import itertools
import json
import pathlib

import pytest

WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))

TITLE_H = 30                # LiteGraph.NODE_TITLE_HEIGHT
MIN_SCALE = 0.6             # LiteGraph's low_quality threshold: below it nodes are drawn as empty boxes
# a 1600x1000 Chromium window: its page is 1600x857 CSS px (tests/test_browser.py checks that); the
# frontend 1.32 covers the canvas with its side bar (left SIDE_BAR px), its banner, workflow tabs,
# workflow menu and Run bar (top TOP_BARS px) and the canvas tool bar (bottom BOTTOM_BAR px)
WINDOW = (1600, 857)
SIDE_BAR, TOP_BARS, BOTTOM_BAR = 56, 135, 50
GAP = 20                    # canvas units between two nodes' rectangles
FIRST_TYPES = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "VAELoader", "PCPODemoModelLoader",
               "PCPOLoRA", "PCPOImplicitRewardGuidance", "PCPOTrajectorySampler", "KSampler"}


def rects(nodes, title_h=TITLE_H) -> dict:
    """id -> (x0, y0, x1, y1) of each node: pos .. pos + size, with the title bar above pos."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - title_h, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in nodes}


def overlaps(boxes: dict, gap: float = 0.0) -> list:
    """Pairs of ids whose rectangles come closer than ``gap`` (an overlap when gap is 0)."""
    out = []
    for (i, a), (j, b) in itertools.combinations(sorted(boxes.items()), 2):
        if a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap:
            out.append((i, j))
    return out


def on_screen(box, scale, offset) -> tuple:
    """The CSS-pixel rectangle of a canvas rectangle under the view (scale, offset)."""
    return ((box[0] + offset[0]) * scale, (box[1] + offset[1]) * scale,
            (box[2] + offset[0]) * scale, (box[3] + offset[1]) * scale)


def outside_view(box, window=WINDOW) -> bool:
    return box[0] < SIDE_BAR or box[1] < TOP_BARS or box[2] > window[0] or box[3] > window[1] - BOTTOM_BAR


def _load(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_workflow_opens_at_a_readable_zoom_with_its_first_nodes_in_view(path):
    wf = _load(path)
    ds = wf["extra"]["ds"]
    assert ds["scale"] >= MIN_SCALE, f"{path.name} opens at {ds['scale']:.0%} zoom (at least {MIN_SCALE:.0%})"
    boxes = rects(wf["nodes"])
    first = [n for n in wf["nodes"] if n["type"] in FIRST_TYPES]
    assert first, f"{path.name} has none of the first nodes {sorted(FIRST_TYPES)}"
    out = {n["type"]: [round(v) for v in on_screen(boxes[n["id"]], ds["scale"], ds["offset"])]
           for n in first if outside_view(on_screen(boxes[n["id"]], ds["scale"], ds["offset"]))}
    assert not out, (f"{path.name}: first nodes outside the free part of the page (left {SIDE_BAR}, top {TOP_BARS}, "
                     f"bottom {BOTTOM_BAR} px covered): {out}")


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_no_two_nodes_overlap(path):
    wf = _load(path)
    boxes = rects(wf["nodes"])
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    bad = [(types[i], i, types[j], j) for i, j in overlaps(boxes, GAP)]
    assert not bad, f"{path.name}: nodes overlap or are closer than {GAP}: {bad}"


def test_the_checks_see_an_overlap_and_a_node_out_of_view():
    """The helpers flag a title bar under a node and a node right of the page."""
    a = {"id": 1, "pos": [0, 30], "size": [100, 100]}
    b = {"id": 2, "pos": [0, 150], "size": [100, 100]}   # its title bar starts at 120 < 130
    assert overlaps(rects([a, b])) == [(1, 2)]
    assert overlaps(rects([a, {**b, "pos": [0, 160]}])) == []
    assert overlaps(rects([a, {**b, "pos": [0, 160]}]), GAP) == [(1, 2)]
    assert not outside_view(on_screen((100, 200, 300, 400), 1.0, (0, 0)))
    assert outside_view(on_screen((100, 200, 1700, 400), 1.0, (0, 0)))
    assert outside_view(on_screen((100, 200, 300, 400), 1.0, (-60, 0)))
    assert outside_view(on_screen((100, 200, 300, 400), 1.0, (0, -80)))
    assert outside_view(on_screen((100, 200, 300, 420), 2.0, (0, 0)))  # its bottom under the tool bar
