"""The pack runs with its own core, even when another copy of ``comfyui_pcpo`` (e.g. an older
``pip install``) is importable and already imported."""
import os
import subprocess
import sys
import textwrap

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_pack_replaces_a_stale_core_by_its_own(tmp_path):
    stale = tmp_path / "site" / "comfyui_pcpo"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text('__version__ = "stale"\n')
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        import comfyui_pcpo
        assert comfyui_pcpo.__version__ == "stale"
        sys.path.insert(0, {TESTS_DIR!r})
        import comfy_harness as H, pcpo_pack
        H.load_comfy()
        pack = pcpo_pack.load(H)
        assert pack.ok and "PCPOLoRA" in pack.nodes, pack
        import comfyui_pcpo, comfyui_pcpo.run_state
        repo = os.path.realpath(os.path.join({TESTS_DIR!r}, "..", "comfyui_pcpo"))
        assert os.path.realpath(os.path.dirname(comfyui_pcpo.__file__)) == repo, comfyui_pcpo.__file__
        assert comfyui_pcpo.__version__ != "stale"
        print("own core")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                       cwd=str(tmp_path))
    assert p.returncode == 0 and "own core" in p.stdout, p.stderr[-3000:]
    assert "replacing the core imported from" in p.stderr
