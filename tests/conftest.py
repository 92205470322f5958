"""Shared pytest setup: one CPU thread, repo importable, a real ComfyUI host on demand.

Fixtures
--------
comfy       (session) loads ComfyUI in-process once (``comfy_harness.load_comfy``: the tree
            ``$PCPO_COMFYUI_DIR`` of any version, or the cached 0.3.75 that CI runs),
            redirects its output/input/temp/user/loras folders to a session temp folder, and
            returns the ``comfy_harness`` module (``execute_prompt``, ``load_pack``, ...).
tiny        (session) the ``tiny_models`` module (needs ``comfy``).
comfy_dirs  (function) points ComfyUI's folders at this test's ``tmp_path`` via
            ``set_base_dirs`` and returns them ({"output", "input", "temp", "user", "loras"});
            the previous folders are restored afterwards.
"""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

torch.set_num_threads(1)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _p in (str(TESTS_DIR), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _snapshot_dirs():
    import folder_paths
    return {
        "output": folder_paths.get_output_directory(),
        "input": folder_paths.get_input_directory(),
        "temp": folder_paths.get_temp_directory(),
        "user": folder_paths.get_user_directory() if hasattr(folder_paths, "get_user_directory") else None,
        "loras": folder_paths.folder_names_and_paths.get("loras"),
    }


def _restore_dirs(snap):
    import folder_paths
    folder_paths.set_output_directory(snap["output"])
    folder_paths.set_input_directory(snap["input"])
    folder_paths.set_temp_directory(snap["temp"])
    if snap["user"] is not None and hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(snap["user"])
    if snap["loras"] is not None:
        folder_paths.folder_names_and_paths["loras"] = snap["loras"]
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, pytestconfig):
    import comfy_harness
    tree = comfy_harness.load_comfy()
    # "ComfyUI <version> at <path>", once, past pytest's output capture and in -q runs too
    tr = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.ensure_newline()
            tr.write_line(comfy_harness.host().describe(tree))
    comfy_harness.set_base_dirs(tmp_path_factory.mktemp("comfy_session"))
    return comfy_harness


@pytest.fixture(scope="session")
def tiny(comfy):
    import tiny_models
    return tiny_models


@pytest.fixture
def comfy_dirs(comfy, tmp_path):
    snap = _snapshot_dirs()
    dirs = comfy.set_base_dirs(tmp_path / "comfy")
    try:
        yield dirs
    finally:
        _restore_dirs(snap)


@pytest.fixture(scope="session")
def pcpo(comfy):
    """This repository loaded as a ComfyUI custom-node pack (see tests/pcpo_pack.py)."""
    import pcpo_pack
    return pcpo_pack.load(comfy)
