"""Packaging: installing the pack never touches torch.

* requirements.txt (what ComfyUI-Manager installs) and pyproject's runtime dependencies name no
  torch/torchvision/torchaudio, and nothing they pull (through the installed distributions' metadata)
  requires torch either;
* every third-party module that nodes/, comfyui_pcpo/ or the pack's __init__.py import (at module
  level or lazily) is in requirements.txt or in ComfyUI's own requirements.txt;
* every third-party module the headless core imports, torch aside, is a runtime dependency in
  pyproject.toml, and the diffusers/PEFT interop packages are only extras;
* the one exception, optional packages (reward models, TensorBoard): imported only inside functions
  (lazily, when the feature runs), listed in one of pyproject's extras other than ``test`` (e.g.
  ``rewards``), and, when ComfyUI does not install them either, imported inside ``try ... except``
  (ImportError, or broader) so a missing package gives a clear error or a fallback; such a package
  need not be installed here.
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


def _import_sites(paths) -> dict[str, list[tuple[str, bool, bool]]]:
    """Top-level module -> [(file, lazy, guarded)]: lazy = inside a function body, guarded = inside a
    ``try`` one of whose handlers catches ImportError (ModuleNotFoundError, Exception, or all)."""
    sites: dict[str, list] = {}

    def catches_import_error(t: ast.Try) -> bool:
        names = []
        for h in t.handlers:
            if h.type is None:
                return True
            names += [n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)]
        return bool({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names))

    def visit(node, rel, lazy, guarded):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                names = []
            for name in names:
                sites.setdefault(name.split(".")[0], []).append((rel, lazy, guarded))
            in_fn = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Try):
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), rel, in_fn, guarded or catches_import_error(child))
                for part in child.handlers + child.orelse + child.finalbody:
                    visit(ast.Module(body=[part], type_ignores=[]), rel, in_fn, guarded)
            else:
                visit(child, rel, in_fn, guarded)

    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visit(tree, str(path.relative_to(REPO_ROOT)), False, False)
    return sites


def _optional_packages() -> set[str]:
    """Distributions of every extra but ``test`` (what a feature needs only when it is used)."""
    extras = _pyproject()["project"].get("optional-dependencies", {})
    return {_norm(Requirement(r).name) for name, reqs in extras.items() if name != "test" for r in reqs}


def _distributions_or_name(module: str) -> set[str]:
    """Installed distributions providing ``module``, else the module's own name (an uninstalled optional one)."""
    return _distributions(module) or {_norm(module)}


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
    sites = _import_sites(_pack_files())
    optional = _optional_packages()
    for module, files in sorted(third_party.items()):
        dists = _distributions(module)
        if dists & provided:
            continue
        assert _distributions_or_name(module) & optional, (
            f"{module} (imported by {sorted(files)}, distribution {sorted(dists)}) is neither in requirements.txt "
            "nor in ComfyUI's requirements (nor in one of pyproject's optional extras)")
        eager = sorted(f for f, lazy, guarded in sites[module] if not (lazy and guarded))
        assert not eager, (f"the optional package {module} must be imported inside a function, in try/except "
                           f"ImportError (a clear error naming the pip line, or a fallback); not so in {eager}")


def test_the_headless_core_runtime_imports_are_dependencies():
    runtime = {_norm(r.name) for r in _runtime_dependencies()}
    core = sorted((REPO_ROOT / "comfyui_pcpo").rglob("*.py"))
    imports = _imported_modules(core)
    sites = _import_sites(core)
    optional = _optional_packages()
    assert {"transformers", "open-clip-torch", "rapidocr", "onnxruntime"} <= optional
    for module, files in sorted(imports.items()):
        if module in sys.stdlib_module_names or module in ("__future__", "comfyui_pcpo", "torch"):
            continue
        dists = _distributions(module)
        if dists & runtime:
            continue
        assert _distributions_or_name(module) & optional, f"{module} (imported by {sorted(files)}) is missing from pyproject's dependencies"
        eager = sorted(f for f, lazy, _ in sites[module] if not lazy)
        assert not eager, f"the optional package {module} is imported at module level in {eager}: import it lazily"
