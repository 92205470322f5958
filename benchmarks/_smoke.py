"""The benchmarks' smoke mode: the same code path on the smallest configuration, in seconds, with its
JSON written only where the caller says (never over the measured results kept in benchmarks/), and
a non-zero exit when a number that must be finite is not."""
from __future__ import annotations

import math
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parent


def save_atomic(path, data) -> None:
    """Write ``data`` as JSON to ``path`` through a temp file and ``os.replace``: a killed run leaves
    the previous file or the new one, never half of one."""
    import sys
    if str(BENCHMARKS.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS.parent))
    from comfyui_pcpo.atomic import atomic_write_json
    atomic_write_json(str(path), data)


def json_path(path: str, flag: str = "--json") -> str:
    """The smoke run's JSON path: required, and outside benchmarks/ (where the measured JSON lives).
    A smoke run never resumes: a file already at the path is replaced."""
    if not path:
        raise SystemExit(f"the smoke mode needs {flag} PATH (where to write its results, outside benchmarks/)")
    p = pathlib.Path(path).resolve()
    if BENCHMARKS in p.parents:
        raise SystemExit(f"{flag} {path}: a smoke run does not write into benchmarks/ (it holds the measured "
                         "results); give a path elsewhere, e.g. /tmp/smoke.json")
    if p.exists():
        p.unlink()
    return str(p)


def non_finite(values: dict) -> list:
    """Names of the entries of ``values`` (name -> number or list of numbers) that are not finite."""
    bad = []
    for name, v in values.items():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
                bad.append(f"{name}={x!r}")
                break
    return bad


def finish(path: str, data: dict, must_be_finite: dict) -> int:
    """Write ``data`` to ``path`` (atomically) and return the exit status: 1 (with the names printed)
    when a value of ``must_be_finite`` is not a finite number, else 0."""
    save_atomic(path, data)
    bad = non_finite(must_be_finite)
    if bad:
        print(f"FAILED: not finite: {', '.join(bad)} (results in {path})", flush=True)
        return 1
    print(f"results OK, written to {path}", flush=True)
    return 0
