"""benchmarks/gpu_check.py runs end to end on a CPU with --tiny (the code path a GPU run takes)."""
import json
import math
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--iterations", "2", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run_passes_and_reports(tmp_path):
    out = tmp_path / "check.json"
    p = run("--families", "sd15,sdxl,flux", "--precisions", "bf16,fp16", "--json", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "gpu check: all OK" in p.stdout and "ComfyUI" in p.stdout + p.stderr
    res = json.loads(out.read_text())["results"]
    assert {(r["family"], r["precision"]) for r in res} == {(f, p) for f in ("sd15", "sdxl", "flux") for p in ("bf16", "fp16")}
    for r in res:
        assert r["ok"] and r["compute"] == r["precision"] and len(r["iterations"]) == 2
        assert r["checkpointing"] == (r["family"] != "sd15")  # auto: on for SDXL and FLUX
        for it in r["iterations"]:
            # the first update is on-policy (every pair inside the trust region: a gradient); a later one
            # may find every pair already past it (PCPO's hinge off: exactly 0, e.g. sd15 bf16 on some CPUs)
            g = it["grad_norms"]
            assert it["first_update_log_ratio"] == 0.0 and g[0] > 0 and it["skipped_steps"] == 0
            assert all(math.isfinite(x) and x >= 0 for x in g)


def test_gpu_check_exits_non_zero_on_a_failure():
    p = run("--families", "flux", "--precisions", "bf16", "--max-log-ratio", "-1")
    assert p.returncode == 1 and "FAILED" in p.stdout and "first-update log-ratio" in p.stdout
