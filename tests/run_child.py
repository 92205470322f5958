"""A ComfyUI process that trains a tiny SD1.5 run through the real executor, for restart and crash
tests (tests/test_run_exact.py).  Not a test module.

    python tests/run_child.py --base DIR --iterations N [--kill-at update|checkpoint|export|write
                              --kill-iteration K [--kill-write W]] [--dump FILE] [--optimizer AdamW]
                              [--alpha 4] [--guard] [--human] [--window]

Each executed prompt is one iteration of ``graph()`` (PCPO LoRA with resume on -> Trajectory
Sampler -> VAE Decode -> Reward Scorer -> LoRA Update -> Export), as the LoRA Update node's
re-queue runs it in the app, until the run reaches N iterations; a restarted process resumes from
the run's checkpoint.  ``--kill-at`` ends the process with SIGKILL at a point inside iteration K:
in the second optimizer step of the update, between writing the checkpoint's temp file and its
rename, or between writing the export's temp file and its rename; ``--kill-at write`` ends it just
before the W-th file write (any ``os.replace``, metrics line or ratings line) of the prompt that
runs iteration K.  ``--guard`` adds a Held-out Evaluation and a Reward Guard with zero margins
(it rolls back and lowers the learning rate whenever the held-out reward is not a new best);
``--human`` scores with PCPO Human Rating, answered by a rater thread in this process through the
rating registry the page's routes use (best: the image id that sorts first, worst: the last).
``--full-disk-iteration K`` runs the prompt of iteration K with a file-size limit
(``--full-disk-bytes``, default 128 KiB) that lets log lines through and fails the checkpoint's
write, as a nearly full disk does, prints the prompt's error and goes on.  ``--dump`` writes the final run state (LoRA, optimizer state, generator state, export file) as
safetensors for comparison.  ``--window`` samples 6 steps with a 2-step SDE window that slides every
iteration (dpmpp_2m outside it).
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


def graph(optimizer: str = "AdamW", alpha: float = 4.0, export: str = EXPORT, guard: bool = False,
          human: bool = False, window: bool = False) -> dict:
    g = _graph(optimizer, alpha, export)
    if window:
        g["12"] = {"class_type": "PCPOSDEWindow", "inputs": {"window_steps": 2, "schedule": "sliding",
                                                             "window_start": 0, "slide_every": 1,
                                                             "ode_sampler": "dpmpp_2m"}}
        g["5"]["inputs"].update(steps=6, sde_window=["12", 0])
    if guard:
        g["10"] = {"class_type": "PCPOHeldOutEvaluation", "inputs": {
            "session": ["2", 1], "clip": ["1", 1], "vae": ["1", 2], "prompts": "a blue square\na green circle",
            "negative": "", "every": 1, "samples_per_prompt": 2, "steps": 4, "cfg": 3.0, "eta": 1.0,
            "scheduler": "simple", "width": 64, "height": 64, "seed": 5, "reward": "brightness",
            "guard_reward": "(none)", "stats": ["8", 1]}}
        g["11"] = {"class_type": "PCPORewardGuard", "inputs": {
            "session": ["2", 1], "heldout": ["10", 0], "heldout_margin": 0.0, "guard_margin": 0.0, "kl_bound": 0.0,
            "action": "lower_lr", "lr_factor": 0.5, "best_filename": "", "dtype": "fp32"}}
    if human:
        g["7"] = {"class_type": "PCPOHumanRating", "inputs": {
            "images": ["6", 0], "trajectory": ["5", 1], "mode": "best-worst", "human_groups": 0, "unrated": "skip",
            "calibration": "rank", "timeout_s": 120, "reward": "brightness"}}
    return g


def _graph(optimizer: str, alpha: float, export: str) -> dict:
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


WRITES = {"prompt_start": None, "n": 0, "log": []}


def arm_writes(kill_iteration: int, kill_write: int, pack_session) -> None:
    """Count the file writes of each prompt (os.replace, metrics lines, ratings lines) and end the
    process just before write ``kill_write`` of the prompt that runs iteration ``kill_iteration``.  The
writes of ``Session.repair`` (the logs made to follow a checkpoint just resumed: a metrics line of
the killed iteration dropped, guard.json rewritten) are not counted, so write W is the same write
of the iteration in every resumed process."""
    import comfyui_pcpo.metrics as M
    import comfyui_pcpo.ratings as RT

    def hit(what):
        if WRITES.get("repairing"):  # the derived logs following a resumed checkpoint: not the iteration's
            return
        WRITES["n"] += 1
        WRITES["log"].append(what)
        if WRITES["prompt_start"] == kill_iteration - 1 and WRITES["n"] == kill_write:
            print(f"killed before write {kill_write}: {what}", flush=True)
            _kill()

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        hit(f"replace {os.path.basename(str(dst))}")
        return real_replace(src, dst, *a, **kw)
    os.replace = replace
    real_write = M.MetricsLog.write

    def mwrite(self, iteration, fields, merge=False):
        hit(f"metrics line {iteration}")
        return real_write(self, iteration, fields, merge)
    M.MetricsLog.write = mwrite
    real_append = RT.append_jsonl

    def append(path, record):
        hit(f"ratings line {os.path.basename(path)}")
        return real_append(path, record)
    RT.append_jsonl = append
    real_repair = pack_session.Session.repair

    def repair(self):
        WRITES["repairing"] = True
        try:
            return real_repair(self)
        finally:
            WRITES["repairing"] = False
    pack_session.Session.repair = repair


def start_rater() -> None:
    """The page, in this process: answer every pending rating request deterministically."""
    import threading
    import time
    import comfyui_pcpo.ratings as RT

    def rate():
        while True:
            for req in RT.REGISTRY.pending():
                ratings = {str(g["group"]): {"best": sorted(g["images"])[0], "worst": sorted(g["images"])[-1]}
                           for g in req.groups}
                try:
                    RT.REGISTRY.submit({"request_id": req.request_id, "ratings": ratings})
                except LookupError:
                    pass
            time.sleep(0.02)
    threading.Thread(target=rate, daemon=True).start()


def arm(kill_at: str, kill_iteration: int, pack_session, atomic_mod) -> None:
    """Install the kill point (instance- or module-scoped, in this child process only)."""
    if kill_at in ("checkpoint", "export"):
        real_os = atomic_mod.os

        def replace(src, dst):
            is_export = dst.endswith(".safetensors") and os.sep + "loras" + os.sep in dst
            is_ckpt = dst.endswith("checkpoint.safetensors")
            sess = pack_session.SESSIONS.get(RUN)
            it = sess.state.iteration if sess is not None and sess.state is not None else -1
            if it == kill_iteration and ((kill_at == "export" and is_export) or (kill_at == "checkpoint" and is_ckpt)):
                _kill()
            return real_os.replace(src, dst)
        atomic_mod.os = types.SimpleNamespace(**{k: getattr(real_os, k) for k in dir(real_os) if not k.startswith("__")})
        atomic_mod.os.replace = replace


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
    import json
    import comfyui_pcpo.ratings as RT
    run_dir = pathlib.Path(sess.run_dir)
    metrics = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    guard = json.loads((run_dir / "guard.json").read_text()) if (run_dir / "guard.json").exists() else None
    trained = {it: [{k: r[k] for k in ("iteration", "status", "groups")} for r in recs]
               for it, recs in RT.trained_ratings(str(run_dir / "ratings.jsonl")).items()}
    rating_records = [r for r in RT.read_jsonl(str(run_dir / "ratings.jsonl")) if not RT.is_mark(r)]
    save_file({k: v.contiguous() for k, v in tensors.items()}, path,
              metadata={"iteration": str(sess.state.iteration), "optimizer_steps": str(sess.state.optimizer_steps),
                        "history": md["history"], "metrics_jsonl": metrics, "guard_json": json.dumps(guard),
                        "guard_companion": md.get("companion_guard", ""), "lineage": md["lineage"],
                        "lr": json.dumps([g["lr"] for g in sess.state.optimizer.param_groups]),
                        "trained_ratings": json.dumps(trained, sort_keys=True),
                        "rating_records": str(len(rating_records))})
    del torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--kill-at", default="none", choices=["none", "update", "checkpoint", "export", "write"])
    ap.add_argument("--kill-iteration", type=int, default=0)
    ap.add_argument("--kill-write", type=int, default=0)
    ap.add_argument("--guard", action="store_true")
    ap.add_argument("--human", action="store_true")
    ap.add_argument("--full-disk-iteration", type=int, default=0)
    ap.add_argument("--full-disk-bytes", type=int, default=128 * 1024)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--window", action="store_true")
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
    atomic_mod = sys.modules["comfyui_pcpo.atomic"]
    arm(a.kill_at, a.kill_iteration, pack_session, atomic_mod)
    if a.kill_at == "write":
        arm_writes(a.kill_iteration, a.kill_write, pack_session)
    if a.human:
        pack.mod("nodes.human_routes").register_with_server = lambda: True
        start_rater()
    prompt = graph(a.optimizer, a.alpha, guard=a.guard, human=a.human, window=a.window)
    executor = H.new_executor(fresh=True)
    ckpt = pathlib.Path(dirs["output"]) / "pcpo" / RUN / "checkpoint.safetensors"
    while True:
        sess = pack_session.SESSIONS.get(RUN)
        if sess is not None and sess.state is not None and sess.state.iteration >= a.iterations:
            break
        if sess is None or sess.state is None:
            import comfyui_pcpo.run as runner
            WRITES["prompt_start"] = runner.checkpoint_iteration(str(ckpt)) or 0
        else:
            WRITES["prompt_start"] = sess.state.iteration
        WRITES["n"], WRITES["log"] = 0, []
        if a.kill_at == "update":
            arm_update(a.kill_iteration, pack_session)
        full = a.full_disk_iteration and WRITES["prompt_start"] == a.full_disk_iteration - 1
        if full:  # a disk that takes small writes (log lines) but not a checkpoint, for this one prompt
            import resource
            import signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write fails with EFBIG instead
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (a.full_disk_bytes, limits[1]))
        try:
            H.execute_prompt(prompt, executor=executor)
        except H.PromptError as e:
            if not full:
                raise
            print(f"prompt failed: {str(e).splitlines()[0] if str(e) else e!r}", flush=True)
        finally:
            if full:
                resource.setrlimit(resource.RLIMIT_FSIZE, limits)
                a.full_disk_iteration = 0
        sess = pack_session.SESSIONS.get(RUN)
        if a.kill_at == "update":
            arm_update(a.kill_iteration, pack_session)
        print(f"iteration {sess.state.iteration} steps {sess.state.optimizer_steps} writes {len(WRITES['log'])}: "
              + "; ".join(WRITES["log"]), flush=True)
    if a.dump:
        dump(a.dump, pack_session, dirs["loras"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
