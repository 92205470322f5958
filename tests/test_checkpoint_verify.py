"""A run checkpoint is verified before it is trusted: the pack seals every checkpoint with a SHA-256
of each tensor and of the metadata, and a resume checks checksums, metadata types, the iteration,
LoRA shapes and magnitudes, the generator state and the optimizer moments before anything is used.

Each damage is made on a real file written by the pack's own save path (bytes flipped at offsets
read from the safetensors header, or the file rewritten through the pack's writer so that only the
content checks can catch it); the refusal names the file and the fix and comes before any sampling:
in a real ComfyUI executor the prompt stops at the PCPO LoRA node and no file of the ComfyUI folders
(export, checkpoint, metrics, temp files) is new or changed."""
from __future__ import annotations

import hashlib
import json
import pathlib
import struct

import pytest
import torch
from safetensors.torch import save_file

from comfyui_pcpo.run_state import (CHECKSUM_KEY, MAX_LORA_WEIGHT, CheckpointError, read_checkpoint,
                              write_checkpoint)
from comfyui_pcpo.atomic import atomic_save_safetensors
from test_run_state import full_state, make_state, train_steps

TESTS_DIR = pathlib.Path(__file__).resolve().parent
FIX_WORDS = ("Load LoRA", "run_name")  # every refusal of a damaged file says how to go on


# ----------------------------------------------------------------------------- file surgery

def tensor_span(path, key: str) -> tuple[int, int]:
    """Byte range of tensor ``key``'s data in the safetensors file ``path`` (from its header)."""
    data = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + n])[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def patch_bytes(path, offset: int, new: bytes) -> None:
    data = bytearray(pathlib.Path(path).read_bytes())
    data[offset:offset + len(new)] = new
    pathlib.Path(path).write_bytes(bytes(data))


def first_down_key(path) -> str:
    tensors, _ = read_checkpoint(str(path))
    return sorted(k for k in tensors if k.startswith("lora.") and k.endswith(".down"))[0]


def flip_weight_byte(path) -> str:
    """One byte of the first element of a LoRA down weight: its exponent moves by 4 (x16 or /16),
    a finite value well inside the magnitude bound, so only the checksum can tell."""
    key = first_down_key(path)
    begin, _ = tensor_span(path, key)
    data = pathlib.Path(path).read_bytes()
    before = struct.unpack("<f", data[begin:begin + 4])[0]
    patch_bytes(path, begin + 3, bytes([data[begin + 3] ^ 0x02]))
    after = struct.unpack("<f", pathlib.Path(path).read_bytes()[begin:begin + 4])[0]
    assert after != before and abs(after) < MAX_LORA_WEIGHT and after == after  # finite, plausible, wrong
    return "do not match their checksum"


def write_1e30_in_place(path) -> str:
    begin, _ = tensor_span(path, first_down_key(path))
    patch_bytes(path, begin, struct.pack("<f", 1e30))
    return "do not match their checksum"


def flip_generator_byte(path) -> str:
    begin, end = tensor_span(path, "generator")
    data = pathlib.Path(path).read_bytes()
    patch_bytes(path, begin + 100, bytes([data[begin + 100] ^ 0xFF]))
    return "do not match their checksum"


def edit_metadata_keeping_checksums(path) -> str:
    """history no longer JSON, rewritten with the old checksums (a hand edit, a bad copy)."""
    tensors, md = read_checkpoint(str(path))
    save_file(tensors, str(path), metadata={**md, "history": "[{not json"})
    return "metadata .* does not match its checksum"


def delete_moment_keeping_checksums(path) -> str:
    tensors, md = read_checkpoint(str(path))
    key = sorted(k for k in tensors if k.endswith(".exp_avg"))[0]
    del tensors[key]
    save_file(tensors, str(path), metadata=md)
    return "lacks 1 tensor.*its checksums list"


def _resealed(change):
    """Rewrite the checkpoint through the pack's writer after ``change(tensors, md)``: the checksums
    match, so the content checks alone must refuse it."""
    def damage(path):
        tensors, md = read_checkpoint(str(path))
        expected = change(tensors, md)
        write_checkpoint(str(path), tensors, md)
        return expected
    damage.__name__ = change.__name__
    return damage


@_resealed
def sealed_1e30_weight(tensors, md):
    key = sorted(k for k in tensors if k.startswith("lora.") and k.endswith(".down"))[0]
    tensors[key].view(-1)[0] = 1e30
    return "LoRA weights of magnitude 1e\\+30"


@_resealed
def sealed_history_not_json(tensors, md):
    md["history"] = "[{not json"
    return "'history' entry that is not a JSON list"


@_resealed
def sealed_settings_not_json(tensors, md):
    md["settings"] = "rank=4"
    return "'settings' entry that is not a JSON dict"


@_resealed
def sealed_iteration_minus_5(tensors, md):
    md["iteration"] = "-5"
    return "iteration '-5', not a non-negative whole number"


@_resealed
def sealed_moment_wrong_shape(tensors, md):
    key = sorted(k for k in tensors if k.endswith(".exp_avg_sq"))[0]
    tensors[key] = torch.zeros(tensors[key].numel() + 1)
    return "exp_avg_sq of shape .* its parameter has shape"


@_resealed
def sealed_moment_deleted(tensors, md):
    key = sorted(k for k in tensors if k.endswith(".exp_avg"))[0]
    del tensors[key]
    return "lacks the optimizer moment\\(s\\) exp_avg of parameter"


DAMAGES = [flip_weight_byte, write_1e30_in_place, flip_generator_byte, edit_metadata_keeping_checksums,
           delete_moment_keeping_checksums, sealed_1e30_weight, sealed_history_not_json,
           sealed_settings_not_json, sealed_iteration_minus_5, sealed_moment_wrong_shape, sealed_moment_deleted]


def strip_checksums(path) -> None:
    """The format as written before checksums existed: the same writer, without the checksum entry."""
    tensors, md = read_checkpoint(str(path))
    assert CHECKSUM_KEY in md
    atomic_save_safetensors(tensors, str(path), {k: v for k, v in md.items() if k != CHECKSUM_KEY})


# ----------------------------------------------------------------------------- host-free run state

def test_every_checkpoint_is_sealed_over_all_its_tensors_and_metadata(tmp_path):
    state = make_state()
    train_steps(state, 2)
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    tensors, md = read_checkpoint(path)
    sums = json.loads(md[CHECKSUM_KEY])
    assert sums["algorithm"] == "sha256" and set(sums["tensors"]) == set(tensors)
    assert {"generator", "optimizer.0.exp_avg", "optimizer.0.step"} <= set(sums["tensors"])
    # the tensor digest is over the stored bytes (plus dtype and shape), checked against hashlib here
    t = tensors["optimizer.0.exp_avg"]
    h = hashlib.sha256(json.dumps(["float32", list(t.shape)]).encode())
    h.update(pathlib.Path(path).read_bytes()[slice(*tensor_span(path, "optimizer.0.exp_avg"))])
    assert sums["tensors"]["optimizer.0.exp_avg"] == h.hexdigest()
    rest = {k: v for k, v in md.items() if k != CHECKSUM_KEY}
    assert sums["metadata"] == hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"))
                                              .encode()).hexdigest()


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_nothing_changes(tmp_path, damage):
    state = make_state()
    train_steps(state, 2)
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    expected = damage(path)
    fresh = make_state()
    before = full_state(fresh)
    with pytest.raises(CheckpointError, match=expected) as e:
        fresh.load(path)
    assert path in str(e.value) and all(w in str(e.value) for w in FIX_WORDS), str(e.value)
    after = full_state(fresh)
    assert before[1] == after[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert fresh.iteration == 0 and fresh.saved_iteration is None


def test_keys_added_by_any_writer_are_covered_by_the_checksums(tmp_path):
    """New tensors and metadata entries (e.g. more run state in the same file) are sealed and
    verified with no change to the checksum code."""
    state = make_state()
    train_steps(state, 1)
    path = str(tmp_path / "checkpoint.safetensors")
    tensors, md = state.state_tensors()
    tensors["newstate.values"] = torch.arange(6, dtype=torch.float32)
    md["newstate"] = json.dumps({"scale": 0.25})
    write_checkpoint(path, tensors, md)
    make_state().load(path)  # sealed: loads
    begin, _ = tensor_span(path, "newstate.values")
    patch_bytes(path, begin + 4, struct.pack("<f", 7.0))
    with pytest.raises(CheckpointError, match="'newstate.values'"):
        make_state().load(path)
    write_checkpoint(path, tensors, md)
    t2, md2 = read_checkpoint(path)
    save_file(t2, path, metadata={**md2, "newstate": json.dumps({"scale": 0.5})})
    with pytest.raises(CheckpointError, match="metadata .* does not match its checksum"):
        make_state().load(path)


def test_a_checkpoint_without_checksums_loads_and_says_so(tmp_path, caplog):
    state = make_state()
    train_steps(state, 2)
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    strip_checksums(path)
    other = make_state()
    with caplog.at_level("WARNING", logger="comfyui_pcpo"):
        other.load(path)
    a, b = full_state(state), full_state(other)
    assert a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert len(other.load_notes) == 1 and "has no checksums" in other.load_notes[0] and path in other.load_notes[0]
    assert any("has no checksums" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    # the content checks still apply to such a file
    tensors, md = read_checkpoint(path)
    atomic_save_safetensors(tensors, path, {**md, "iteration": "-5"})
    with pytest.raises(CheckpointError, match="iteration '-5'"):
        make_state().load(path)
    # a sealed checkpoint carries no note
    state.save(path)
    fresh = make_state()
    fresh.load(path)
    assert fresh.load_notes == []


def test_runner_reads_no_negative_iteration(tmp_path):
    from comfyui_pcpo.run import checkpoint_iteration
    state = make_state()
    train_steps(state, 2)
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    assert checkpoint_iteration(path) == 1
    sealed_iteration_minus_5(path)
    assert checkpoint_iteration(path) is None


# ----------------------------------------------------------------------------- a real ComfyUI executor

def _files(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_damaged_checkpoint_stops_the_prompt_before_sampling(pcpo, comfy, comfy_dirs):
    """The run child's graph (PCPO LoRA with resume on -> sampler -> decode -> reward -> update ->
    export) in a real executor: two iterations write a sealed checkpoint and an export; after a
    restart every damage is refused at the PCPO LoRA node with the file named, and not one file of
    ComfyUI's folders is new or changed (so no sampling, no update, and the good export stays)."""
    import run_child
    assert comfy.load_pack(TESTS_DIR / "tiny_pack")
    sessions = pcpo.mod("nodes.session").SESSIONS
    prompt = run_child.graph()
    executor = comfy.new_executor(fresh=True)
    for _ in range(2):
        comfy.execute_prompt(prompt, executor=executor)
    sess = sessions.get(run_child.RUN)
    assert sess.iteration == 2
    ckpt = pathlib.Path(sess.checkpoint_path)
    export = pathlib.Path(comfy_dirs["loras"]) / (run_child.EXPORT + ".safetensors")
    good_ckpt, good_export = ckpt.read_bytes(), export.read_bytes()
    root = pathlib.Path(comfy_dirs["output"]).parent
    for damage in DAMAGES:
        ckpt.write_bytes(good_ckpt)
        expected = damage(ckpt)
        sessions.pop(run_child.RUN, None)  # what a ComfyUI restart does: no live run
        files = _files(root)
        with pytest.raises(comfy.PromptError) as e:
            comfy.execute_prompt(prompt, executor=comfy.new_executor(fresh=True))
        msg = str(e.value)
        assert "PCPOLoRA" in msg and str(ckpt) in msg, (damage.__name__, msg)
        assert __import__("re").search(expected, msg), (damage.__name__, msg)
        assert all(w in msg for w in FIX_WORDS), (damage.__name__, msg)
        assert _files(root) == files, damage.__name__  # nothing written: no sampling, no update, no export
        assert export.read_bytes() == good_export
        assert run_child.RUN not in sessions
    # the format written before checksums: resumes, the update's message says the file was unverified,
    # and the next checkpoint is sealed
    ckpt.write_bytes(good_ckpt)
    strip_checksums(ckpt)
    sessions.pop(run_child.RUN, None)
    res = comfy.execute_prompt(prompt, executor=comfy.new_executor(fresh=True))
    text = " ".join(res.ui["8"]["text"])
    assert "has no checksums" in text and str(ckpt) in text
    assert sessions.get(run_child.RUN).iteration == 3
    _, md = read_checkpoint(str(ckpt))
    assert CHECKSUM_KEY in md and md["iteration"] == "3"
    assert export.read_bytes() != good_export  # the run went on and exported
