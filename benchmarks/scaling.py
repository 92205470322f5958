"""Throughput of 1 vs 2 processes (torch.distributed, gloo on CPU, one thread each) on the demo model.

    python benchmarks/scaling.py [--iterations 5] [--json scaling.json]
    python benchmarks/scaling.py --smoke --json /tmp/scaling.json   # seconds: 2 groups x 2, 3 steps, 2 iterations

Runs the shipped demo workflow (``workflows/api/demo_tiny_pcpo.json``: 4 prompts x 8 samples per
iteration, 10 steps, PCPO on half of the steps, 2 optimizer steps per rollout) through the product
runner, ``python -m comfyui_pcpo.run``: once in one process (4 groups per iteration), once under
``torchrun --nproc_per_node 2`` (2 groups per rank, the same 4 groups per iteration in all). The
export node is left out and the guard's best-LoRA export is off (training throughput only; they
would write into the ComfyUI tree).

Reported: samples per second over the iterations after the first (which loads the model), the
speed-up, the share of wall time spent in the training collectives (gradient average and stats;
waiting for the slower rank included), and a bare all-reduce of the LoRA gradient buffer on its own
(``--probe``), which is the communication proper.  ``--smoke``: the same runs on the smallest
configuration (2 groups x 2 samples, 3 steps, 2 iterations; held-out evaluation 1 sample, 3 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import _smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "demo_tiny_pcpo.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_tree() -> str:
    sys.path.insert(0, str(ROOT / "tools"))
    import comfyui_host
    return str(comfyui_host.ensure_comfyui())


SMOKE = {"groups": 2, "group_size": 2, "steps": 3, "iterations": 2}


def workflow(prompts_per_iteration: int, run_name: str, smoke: bool = False) -> dict:
    """The demo workflow for this benchmark (``smoke``: with the smoke mode's sizes)."""
    api = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    api = {k: v for k, v in api.items() if v["class_type"] != "PCPOExportLoRA"}
    for node in api.values():
        if node["class_type"] == "PCPOPrompts":
            node["inputs"]["prompts_per_iteration"] = prompts_per_iteration
        elif node["class_type"] == "PCPOLoRA":
            node["inputs"].update(run_name=run_name, resume=False)
        elif node["class_type"] == "PCPORewardGuard":
            node["inputs"]["best_filename"] = ""  # no best-LoRA export into the ComfyUI tree either
        if smoke and node["class_type"] == "PCPOTrajectorySampler":
            node["inputs"].update(steps=SMOKE["steps"], group_size=SMOKE["group_size"])
        elif smoke and node["class_type"] == "PCPOLoRAUpdate":
            node["inputs"]["micro_batch"] = SMOKE["group_size"]
        elif smoke and node["class_type"] == "PCPOHeldOutEvaluation":
            node["inputs"].update(steps=SMOKE["steps"], samples_per_prompt=1)
    return api


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def torchrun(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]


def measure(processes: int, iterations: int, tree: str, work: pathlib.Path, smoke: bool = False) -> dict:
    total, group_size = (SMOKE["groups"], SMOKE["group_size"]) if smoke else (4, 8)
    groups = total // processes
    wf = work / f"wf_{processes}.json"
    wf.write_text(json.dumps(workflow(groups, f"scaling_{processes}p", smoke)), encoding="utf-8")
    timings = work / f"timings_{processes}.jsonl"
    args = [str(wf), "--comfyui", tree, "--iterations", str(iterations), "--out", str(work / f"out_{processes}"),
            "--timings", str(timings), "--timeout", "300"]
    cmd = ([sys.executable] if processes == 1 else torchrun(processes)) + ["-m", "comfyui_pcpo.run"] + args
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process run failed:\n{proc.stdout}\n{proc.stderr}")
    rows = [json.loads(ln) for ln in timings.read_text().splitlines() if ln.strip()]
    steady = rows[1:]
    secs = sum(r["seconds"] for r in steady)
    # CPU seconds per iteration of the busiest process: the iteration time on free cores (the waiting
    # in collectives and for a CPU under contention is not CPU time)
    cpu = [sum(r["cpu_seconds"] for r in steady)]
    for rank in range(1, processes):
        other = [json.loads(ln) for ln in pathlib.Path(f"{timings}.rank{rank}").read_text().splitlines() if ln]
        cpu.append(sum(r["cpu_seconds"] for r in other[1:]))
    coll = rows[-1]["collective_seconds_total"] - rows[0]["collective_seconds_total"]
    samples = total * group_size * len(steady)
    return {"processes": processes, "groups_per_process": groups, "iterations_timed": len(steady),
            "seconds_per_iteration": secs / len(steady), "samples_per_second": samples / secs,
            "cpu_seconds_per_iteration": [c / len(steady) for c in cpu], "cpu_samples_per_second": samples / max(cpu),
            "collective_share": coll / secs if processes > 1 else 0.0,
            "first_iteration_seconds": rows[0]["seconds"], "command_wall_seconds": wall,
            "reward_means": [r["reward_mean"] for r in rows]}


def lora_size(work: pathlib.Path) -> int:
    from safetensors import safe_open
    path = work / "out_1" / "pcpo" / "scaling_1p" / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * max(1, _prod(f.get_slice(k).get_shape()[1:]))
                   for k in f.keys() if k.startswith("lora."))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def probe(numel: int, repeats: int) -> None:
    """(worker, under torchrun) median seconds of one all-reduce of ``numel`` floats."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    buf = torch.randn(numel)
    for _ in range(5):
        dist.all_reduce(buf)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"numel": numel, "median_s": statistics.median(times)}), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=5, help="iterations per run (the first is not timed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=50, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration (2 groups x 2 samples, 3 steps, "
                    "2 iterations), in seconds; needs --json outside benchmarks/")
    a = ap.parse_args(argv)
    if a.probe is not None:
        probe(a.probe, a.repeats)
        return 0
    if a.smoke:
        a.json = _smoke.json_path(a.json)
        a.iterations = SMOKE["iterations"]
    tree = comfy_tree()
    work = pathlib.Path(tempfile.mkdtemp(prefix="pcpo-scaling-"))
    results = [measure(1, a.iterations, tree, work, a.smoke), measure(2, a.iterations, tree, work, a.smoke)]
    numel = lora_size(work)
    p = subprocess.run(torchrun(2) + [str(pathlib.Path(__file__).resolve()), "--probe", str(numel),
                                      "--repeats", "5" if a.smoke else str(a.repeats)], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"all-reduce probe failed:\n{p.stdout}\n{p.stderr}")
    bare = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    one, two = results
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    total, group_size = (SMOKE["groups"], SMOKE["group_size"]) if a.smoke else (4, 8)
    print(f"demo model, {total} groups x {group_size} samples per iteration, {a.iterations - 1} timed iterations, "
          f"one thread per process, gloo; {os.cpu_count()} CPUs, load average {load:.1f} at the end")
    print("| processes | groups per process | wall s / iteration | samples / s | speed-up | time in collectives "
          "| CPU s / iteration (per process) | samples / CPU-s of the busiest process | speed-up (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cpus = " / ".join(f"{c:.2f}" for c in r["cpu_seconds_per_iteration"])
        print(f"| {r['processes']} | {r['groups_per_process']} | {r['seconds_per_iteration']:.2f} | "
              f"{r['samples_per_second']:.2f} | {r['samples_per_second'] / one['samples_per_second']:.2f}x | "
              f"{100 * r['collective_share']:.1f}% | {cpus} | {r['cpu_samples_per_second']:.2f} | "
              f"{r['cpu_samples_per_second'] / one['cpu_samples_per_second']:.2f}x |")
    per_iter = 2  # two optimizer steps per rollout: two gradient all-reduces (+ two tiny stats ones)
    print(f"bare all-reduce of the LoRA gradients ({numel} floats): {1e3 * bare['median_s']:.2f} ms; "
          f"{per_iter} per iteration = {100 * per_iter * bare['median_s'] / two['seconds_per_iteration']:.4f}% "
          "of a 2-process iteration")
    if a.json:
        data = {"config": {"groups": total, "group_size": group_size, "iterations": a.iterations, "smoke": a.smoke},
                "runs": results, "allreduce": bare}
        finite = {f"{r['processes']}p {k}": r[k] for r in results for k in
                  ("seconds_per_iteration", "samples_per_second", "cpu_samples_per_second", "collective_share",
                   "reward_means")}
        finite["allreduce median_s"] = bare["median_s"]
        return _smoke.finish(a.json, data, finite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
