"""PCPO Dashboard: the run's stats as an image in the graph, from ``metrics.jsonl`` in the run folder.

``record_iteration`` (called by the LoRA Update right after an iteration is committed) writes that
iteration's line of ``metrics.jsonl`` (and TensorBoard scalars when ``tensorboard`` is installed);
the held-out evaluation and the guard add their fields to the same line.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

import folder_paths

from comfyui_pcpo import distributed
from comfyui_pcpo.atomic import atomic_write
from comfyui_pcpo.commit import current_metrics, flush_metrics, note_metrics
from comfyui_pcpo.dashboard import matplotlib_available, render_dashboard
from comfyui_pcpo.metrics import MetricsLog, TensorBoardSink, iteration_record, metrics_path, read_metrics

log = logging.getLogger("comfyui-pcpo")


def metrics_log(session) -> MetricsLog:
    """The run's ``metrics.jsonl``, read once per session and then kept in memory (this process is
    its only writer)."""
    return session.metrics_log()


def record_iteration(session, stats: dict) -> dict:
    """The committed iteration's metrics record: noted in the run state (the next checkpoint commits
    it) and written as its line of ``metrics.jsonl``; a failed write never stops training and loses
    nothing (the record stays with the run and is written at the next flush)."""
    state = session.state
    if not distributed.is_writer():  # several processes: rank 0 writes the run's files
        return {}
    lr = float(state.optimizer.param_groups[0]["lr"]) if state.optimizer.param_groups else None
    rec = iteration_record(stats, state.history, {"lr": lr, "optimizer_steps": state.optimizer_steps,
                                                  "reward": state.last_reward, "objective": state.last_objective})
    rec = note_metrics(state, {**rec, "iteration": state.iteration})
    if flush_metrics(state, metrics_log(session), session.run_name):
        _tensorboard(session, rec)
    return rec


def merge_metrics(session, fields: dict) -> dict:
    """Add ``fields`` to the current iteration's metrics record (held-out results, guard events)."""
    if not distributed.is_writer():
        return {}
    state = session.state
    base = current_metrics(state)
    if base is None:
        try:
            base = next((r for r in metrics_log(session).records() if r["iteration"] == state.iteration),
                        {"iteration": state.iteration})
        except OSError:
            base = {"iteration": state.iteration}
    rec = note_metrics(state, {**base, **fields, "iteration": state.iteration})
    if flush_metrics(state, metrics_log(session), session.run_name):
        _tensorboard(session, {"iteration": rec["iteration"], **fields})
    return rec


def _tensorboard(session, rec: dict) -> None:
    try:
        TensorBoardSink.write(session.run_dir, rec)
    except OSError as e:
        log.warning("PCPO %s: could not write TensorBoard scalars (%s)", session.run_name, e)


def to_image_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).float().div(255.0).unsqueeze(0)


def preview(arr: np.ndarray, prefix: str) -> dict:
    """Save an image into ComfyUI's temp folder as ``<prefix>.png`` (one file per prefix, replaced
    each time: the page's image URLs carry a cache-busting parameter); returns the ``ui.images``
    entry that shows it."""
    from PIL import Image
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"{prefix}.png"  # written atomically: a reader never sees a half-written file
    atomic_write(os.path.join(folder, name), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG", compress_level=1))
    return {"filename": name, "subfolder": "", "type": "temp"}


class PCPODashboard:
    CATEGORY = "PCPO"
    FUNCTION = "render"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("dashboard", "metrics_path")
    OUTPUT_TOOLTIPS = ("The dashboard image (also output/pcpo/RUN_NAME/dashboard.png).",
                       "Path of the run's metrics.jsonl (one JSON line per iteration, every stat).")
    DESCRIPTION = ("Shows the run in the graph, refreshed every iteration: training reward (mean, spread, running "
                   "mean), held-out rewards with rollbacks marked, KL to the base model, gradient norm, "
                   "zero-variance groups, and the clip fraction per timestep over iterations.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": ("PCPO_SESSION", {"tooltip": "The run (from PCPO LoRA)."}),
            "width": ("INT", {"default": 1024, "min": 256, "max": 4096, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 768, "min": 256, "max": 4096, "step": 8, "tooltip": "Image height."}),
        }, "optional": {
            "stats": ("STRING", {"forceInput": True, "tooltip": "Wire the LoRA Update's stats (or the Reward "
                                 "Guard's report) here so the dashboard draws after this iteration's update."}),
            "last_iterations": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip":
                                        "Plot only the last this many iterations (0 = the whole run)."}),
            "renderer": (["auto", "matplotlib", "plain"], {"default": "auto", "tooltip":
                         "auto: matplotlib when it is installed, else the plain renderer (Pillow only)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def render(self, session, width, height, stats=None, last_iterations=0, renderer="auto"):
        session = session.live()
        path = metrics_path(session.run_dir)
        if distributed.is_writer():  # the writer keeps the records in memory
            records = metrics_log(session).records(up_to=session.state.iteration)
        else:
            records = read_metrics(path, up_to=session.state.iteration)
        if last_iterations and len(records) > last_iterations:
            records = records[-int(last_iterations):]
        if renderer == "matplotlib" and not matplotlib_available():
            raise ValueError("PCPO Dashboard: matplotlib is not installed; set renderer to auto or plain (or "
                             "pip install matplotlib in ComfyUI's environment)")
        arr = render_dashboard(records, title=session.run_name, width=int(width), height=int(height),
                               backend=renderer)
        os.makedirs(session.run_dir, exist_ok=True)
        from PIL import Image
        if distributed.is_writer():  # several processes: rank 0 writes the file
            atomic_write(os.path.join(session.run_dir, "dashboard.png"),
                         lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
        return {"ui": {"images": [preview(arr, f"pcpo_dashboard_{session.run_name}")]},
                "result": (to_image_tensor(arr), path)}


NODE_CLASS_MAPPINGS = {"PCPODashboard": PCPODashboard}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPODashboard": "PCPO Dashboard"}
