"""A ComfyUI process that trains a tiny SD1.5 run through the real executor, for restart and crash
tests (tests/test_run_exact.py).  Not a test module.

    python tests/run_child.py --base DIR --iterations N [--kill-at update|checkpoint|export
                              --kill-iteration K] [--dump FILE] [--optimizer AdamW] [--alpha 4]

Each executed prompt is one iteration of ``graph()`` (PCPO LoRA with resume on -> Trajectory
Sampler -> VAE Decode -> Reward Scorer -> LoRA Update -> Export), as the LoRA Update node's
re-queue runs it in the app, until the run reaches N iterations; a restarted process resumes from
the run's checkpoint.  ``--kill-at`` ends the process with SIGKILL at a point inside iteration K:
in the second optimizer step of the update, between writing the checkpoint's temp file and its
rename, or between writing the export's temp file and its rename.  ``--dump`` writes the final run
state (LoRA, optimizer state, generator state, export file) as safetensors for comparison.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import types

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
sys.path[:0] = [str(TESTS_DIR), str(REPO_ROOT)]

RUN = "child_run"
EXPORT = "pcpo/child_run"


def graph(optimizer: str = "AdamW", alpha: float = 4.0, export: str = EXPORT) -> dict:
    return {
        "1": {"class_type": "PCPOTestCheckpointLoader", "inputs": {"family": "sd15"}},
        "2": {"class_type": "PCPOLoRA", "inputs": {
            "model": ["1", 0], "run_name": RUN, "rank": 4, "alpha": alpha, "target_layers": "attention",
            "learning_rate": 1e-2, "optimizer": optimizer, "weight_decay": 0.01, "seed": 3, "resume": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "PCPOTrajectorySampler", "inputs": {
            "session": ["2", 1], "steps": 4, "cfg": 3.0, "group_size": 3, "seed": 11, "eta": 1.0,
            "rollout_variant": "uw-sigma", "flow_noise_rule": "constant", "scheduler": "simple",
            "width": 64, "height": 64, "groups": 2, "positive": ["3", 0], "negative": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PCPORewardScorer", "inputs": {"images": ["6", 0], "trajectory": ["5", 1],
                                                           "reward": "brightness"}},
        "8": {"class_type": "PCPOLoRAUpdate", "inputs": {
            "session": ["2", 1], "trajectory": ["5", 1], "rewards": ["7", 0], "objective": "pcpo",
            "clip_range": 1e-4, "advantage_clip": 5.0, "train_fraction": 0.67, "micro_batch": 2, "grad_clip": 1.0,
            "updates_per_rollout": 2, "iterations_per_queue": 1, "checkpoint_every": 1}},
        "9": {"class_type": "PCPOExportLoRA", "inputs": {"session": ["2", 1], "filename": export, "dtype": "fp32",
                                                         "also_diffusers": False, "stats": ["8", 1]}},
    }


def _kill():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill_at: str, kill_iteration: int, pack_session, trajectory_mod) -> None:
    """Install the kill point (instance- or module-scoped, in this child process only)."""
    if kill_at in ("checkpoint", "export"):
        real_os = trajectory_mod.os

        def replace(src, dst):
            is_export = dst.endswith(".safetensors") and os.sep + "loras" + os.sep in dst
            is_ckpt = dst.endswith("checkpoint.safetensors")
            sess = pack_session.SESSIONS.get(RUN)
            it = sess.state.iteration if sess is not None and sess.state is not None else -1
            if it == kill_iteration and ((kill_at == "export" and is_export) or (kill_at == "checkpoint" and is_ckpt)):
                _kill()
            return real_os.replace(src, dst)
        trajectory_mod.os = types.SimpleNamespace(**{k: getattr(real_os, k) for k in dir(real_os) if not k.startswith("__")})
        trajectory_mod.os.replace = replace


def arm_update(kill_iteration: int, pack_session) -> None:
    sess = pack_session.SESSIONS.get(RUN)
    if sess is None or sess.state is None or getattr(sess, "_armed", False):
        return
    opt = sess.state.optimizer
    real_step = opt.step
    calls = {"n": 0}

    def step(*a, **kw):
        if sess.state.iteration + 1 == kill_iteration:
            calls["n"] += 1
            if calls["n"] == 2:
                _kill()
        return real_step(*a, **kw)
    opt.step = step
    sess._armed = True


def dump(path: str, pack_session, loras_dir: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    sess = pack_session.SESSIONS.get(RUN)
    tensors, md = sess.state.state_tensors()
    export = load_file(str(loras_dir / (EXPORT + ".safetensors")))
    tensors.update({f"export.{k}": v for k, v in export.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"iteration": str(sess.state.iteration), "optimizer_steps": str(sess.state.optimizer_steps),
                        "history": md["history"]})
    del torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--kill-at", default="none", choices=["none", "update", "checkpoint", "export"])
    ap.add_argument("--kill-iteration", type=int, default=0)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--alpha", type=float, default=4.0)
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    import comfy_harness as H
    import pcpo_pack
    H.load_comfy()
    dirs = H.set_base_dirs(a.base)
    pack = pcpo_pack.load(H)
    if not H.load_pack(TESTS_DIR / "tiny_pack"):
        raise SystemExit("the tiny stand-in pack did not load")
    pack_session = pack.mod("nodes.session")
    trajectory_mod = sys.modules["comfyui_pcpo.trajectory"]
    arm(a.kill_at, a.kill_iteration, pack_session, trajectory_mod)
    prompt = graph(a.optimizer, a.alpha)
    executor = H.new_executor(fresh=True)
    while True:
        sess = pack_session.SESSIONS.get(RUN)
        if sess is not None and sess.state is not None and sess.state.iteration >= a.iterations:
            break
        if a.kill_at == "update":
            arm_update(a.kill_iteration, pack_session)
        H.execute_prompt(prompt, executor=executor)
        sess = pack_session.SESSIONS.get(RUN)
        if a.kill_at == "update":
            arm_update(a.kill_iteration, pack_session)
        print(f"iteration {sess.state.iteration} steps {sess.state.optimizer_steps}", flush=True)
    if a.dump:
        dump(a.dump, pack_session, dirs["loras"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
