"""The Comfy Registry / ComfyUI-Manager entry: ``pyproject.toml`` read by the registry's own parser
(comfy-cli's ``extract_node_configuration``, what ``comfy node publish`` runs, offline), the archive
``comfy node pack`` builds (git's tracked files minus ``.comfyignore``), and the icon and licence the
entry points at."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
config_parser = pytest.importorskip("comfy_cli.registry.config_parser")

sys.path.insert(0, str(REPO / "tools"))
import comfyui_host  # noqa: E402  (the tested ComfyUI floor: what CI fetches)


def parse(path: pathlib.Path, capsys) -> tuple:
    cfg = config_parser.extract_node_configuration(str(path))
    out = capsys.readouterr()
    return cfg, out.out + out.err


def test_the_registry_parser_reads_every_field_and_warns_about_nothing(capsys):
    cfg, said = parse(REPO / "pyproject.toml", capsys)
    assert cfg is not None
    assert "warning" not in said.lower() and "error" not in said.lower(), said
    p, c = cfg.project, cfg.tool_comfy
    # node id: the registry's rule (letters, digits, - _ . ; no doubled specials; starts with a letter)
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*", p.name) and len(p.name) < 100
    from comfyui_pcpo import __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", p.version) and p.version == __version__
    assert p.license.file == "LICENSE" and "Permission is hereby granted" in (REPO / "LICENSE").read_text()
    assert p.urls.repository.startswith("https://github.com/")
    assert p.description and len(p.description) < 500
    # the floor is the oldest ComfyUI the suite runs on in CI, so the Manager never disables a working pack
    assert p.supported_comfyui_version == f">={comfyui_host.COMFYUI_VERSION}"
    assert c.publisher_id and re.fullmatch(r"[a-z0-9-]+", c.publisher_id)
    assert c.display_name
    # the icon is a file of this repository (square, at most 400 px, as the registry shows it)
    m = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)", c.icon)
    assert m, c.icon
    from PIL import Image
    with Image.open(REPO / m.group(1)) as im:
        assert im.format == "PNG" and im.width == im.height <= 400
    # the reward files a workflow may need: where the loaders look, under the names they expect
    from comfyui_pcpo.rewards.clip_models import AESTHETIC_FILE
    from comfyui_pcpo.rewards.imagereward import IR_FILE
    locations = {pathlib.PurePosixPath(x.location).name: x for x in c.models}
    assert {AESTHETIC_FILE, "HPS_v2.1_compressed.pt", IR_FILE, "med_config.json"} <= set(locations)
    for model in c.models:
        assert model.location.startswith("/pcpo_rewards/") and model.model_url.startswith("https://")


def test_the_parser_does_warn_about_a_bad_entry(tmp_path, capsys):
    """The check above can fail: the same parser on a broken copy says what is wrong."""
    text = (REPO / "pyproject.toml").read_text()
    bad = re.sub(r'requires-comfyui = "[^"]*"', 'requires-comfyui = ">=0.3"', text)
    bad = bad.replace('license = { file = "LICENSE" }', 'license = { name = "MIT" }')
    assert bad != text
    (tmp_path / "pyproject.toml").write_text(bad)
    cfg, said = parse(tmp_path / "pyproject.toml", capsys)
    assert "Invalid requires-comfyui" in said and "License should be" in said
    assert cfg.project.supported_comfyui_version == ""


def test_the_registry_archive_holds_the_pack_and_leaves_out_tests_benchmarks_and_tools(tmp_path, monkeypatch):
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout.strip():
        pytest.skip("not a git checkout: the registry archives git's tracked files")
    tracked = set(tracked.stdout.split())
    for needed in (".comfyignore", "LICENSE", "docs/icon.png"):
        if needed not in tracked:
            pytest.skip(f"{needed} is not committed yet: the archive is built from git's tracked files")
    from comfy_cli import file_utils
    monkeypatch.chdir(REPO)  # comfy node pack runs in the pack's folder
    archive = tmp_path / "node.zip"
    file_utils.zip_files(str(archive))
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert {"__init__.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt", "web/pcpo.js",
            "nodes/session.py", "comfyui_pcpo/run_state.py", "workflows/demo_tiny_pcpo.json",
            "workflows/demo_tiny_pcpo.jpg", "workflows/api/demo_tiny_pcpo.json"} <= names
    assert any(n.startswith("comfyui_pcpo/demo/weights/") for n in names)  # the demo model ships
    left_out = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "tools", ".ci")]
    assert not left_out, left_out
    assert not [n for n in names if n.endswith((".pyc", ".log"))]
    # everything a user's ComfyUI imports is in it: every tracked file of the pack's code folders
    code = {n for n in tracked if n.split("/")[0] in ("nodes", "comfyui_pcpo", "web", "workflows")}
    assert code <= names, sorted(code - names)[:5]
