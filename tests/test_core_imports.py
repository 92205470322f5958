import subprocess
import sys
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_imports_no_comfyui_diffusers_or_transformers():
    code = (
        "import sys, importlib, pkgutil, comfyui_pcpo\n"
        "for m in pkgutil.walk_packages(comfyui_pcpo.__path__, 'comfyui_pcpo.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('comfy', 'folder_paths', 'nodes', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "print('LOADED', sorted(k for k in sys.modules if k.startswith('comfyui_pcpo')))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for mod in ("transition_kernels", "credit_weights", "step_plan", "run_state", "dashboard", "objectives", "trainer", "export", "rewards.colour", "demo.model"):
        assert f"comfyui_pcpo.{mod}" in proc.stdout
