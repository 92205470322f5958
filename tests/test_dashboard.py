"""metrics.jsonl and the PCPO Dashboard: the file follows the run (idempotent by iteration, resumed
runs, cut lines), the image renders for 1 and 500 iterations, and what it plots is what the update
returned."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from comfyui_pcpo.dashboard import clip_heatmap, matplotlib_available, render_dashboard, series
from comfyui_pcpo.metrics import (iteration_record, metrics_path, read_metrics, running_mean, tensorboard_available,
                                  truncate_metrics, write_metrics)


def _records(n):
    out = []
    for i in range(1, n + 1):
        r = {"iteration": i, "reward_mean": math.sin(i / 7), "reward_std": 0.1, "reward_running_mean": 0.0,
             "approx_kl": 1e-4 * i, "grad_norm": 1.0 / i, "zero_std_fraction": (i % 3) / 3,
             "clip_fraction_per_step": [((i + s) % 5) / 5 for s in range(6)] + [None]}
        if i % 10 == 0:
            r.update(heldout_reward=0.5 + i / 1000, heldout_guard={"saturation": 0.8 - i / 2000},
                     heldout_kl_base=i / 100)
        if i == 30:
            r["rollback"] = {"iteration": 30, "to_iteration": 20, "reason": "test"}
        out.append(r)
    return out


def test_metrics_file_is_idempotent_by_iteration(tmp_path):
    p = metrics_path(str(tmp_path))
    for i in range(1, 6):
        write_metrics(p, i, {"reward_mean": float(i)})
    write_metrics(p, 5, {"heldout_reward": 0.5}, merge=True)
    assert [r["reward_mean"] for r in read_metrics(p)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert read_metrics(p)[-1]["heldout_reward"] == 0.5
    # a run resumed from the checkpoint of iteration 3 writes iteration 4 again: 4 and 5 are replaced
    write_metrics(p, 4, {"reward_mean": 40.0})
    assert [r["reward_mean"] for r in read_metrics(p)] == [1.0, 2.0, 3.0, 40.0]
    assert [r["iteration"] for r in read_metrics(p, up_to=2)] == [1, 2]
    # a write cut by a crash is skipped, and the next write starts on its own line
    with open(p, "a") as f:
        f.write('{"iteration": 5, "reward_me')
    assert len(read_metrics(p)) == 4
    write_metrics(p, 5, {"reward_mean": 5.0})
    assert [r["iteration"] for r in read_metrics(p)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(p, 3) == 2 and [r["iteration"] for r in read_metrics(p)] == [1, 2, 3]
    # strict JSON: NaN/inf become null
    write_metrics(p, 4, {"grad_norm": float("nan"), "x": [float("inf"), 1.0]})
    with open(p) as f:
        last = json.loads(f.read().splitlines()[-1])
    assert last["grad_norm"] is None and last["x"] == [None, 1.0]


@pytest.mark.parametrize("backend", ["plain", "matplotlib"])
@pytest.mark.parametrize("n", [0, 1, 500])
def test_dashboard_renders(n, backend):
    if backend == "matplotlib" and not matplotlib_available():
        pytest.skip("matplotlib is not installed (optional)")
    recs = _records(n)
    img = render_dashboard(recs, title="run", width=1024, height=768, backend=backend)
    assert img.shape == (768, 1024, 3) and img.dtype == np.uint8
    assert (img < 128).any() and (img > 250).any()  # text and background
    if n >= 30:  # the rollback's line differs from the image without it
        norb = [{k: v for k, v in r.items() if k != "rollback"} for r in recs]
        assert not np.array_equal(img, render_dashboard(norb, title="run", width=1024, height=768, backend=backend))
    small = render_dashboard(recs, width=512, height=384, backend=backend)
    assert small.shape == (384, 512, 3)


def test_heatmap_bins_keep_the_values():
    recs = _records(500)
    mat, spans = clip_heatmap(recs, max_columns=100)
    assert mat.shape == (7, 100) and spans[0][0] == 1 and spans[-1][1] == 500
    assert np.isnan(mat[-1]).all()  # the last step is never trained
    full, _ = clip_heatmap(recs[:5], max_columns=100)
    assert full.shape == (7, 5)
    assert full[2, 3] == pytest.approx(recs[3]["clip_fraction_per_step"][2])
    assert mat[0].mean() == pytest.approx(np.mean([r["clip_fraction_per_step"][0] for r in recs]), abs=1e-9)


def test_iteration_record_running_mean():
    hist = [{"reward_mean": float(i)} for i in range(1, 16)]
    rec = iteration_record({"reward_mean": 15.0, "zero_std_groups": 1, "groups": 4, "grad_norm": 2.0}, hist)
    assert rec["reward_running_mean"] == pytest.approx(np.mean(range(6, 16)))
    assert rec["zero_std_fraction"] == 0.25 and rec["grad_norm"] == 2.0
    assert running_mean([1.0, None, 3.0]) == 2.0


def test_dashboard_plots_the_update_stats(pcpo, tiny, comfy_dirs):
    """In ComfyUI: three updates write three metrics lines equal to the stats the update returned;
    the dashboard plots exactly those series and writes dashboard.png; a run resumed from an older
    checkpoint shows (and then rewrites) only what its checkpoint holds."""
    from test_run_exact import create, inference_model, iterate
    tm = inference_model(tiny)
    sess = create(pcpo, tm, "dash")
    returned = []
    for _ in range(3):
        returned.append(iterate(pcpo, tm, sess))
    path = metrics_path(sess.run_dir)
    recs = read_metrics(path)
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    for r, s in zip(recs, returned):
        for k in ("reward_mean", "reward_std", "clip_fraction", "approx_kl", "grad_norm", "zero_std_groups"):
            assert r[k] == s[k], k
        assert r["clip_fraction_per_step"] == s["clip_fraction_per_step"]
        assert r["lr"] == pytest.approx(1e-3) and r["objective"] == "pcpo"
    assert series(recs, "reward_mean")[1] == [s["reward_mean"] for s in returned]
    assert recs[-1]["reward_running_mean"] == pytest.approx(np.mean([s["reward_mean"] for s in returned]))
    with torch.inference_mode():
        out = pcpo.nodes["PCPODashboard"]().render(sess, 640, 480)
    img, mpath = out["result"]
    assert img.shape == (1, 480, 640, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert mpath == path and os.path.exists(os.path.join(sess.run_dir, "dashboard.png"))
    assert out["ui"]["images"][0]["type"] == "temp"
    expected = render_dashboard(recs, title="dash", width=640, height=480)
    assert torch.equal(img[0], torch.from_numpy(expected).float() / 255)
    # resumed from the checkpoint of iteration 3 while the file says 4: the dashboard stops at 3 ...
    write_metrics(path, 4, {"reward_mean": 99.0})
    sess2 = create(pcpo, tm, "dash", resume=True)
    assert sess2.iteration == 3
    with torch.inference_mode():
        img2 = pcpo.nodes["PCPODashboard"]().render(sess2, 640, 480)["result"][0]
    assert torch.equal(img2, img)
    # ... and its next iteration replaces line 4
    s4 = iterate(pcpo, tm, sess2)
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert read_metrics(path)[-1]["reward_mean"] == s4["reward_mean"] != 99.0


def test_tensorboard_is_optional(tmp_path):
    from comfyui_pcpo.metrics import TensorBoardSink
    wrote = TensorBoardSink.write(str(tmp_path), {"iteration": 1, "reward_mean": 0.5})
    assert wrote == tensorboard_available()
    assert os.path.isdir(tmp_path / "tensorboard") == wrote


def test_demo_workflow_evaluates_guards_and_draws(pcpo, comfy, comfy_dirs):
    """The shipped demo workflow (shrunk as in test_workflows) runs its held-out evaluation after the
    update (iteration 1), the guard keeps that state as the best one and exports it, and the dashboard
    shows the run: its metrics line holds the update's stats and the held-out results."""
    import copy
    import uuid
    from test_workflows import WORKFLOWS, _node_id, _read, shrink
    api = _read(WORKFLOWS / "api" / "demo_tiny_pcpo.json")
    run = f"wf_dash_{uuid.uuid4().hex[:6]}"
    prompt = shrink(api, "demo", run)
    ids = {ct: _node_id(prompt, ct) for ct in ("PCPOLoRAUpdate", "PCPOHeldOutEvaluation", "PCPORewardGuard",
                                               "PCPODashboard")}
    assert prompt[ids["PCPOHeldOutEvaluation"]]["inputs"]["stats"] == [ids["PCPOLoRAUpdate"], 1]
    assert prompt[ids["PCPODashboard"]]["inputs"]["stats"] == [ids["PCPORewardGuard"], 0]
    res = comfy.execute_prompt(copy.deepcopy(prompt))
    stats = json.loads(res.outputs[ids["PCPOLoRAUpdate"]][1])
    held = res.outputs[ids["PCPOHeldOutEvaluation"]][0]
    report = json.loads(res.outputs[ids["PCPORewardGuard"]][0])
    assert held.fresh and held.iteration == 1 and set(held.guards) == {"saturation"}
    assert report["new_best"] and report["best_iteration"] == 1
    assert (comfy_dirs["loras"] / "pcpo" / "demo_tiny_pcpo_best.safetensors").is_file()
    img, path = res.outputs[ids["PCPODashboard"]]
    assert img.shape == (1, 768, 1024, 3) and res.ui[ids["PCPODashboard"]]["images"]
    (rec,) = read_metrics(path)
    assert rec["reward_mean"] == stats["reward_mean"] and rec["grad_norm"] == stats["grad_norm"]
    assert rec["heldout_reward"] == held.reward and rec["heldout_guard"] == held.guards
    assert rec["guard_best_iteration"] == 1


def _count_metrics_reads(monkeypatch, module):
    """Opens of a metrics.jsonl for reading by ``module`` (its own ``open`` name only)."""
    import builtins
    reads = []

    def counting_open(file, mode="r", *a, **kw):
        if str(file).endswith("metrics.jsonl") and "r" in mode and "+" not in mode:
            reads.append(str(file))
        return builtins.open(file, mode, *a, **kw)

    monkeypatch.setattr(module, "open", counting_open, raising=False)
    return reads


def test_metrics_log_reads_the_file_once_and_writes_what_write_metrics_writes(tmp_path, monkeypatch):
    """A MetricsLog reads metrics.jsonl once, then appends / replaces the last line in memory and on
    disk: the file reads back as the same records as write_metrics gives, cut lines included."""
    import comfyui_pcpo.metrics as M
    path = str(tmp_path / "run" / "metrics.jsonl")
    write_metrics(path, 1, {"reward_mean": 0.1})
    with open(path, "a") as f:
        f.write('{"iteration": 2, "reward')  # a write cut by a crash
    steps = [(2, {"reward_mean": 0.2}, False), (2, {"heldout_reward": 0.5}, True), (3, {"reward_mean": 0.3}, False),
             (3, {"rollback": {"to_iteration": 2}}, True), (3, {"reward_mean": 0.35}, False),
             (4, {"reward_mean": float("nan"), "s": "é"}, False), (4, {"guard_best": 0.5}, True),
             (2, {"reward_mean": 0.25}, False),  # resumed from iteration 1: lines 2.. go
             (3, {"reward_mean": 0.4}, False)] + [(i, {"reward_mean": i / 100}, False) for i in range(4, 40)]
    reads = _count_metrics_reads(monkeypatch, M)
    log = M.MetricsLog(path)
    for it, fields, merge in steps:
        got = log.write(it, fields, merge)
        assert log.records() == log.records(up_to=None) and log.records()[-1] == got
    assert len(reads) == 1 and log.records(up_to=3) == log.records()[:3]
    monkeypatch.undo()
    want = {1: {"reward_mean": 0.1, "iteration": 1}}  # what the file means: one record per iteration
    for it, fields, merge in steps:
        rec = {**(want.get(it, {}) if merge else {}), **fields, "iteration": it}
        want = {k: v for k, v in want.items() if k < it}
        want[it] = json.loads(json.dumps(rec).replace("NaN", "null"))
    assert read_metrics(path) == [want[k] for k in sorted(want)] == log.records()
    assert [r["iteration"] for r in read_metrics(path)] == list(range(1, 40))
    assert read_metrics(path)[1] == {"iteration": 2, "reward_mean": 0.25}
    # another writer changed the file: the log reads it again
    write_metrics(path, 40, {"reward_mean": 1.0})
    assert log.records()[-1] == {"iteration": 40, "reward_mean": 1.0}


def test_training_does_not_reread_metrics_and_keeps_one_preview_file(pcpo, tiny, comfy_dirs, monkeypatch):
    """Iterations, held-out style merges and dashboard renders: metrics.jsonl is not read again
    (the records come from memory and equal the file), and the dashboard preview is one temp file
    per run, replaced each time."""
    import sys
    from test_run_exact import create, inference_model, iterate
    dash = pcpo.mod("nodes.dashboard")
    reads = _count_metrics_reads(monkeypatch, sys.modules[dash.read_metrics.__module__])
    tm = inference_model(tiny)
    sess = create(pcpo, tm, "no_reread")
    shown = []
    for i in range(3):
        iterate(pcpo, tm, sess)
        dash.merge_metrics(sess, {"heldout_reward": 0.1 * i})
        with torch.inference_mode():
            out = pcpo.nodes["PCPODashboard"]().render(sess, 320, 256)
        shown.append(out["ui"]["images"][0])
    assert reads == []
    monkeypatch.undo()
    path = metrics_path(sess.run_dir)
    recs = read_metrics(path)
    assert [r["iteration"] for r in recs] == [1, 2, 3] and [r["heldout_reward"] for r in recs] == [0.0, 0.1, 0.2]
    assert dash.metrics_log(sess).records() == recs
    temp = [f for f in os.listdir(comfy_dirs["temp"]) if "no_reread" in f]
    assert temp == ["pcpo_dashboard_no_reread.png"] and all(s["filename"] == temp[0] for s in shown)
    from PIL import Image
    last = np.asarray(Image.open(os.path.join(comfy_dirs["temp"], temp[0])).convert("RGB"))
    assert torch.equal(torch.from_numpy(last.copy()).float().div(255).unsqueeze(0), out["result"][0])
