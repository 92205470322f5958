"""Files written whole or not at all, and strict JSON (comfyui_pcpo.atomic): the one helper every
file the pack replaces goes through."""
import json
import math
import os

import numpy as np
import pytest
import torch

from comfyui_pcpo.atomic import (TEMP_SUFFIX, atomic_save_safetensors, atomic_write, atomic_write_json, dumps,
                                 remove_stale_temp_files, strict_json)

torch.set_num_threads(1)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "guard.json")
    atomic_write_json(path, {"lr_scale": 0.5})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"lr_scale": 0.2')  # half written when the disk fills
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert json.load(open(path)) == {"lr_scale": 0.5}
    assert os.listdir(tmp_path) == ["guard.json"]


def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_files_a_killed_writer_left_are_removed_by_the_next_write_and_only_those(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    dead = _dead_pid()
    stale = tmp_path / f".checkpoint.safetensors.{dead}.abc123{TEMP_SUFFIX}"
    old_format = tmp_path / f".checkpoint.safetensors.abc123{TEMP_SUFFIX}"
    live = tmp_path / f".checkpoint.safetensors.{os.getppid()}.abc123{TEMP_SUFFIX}"  # another live writer's
    other = tmp_path / f".export.safetensors.{dead}.abc123{TEMP_SUFFIX}"
    for f in (stale, old_format, live, other):
        f.write_bytes(b"x")
    atomic_save_safetensors({"w": torch.ones(2)}, str(path), {"k": "v"})
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.safetensors", live.name, other.name])
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("w"), torch.ones(2))
    assert remove_stale_temp_files(str(tmp_path / "export.safetensors")) == [other.name]


def test_a_written_file_gets_the_umask_mode_not_the_temp_files_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(str(tmp_path / "a.json"), [1])
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644


def test_strict_json_turns_every_non_finite_number_into_null_and_tensors_into_numbers():
    value = {"a": float("nan"), "b": [1.0, float("inf"), None], "c": {"d": -float("inf")}, 3: True,
             "t": torch.tensor([0.5, float("nan")]), "s": torch.tensor(2.0), "n": np.float32(np.inf),
             "i": np.int64(4), "o": object.__name__}
    out = strict_json(value)
    assert out == {"a": None, "b": [1.0, None, None], "c": {"d": None}, "3": True, "t": [0.5, None], "s": 2.0,
                   "n": None, "i": 4, "o": "object"}
    text = dumps(value)
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == out
    assert all(not isinstance(v, float) or math.isfinite(v) for v in json.loads(text)["b"] if v is not None)
