"""Packaging: installing the pack never touches torch.

* requirements.txt (what ComfyUI-Manager installs) and pyproject's runtime dependencies name no
  torch/torchvision/torchaudio, and nothing they pull (through the installed distributions' metadata)
  requires torch either;
* every third-party module that nodes/, comfyui_pcpo/ or the pack's __init__.py import (at module
  level or lazily) is in requirements.txt or in ComfyUI's own requirements.txt;
* every third-party module the headless core imports, torch aside, is a runtime dependency in
  pyproject.toml, and the diffusers/PEFT interop packages are only extras.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import pathlib
import re
import sys

import pytest
from packaging.requirements import Requirement

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: pathlib.Path) -> list[Requirement]:
    reqs = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _runtime_dependencies() -> list[Requirement]:
    return [Requirement(r) for r in _pyproject()["project"].get("dependencies", [])]


def _imported_modules(paths) -> dict[str, set[str]]:
    """Top-level absolute module names imported anywhere in the given Python files -> the files."""
    found: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def _pack_files():
    files = [REPO_ROOT / "__init__.py"]
    for folder in ("nodes", "comfyui_pcpo"):
        files += sorted((REPO_ROOT / folder).rglob("*.py"))
    return files


def _host_modules(comfy_dir: pathlib.Path) -> set[str]:
    """Top-level modules a ComfyUI tree provides itself (comfy, nodes, server, folder_paths, ...)."""
    out = set()
    for p in comfy_dir.iterdir():
        if p.suffix == ".py":
            out.add(p.stem)
        elif p.is_dir() and not p.name.startswith("."):
            out.add(p.name)
    return out


def _distributions(module: str) -> set[str]:
    return {_norm(d) for d in md.packages_distributions().get(module, [])}


def _closure(reqs) -> set[str]:
    """Distribution names reachable from ``reqs`` through the installed metadata (no extras)."""
    seen: set[str] = set()
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            sub = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        todo += [Requirement(s) for s in sub]
    return seen


def test_requirements_txt_and_runtime_dependencies_never_pull_torch():
    reqs = _requirements(REPO_ROOT / "requirements.txt")
    runtime = _runtime_dependencies()
    for req in reqs + runtime:
        assert _norm(req.name) not in TORCH_FAMILY, f"{req} would let pip replace ComfyUI's torch"
    reachable = _closure(reqs + runtime)
    assert not reachable & TORCH_FAMILY, f"torch is pulled in through {sorted(reachable)}"
    extras = _pyproject()["project"].get("optional-dependencies", {})
    heavy = {"diffusers", "peft", "transformers"}
    assert not {_norm(r.name) for r in runtime} & heavy, "diffusers/PEFT belong in the interop extra"
    assert heavy <= {_norm(Requirement(r).name) for r in extras.get("interop", [])}
    assert heavy <= {_norm(Requirement(r).name) for r in extras.get("test", [])}, \
        "the tests import diffusers and load LoRAs through PEFT"


def test_every_third_party_import_is_in_requirements_or_comfyuis(comfy):
    comfy_dir = pathlib.Path(comfy.load_comfy())
    provided = {_norm(r.name) for r in _requirements(REPO_ROOT / "requirements.txt")}
    provided |= {_norm(r.name) for r in _requirements(comfy_dir / "requirements.txt")}
    own = {"comfyui_pcpo"}
    host = _host_modules(comfy_dir)
    imports = _imported_modules(_pack_files())
    third_party = {m: f for m, f in imports.items()
                   if m not in sys.stdlib_module_names and m not in own and m not in host and m != "__future__"}
    assert {"torch", "numpy", "safetensors"} <= set(third_party), sorted(third_party)
    for module, files in sorted(third_party.items()):
        dists = _distributions(module)
        assert dists, f"{module} (imported by {sorted(files)}) is not installed"
        assert dists & provided, (f"{module} (imported by {sorted(files)}, distribution {sorted(dists)}) is neither "
                                  "in requirements.txt nor in ComfyUI's requirements")


def test_the_headless_core_runtime_imports_are_dependencies():
    runtime = {_norm(r.name) for r in _runtime_dependencies()}
    imports = _imported_modules(sorted((REPO_ROOT / "comfyui_pcpo").rglob("*.py")))
    for module, files in sorted(imports.items()):
        if module in sys.stdlib_module_names or module in ("__future__", "comfyui_pcpo", "torch"):
            continue
        dists = _distributions(module)
        assert dists & runtime, f"{module} (imported by {sorted(files)}) is missing from pyproject's dependencies"
