"""The headless runner ``python -m comfyui_pcpo.run`` (comfyui_pcpo/run.py).

* workflow checks and the progress line, without ComfyUI;
* a real run in a subprocess through ComfyUI's executor on a tiny SD1.5 (the shipped SD1.5 API
  workflow with its checkpoint loader swapped for the stand-in of tests/tiny_pack): progress lines
  with reward and ETA, checkpoint and export written, a second command resumes from the checkpoint
  to the new target;
* Ctrl-C (SIGINT) mid-run exits with 130 and leaves the run saved at its last completed iteration;
* shipped API workflows run as they are: the tiny demo workflow on its own model (one prompt per
  iteration instead of four, for time), the SDXL and FLUX ones with their model loaders swapped for
  the tiny stand-ins (and sizes shrunk for a CPU).

Helpers here are shared with tests/test_distributed.py.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKFLOWS = REPO_ROOT / "workflows" / "api"
TINY_PACK = TESTS_DIR / "tiny_pack"
LOADER_STANDINS = {"CheckpointLoaderSimple": "PCPOTestCheckpointLoader", "UNETLoader": "PCPOTestUNETLoader",
                   "CLIPLoader": "PCPOTestCLIPLoader", "DualCLIPLoader": "PCPOTestCLIPLoader",
                   "VAELoader": "PCPOTestVAELoader"}
REWARD_STANDINS = {"PCPOAestheticReward", "PCPOPickScoreReward", "PCPOHPSReward", "PCPOImageRewardReward",
                   "PCPOCLIPScoreReward"}
RUN_TIMEOUT_S = 240

# a test-only pack: exports go to $PCPO_TEST_LORAS (not the ComfyUI tree's models/loras), and a node
# that raises on the rank named by $PCPO_TEST_FAIL_RANK at iteration $PCPO_TEST_FAIL_ITERATION
TEST_PACK = '''
import os
import folder_paths
_d = os.environ.get("PCPO_TEST_LORAS")
if _d:
    os.makedirs(_d, exist_ok=True)
    folder_paths.folder_names_and_paths["loras"] = ([_d], folder_paths.supported_pt_extensions)

class PCPOTestFailOnRank:
    CATEGORY = "PCPO/test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    calls = 0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, images):
        PCPOTestFailOnRank.calls += 1
        if (os.environ.get("RANK", "0") == os.environ.get("PCPO_TEST_FAIL_RANK")
                and PCPOTestFailOnRank.calls == int(os.environ.get("PCPO_TEST_FAIL_ITERATION", "1"))):
            raise RuntimeError("injected failure on this rank")
        return (images,)

NODE_CLASS_MAPPINGS = {"PCPOTestFailOnRank": PCPOTestFailOnRank}
'''


def comfy_tree() -> pathlib.Path:
    import comfy_harness
    return comfy_harness.host().ensure_comfyui()


def read_api(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def swap_loaders(api: dict, family: str) -> dict:
    """The workflow with its model loaders (and learned-reward loaders) swapped for tiny stand-ins."""
    p = copy.deepcopy(api)
    for node in p.values():
        ct = node["class_type"]
        if ct in LOADER_STANDINS:
            node["class_type"], node["inputs"] = LOADER_STANDINS[ct], {"family": family}
        elif ct in REWARD_STANDINS:
            node["class_type"], node["inputs"] = "PCPOBuiltinReward", {"reward": "brightness"}
    return p


def node_of(api: dict, class_type: str) -> dict:
    (node,) = [n for n in api.values() if n["class_type"] == class_type]
    return node


def tiny_sd15(prompts_per_iteration: int = 2, run_name: str = "runner_sd15", train_fraction: float = 1.0,
              micro_batch: int = 2, reward: str = "brightness") -> dict:
    """The shipped SD1.5 API workflow on the tiny SD1.5, CPU-sized."""
    p = swap_loaders(read_api("pcpo_sd15_jpeg_compressibility"), "sd15")
    node_of(p, "PCPOLoRA")["inputs"].update(run_name=run_name, learning_rate=1e-3)
    node_of(p, "PCPOPrompts")["inputs"]["prompts_per_iteration"] = prompts_per_iteration
    node_of(p, "PCPOTrajectorySampler")["inputs"].update(steps=4, width=64, height=64, group_size=2)
    node_of(p, "PCPORewardScorer")["inputs"]["reward"] = reward
    node_of(p, "PCPOLoRAUpdate")["inputs"].update(micro_batch=micro_batch, train_fraction=train_fraction)
    node_of(p, "PCPOExportLoRA")["inputs"]["filename"] = f"pcpo_test/{run_name}"
    return p


def write_json(path: pathlib.Path, data: dict) -> pathlib.Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_pack(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "pcpo_runner_test_pack.py"
    path.write_text(TEST_PACK, encoding="utf-8")
    return path


test_pack.__test__ = False  # a helper, not a test


def runner_env(tmp_path: pathlib.Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PCPO_TEST_LORAS=str(tmp_path / "loras"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def runner_args(workflow: pathlib.Path, out: pathlib.Path, iterations: int, tmp_path: pathlib.Path,
                extra: tuple = ()) -> list:
    return ["-m", "comfyui_pcpo.run", str(workflow), "--comfyui", str(comfy_tree()), "--iterations",
            str(iterations), "--out", str(out), "--nodes", str(TINY_PACK), "--nodes", str(test_pack(tmp_path)),
            *extra]


def run_runner(workflow, out, iterations, tmp_path, extra=(), env=None, timeout=RUN_TIMEOUT_S):
    return subprocess.run([sys.executable, *runner_args(workflow, out, iterations, tmp_path, extra)],
                          cwd=REPO_ROOT, env=env or runner_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def checkpoint(out: pathlib.Path, run_name: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    path = out / "pcpo" / run_name / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# --------------------------------------------------------------------------- without ComfyUI

def test_workflow_checks_name_the_problem(tmp_path):
    from comfyui_pcpo import run as runner
    ui = write_json(tmp_path / "ui.json", {"nodes": [], "links": []})
    with pytest.raises(runner.WorkflowError, match="Export \\(API\\)"):
        runner.read_workflow(str(ui))
    api = tiny_sd15()
    assert runner.training_nodes(api)[2] == "runner_sd15"
    two = dict(api, **{"99": copy.deepcopy(node_of(api, "PCPOLoRAUpdate"))})
    with pytest.raises(runner.WorkflowError, match="2 PCPO LoRA Update"):
        runner.training_nodes(two)
    # a POST /prompt body is accepted as it is
    body = write_json(tmp_path / "body.json", {"prompt": api, "client_id": "x"})
    assert runner.read_workflow(str(body)) == api
    proc = subprocess.run([sys.executable, "-m", "comfyui_pcpo.run", str(ui), "--comfyui", str(tmp_path),
                           "--iterations", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "UI workflow" in proc.stderr, proc.stderr


def test_progress_line_has_iteration_reward_and_eta():
    from comfyui_pcpo.run import format_duration, progress_line
    line = progress_line(3, 10, 0.5, 0.45, done=2, elapsed=20.0)
    assert line.startswith("iteration 3/10 | reward 0.5000 (running mean 0.4500) | 10.0 s/it | ETA 1m10s")
    assert format_duration(3725) == "1h02m05s" and format_duration(4) == "4s"
    assert progress_line(4, 4, 1.0, 1.0, 1, 1.0, world=2).endswith("ETA 0s | 2 processes")


# --------------------------------------------------------------------------- real runs

def test_runner_trains_shows_progress_and_resumes(tmp_path):
    wf = write_json(tmp_path / "wf.json", tiny_sd15())
    out = tmp_path / "out"
    timings = tmp_path / "timings.jsonl"
    first = run_runner(wf, out, 2, tmp_path, extra=("--timings", str(timings)))
    assert first.returncode == 0, first.stdout + first.stderr
    rows = [json.loads(ln) for ln in timings.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in rows)
    assert "starts at iteration 0, target 2" in first.stdout
    lines = [ln for ln in first.stdout.splitlines() if ln.startswith("iteration ")]
    assert [ln.split(" |")[0] for ln in lines] == ["iteration 1/2", "iteration 2/2"], first.stdout
    assert all("reward " in ln and "ETA " in ln and "s/it" in ln for ln in lines)
    tensors, md = checkpoint(out, "runner_sd15")
    assert md["iteration"] == "2"
    assert (tmp_path / "loras" / "pcpo_test" / "runner_sd15.safetensors").is_file()

    again = run_runner(wf, out, 3, tmp_path)  # the same command with a higher target continues the run
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed at iteration 2, target 3" in again.stdout
    assert [ln.split(" |")[0] for ln in again.stdout.splitlines() if ln.startswith("iteration ")] == ["iteration 3/3"]
    assert checkpoint(out, "runner_sd15")[1]["iteration"] == "3"
    done = run_runner(wf, out, 3, tmp_path)
    assert done.returncode == 0 and "nothing to do" in done.stdout


def test_a_node_that_fails_validation_is_an_error_not_dropped(tmp_path):
    api = tiny_sd15(run_name="runner_invalid")
    api["95"] = {"class_type": "PCPODashboard", "inputs": {"width": 256, "height": 100, "session": ["2", 1]}}
    res = run_runner(write_json(tmp_path / "wf.json", api), tmp_path / "out", 1, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "node 95 (PCPODashboard)" in res.stderr and "height" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "pcpo" / "runner_invalid").exists()


def test_ctrl_c_exits_cleanly_with_the_run_saved(tmp_path):
    wf = write_json(tmp_path / "wf.json", tiny_sd15(run_name="runner_sigint"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *runner_args(wf, out, 200, tmp_path)], cwd=REPO_ROOT,
                            env=runner_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("iteration 1/200"):
                break
        assert any(ln.startswith("iteration 1/200") for ln in seen), "".join(seen) + proc.stderr.read()
        time.sleep(0.5)  # inside iteration 2
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(seen) + rest + err
    assert "interrupted: run runner_sigint saved at iteration" in err
    saved = int(err.split("saved at iteration ")[1].split()[0])
    done = sum(1 for ln in ("".join(seen) + rest).splitlines() if ln.startswith("iteration "))
    assert saved == done >= 1
    assert checkpoint(out, "runner_sigint")[1]["iteration"] == str(saved)


@pytest.mark.parametrize("name,family", [("demo_tiny_pcpo", None), ("pcpo_sdxl_pickscore", "sdxl"),
                                         ("pcpo_flux_dev_jpeg_compressibility", "flux")])
def test_shipped_api_workflow_runs_in_the_runner(tmp_path, name, family):
    api = read_api(name)
    if family is None:  # the demo model ships with the pack: the workflow as it is, one group for time
        node_of(api, "PCPOPrompts")["inputs"]["prompts_per_iteration"] = 1
    else:  # no real checkpoint here: tiny stand-in loaders, CPU-sized rollouts
        api = swap_loaders(api, family)
        node_of(api, "PCPOTrajectorySampler")["inputs"].update(steps=3, width=64, height=64, group_size=2)
        node_of(api, "PCPOLoRAUpdate")["inputs"].update(micro_batch=2)
        if any(n["class_type"] == "PCPOPrompts" for n in api.values()):
            node_of(api, "PCPOPrompts")["inputs"]["prompts_per_iteration"] = 1
    wf = write_json(tmp_path / f"{name}.json", api)
    out = tmp_path / "out"
    res = run_runner(wf, out, 1, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    run_name = node_of(api, "PCPOLoRA")["inputs"]["run_name"]
    assert checkpoint(out, run_name)[1]["iteration"] == "1"
    export = node_of(api, "PCPOExportLoRA")["inputs"]["filename"]
    assert (tmp_path / "loras" / f"{export}.safetensors").is_file()
