"""Files written whole or not at all, and JSON that stays strict.

Every file the pack replaces (run checkpoints, exports, trajectories, ``guard.json``, a rewritten
``metrics.jsonl``, previews, the dashboard, benchmark results) goes through :func:`atomic_write`: the
content goes to a hidden temp file in the same folder, is flushed to the disk, and is renamed over
the target with ``os.replace`` -- a crash at any moment leaves the previous file or the new one,
never half of one.  The temp file is ``.<name>.<pid>.<random>.partial`` (hidden, and no model or image
extension, so ComfyUI never lists it), ``<pid>`` being the writing process: temp files of the same
target that a killed writer left (its process is gone) are removed after the next successful write,
while a temp file another live process is writing (e.g. a second rank writing the same preview) stays.

Every JSON record the pack writes goes through :func:`strict_json` (NaN and inf become ``null``;
tensors and numpy values become numbers) and :func:`dumps` (``allow_nan=False``), so every reader
-- the browser included -- can parse it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Optional

TEMP_SUFFIX = ".partial"


def _file_mode() -> int:
    umask = os.umask(0)  # mkstemp creates 0600 files; a written file gets the usual umask-derived mode
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, fill: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``fill(tmp)`` writes the content to the temp path ``tmp`` (a
    function taking a file name: ``save_file``, ``Image.save``, ...), then it is fsynced and renamed
    over ``path``.  On any error the temp file is removed and the previous ``path`` stays."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    remove_stale_temp_files(path)


def atomic_write_text(path: str, text: str) -> None:
    def fill(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, fill)


def atomic_write_json(path: str, value, indent: Optional[int] = 1) -> None:
    """``value`` as strict JSON (:func:`dumps`), written atomically."""
    atomic_write_text(path, dumps(value, indent=indent) + "\n")


def atomic_save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _writer_pid(name: str, base: str) -> Optional[int]:
    """The writing process of temp file ``name`` of target ``base`` (None: a name without one)."""
    head = name[len(base) + 2:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale_temp_files(path: str) -> list:
    """Remove the ``.<name>.*.partial`` files beside ``path`` whose writer is gone (a killed writer, or
    a name without a process id); those of a live process are being written and stay."""
    folder, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if not (n.startswith(f".{base}.") and n.endswith(TEMP_SUFFIX)):
            continue
        pid = _writer_pid(n, base)
        if pid is not None and _alive(pid):
            continue
        try:
            os.remove(os.path.join(folder, n))
            removed.append(n)
        except OSError:
            pass
    return removed


def strict_json(value):
    """``value`` made JSON-safe: NaN/inf floats become None (also inside lists and dicts), tensors and
    numpy values become numbers or lists, dict keys strings, and any other object its ``str``."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return strict_json(value.tolist())
    if hasattr(value, "item"):
        return strict_json(value.item())
    return str(value)


def dumps(value, **kw) -> str:
    """Strict JSON text of ``value`` (:func:`strict_json`, then ``allow_nan=False``)."""
    return json.dumps(strict_json(value), allow_nan=False, **kw)
