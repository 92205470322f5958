"""Files written whole or not at all, and JSON that stays strict.

Every file the pack replaces (run checkpoints, exports, trajectories, ``guard.json``, a rewritten
``metrics.jsonl``, previews, the dashboard, benchmark results) goes through :func:`atomic_write`: the
content goes to a hidden temp file in the same folder, is flushed to the disk, and is renamed over
the target with ``os.replace`` -- a crash at any moment leaves the previous file or the new one,
never half of one.  The temp file is ``.<name>.<random>.partial`` (hidden, and no model or image
extension, so ComfyUI never lists it); temp files of the same target that a killed writer left are
removed after the next successful write.

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
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=folder)
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


def remove_stale_temp_files(path: str) -> list:
    """Remove ``.<name>.*.partial`` files beside ``path`` (left by a writer that was killed)."""
    folder, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if n.startswith(f".{base}.") and n.endswith(TEMP_SUFFIX):
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
