"""A shortened run of the README's demo command (tools/run_demo.py) in a fresh process."""
import json
import os
import pathlib
import subprocess
import sys

from safetensors import safe_open

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shortened_demo_runs_through_comfyui_and_its_lora_reloads(tmp_path, comfy):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "run_demo.py"), "--iterations", "2", "--threads", "1",
         "--out", str(out), "--eval-prompts", "6", "--prompts-per-iteration", "2", "--group-size", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iter   1/2  reward" in proc.stdout and "iter   2/2  reward" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and len(summary["history"]) == 2
    assert summary["lora_keys"] > 0 and summary["lora_keys_not_loaded"] == 0
    for name in ("before_after.png", "reward_curve.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    lora = pathlib.Path(summary["lora"])
    assert lora.is_file() and str(lora).startswith(str(out))
    with safe_open(str(lora), framework="pt") as f:
        md = f.metadata()
        assert md["ss_network_dim"] == "8" and md["pcpo_objective"] == "pcpo"
        assert any(k.endswith(".alpha") for k in f.keys())
    # the run went through ComfyUI's executor and checkpointed into ComfyUI's output folder
    ckpt = out / "comfyui" / "output" / "pcpo" / "demo_tiny_pcpo" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.metadata()["iteration"] == "2"
