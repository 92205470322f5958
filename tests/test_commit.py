"""One commit point for all run state and one lineage per run, host-free (comfyui_pcpo.commit,
comfyui_pcpo.lineage): what commits with the checkpoint, what is derived from it after a commit or a
resume, and who may continue a run.  The same rules are tested through a real executor with SIGKILL
in tests/test_run_exact.py and through a real server in tests/test_loop.py."""
import errno
import json
import os

import pytest
import torch

from comfyui_pcpo import ratings as H
from comfyui_pcpo.commit import current_metrics, flush_metrics, note_metrics, repair, write_derived
from comfyui_pcpo.guard import GUARD_FILE, GuardState, guard_of, keep_guard
from comfyui_pcpo.lineage import LoopRegistry, RunExists, refuse_restart
from comfyui_pcpo.lora import LoRAWeightDelta
from comfyui_pcpo.metrics import MetricsLog
from comfyui_pcpo.run_state import CheckpointError, RunSettings, RunState, checkpoint_lineage

torch.set_num_threads(1)


def make_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    adapters = {"a.q": LoRAWeightDelta((6, 5), 2, 2.0, generator=g)}
    return RunState(adapters, RunSettings(rank=2, alpha=2.0, seed=seed), arch="Toy")


def step(state, reward):
    state.commit({"reward_mean": reward}, 1, "brightness", "pcpo")
    return note_metrics(state, {"iteration": state.iteration, "reward_mean": reward})


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def test_companions_commit_with_the_checkpoint_and_survive_a_reload(tmp_path):
    state = make_state()
    step(state, 0.5)
    keep_guard(state, GuardState(best_score=0.5, best_iteration=1, lr_scale=0.25,
                                 rollbacks=[{"iteration": 1, "to_iteration": 0, "reason": "x", "action": "lower_lr"}]))
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    other = make_state()
    other.load(path)
    assert other.lineage == state.lineage == checkpoint_lineage(path)
    gs = guard_of(other, str(tmp_path / GUARD_FILE))  # the file does not exist: the checkpoint is the record
    assert gs.lr_scale == 0.25 and gs.best_iteration == 1 and len(gs.rollbacks) == 1
    assert current_metrics(other) == {"iteration": 1, "reward_mean": 0.5}


def test_a_metrics_line_the_disk_refuses_is_kept_and_written_by_the_next_flush(tmp_path):
    state = make_state()
    mlog = MetricsLog(str(tmp_path / "metrics.jsonl"))
    step(state, 0.1)
    assert flush_metrics(state, mlog)
    step(state, 0.2)
    good = mlog.path

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    mlog.write = full  # this log's writes fail as on a full disk
    assert flush_metrics(state, mlog) is False
    assert [r["iteration"] for r in state.companions["metrics"]] == [1, 2]  # line 2 stays with the run
    del mlog.write
    step(state, 0.3)
    assert flush_metrics(state, mlog)
    assert [r["iteration"] for r in lines(good)] == [1, 2, 3]
    assert [r["iteration"] for r in state.companions["metrics"]] == [3]


def test_repair_drops_lines_of_iterations_that_never_committed_and_writes_missing_ones(tmp_path):
    run_dir = str(tmp_path)
    path = os.path.join(run_dir, "checkpoint.safetensors")
    mlog = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    state = make_state()
    step(state, 0.1)
    flush_metrics(state, mlog)
    step(state, 0.2)  # committed in the checkpoint but killed before its line was written
    state.save(path)
    with open(mlog.path, "a", encoding="utf-8") as f:  # a line of iteration 3, which never committed
        f.write(json.dumps({"iteration": 3, "reward_mean": 0.9}) + "\n")
    other = make_state()
    other.load(path)
    repair(other, run_dir, "r", MetricsLog(mlog.path), {})
    assert lines(mlog.path) == [{"iteration": 1, "reward_mean": 0.1}, {"iteration": 2, "reward_mean": 0.2}]


def test_guard_json_is_derived_and_a_damaged_copy_is_rebuilt_from_the_checkpoint(tmp_path):
    run_dir = str(tmp_path)
    path = os.path.join(run_dir, "checkpoint.safetensors")
    state = make_state()
    step(state, 0.1)
    keep_guard(state, GuardState(best_score=0.1, best_iteration=1, lr_scale=0.5))
    state.save(path)
    write_derived(state, run_dir, "r", {})
    assert json.load(open(os.path.join(run_dir, GUARD_FILE)))["lr_scale"] == 0.5
    with open(os.path.join(run_dir, GUARD_FILE), "w") as f:
        f.write("{not json")
    other = make_state()
    other.load(path)
    repair(other, run_dir, "r", MetricsLog(os.path.join(run_dir, "metrics.jsonl")), {})
    assert json.load(open(os.path.join(run_dir, GUARD_FILE)))["lr_scale"] == 0.5


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"lr_scale": 7}', '{"lr_scale": 0.5, "rollbacks": 3}'])
def test_a_damaged_guard_json_of_an_older_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    """A checkpoint written before companions existed holds no guard state: guard.json is the only
    record, so a damaged one is refused (not silently reset), naming the file and the fix."""
    run_dir = str(tmp_path)
    state = make_state()
    step(state, 0.1)
    state.companions = None  # as loaded from a checkpoint of the earlier format
    with open(os.path.join(run_dir, GUARD_FILE), "w") as f:
        f.write(damage)
    with pytest.raises(CheckpointError) as e:
        repair(state, run_dir, "r", MetricsLog(os.path.join(run_dir, "metrics.jsonl")), {})
    msg = str(e.value)
    assert os.path.join(run_dir, GUARD_FILE) in msg and "delete it" in msg and "backup" in msg


def test_a_good_guard_json_of_an_older_checkpoint_is_converted_into_a_companion(tmp_path):
    run_dir = str(tmp_path)
    state = make_state()
    step(state, 0.1)
    state.companions = None
    GuardState(best_score=0.1, best_iteration=1, lr_scale=0.25).save(os.path.join(run_dir, GUARD_FILE))
    repair(state, run_dir, "r", MetricsLog(os.path.join(run_dir, "metrics.jsonl")), {})
    assert state.companions["guard"]["lr_scale"] == 0.25


def test_the_trained_mark_names_the_committed_ratings_once(tmp_path):
    run_dir = str(tmp_path)
    state = make_state()
    step(state, 0.1)
    state.companions["ratings"] = {"iteration": 1, "request_ids": ["b", "a"]}
    memo = {}
    write_derived(state, run_dir, "r", memo)
    write_derived(state, run_dir, "r", memo)
    repair(state, run_dir, "r", MetricsLog(os.path.join(run_dir, "metrics.jsonl")), {})  # checks the file
    recs = H.read_jsonl(os.path.join(run_dir, "ratings.jsonl"))
    assert len(recs) == 1 and H.is_mark(recs[0])
    assert list(H.trained_ratings(os.path.join(run_dir, "ratings.jsonl"), state.lineage)) == [1]


def test_a_loop_is_known_only_to_its_run_and_lineage():
    reg = LoopRegistry(kept=2)
    loop = reg.start("run", None, target=5)
    assert reg.lookup({"loop": loop.id}, "run", "L1") is loop and loop.lineage == "L1"  # bound on first use
    assert reg.lookup({"loop": loop.id}, "run", "L2") is None          # the run was started over
    assert reg.lookup({"loop": loop.id}, "other", "L1") is None        # another run's loop
    assert reg.lookup({"loop": "f" * 32, "target": 10**6}, "run", "L1") is None  # forged id
    assert reg.lookup({"loop": 7}, "run", "L1") is None and reg.lookup("x", "run", "L1") is None
    a, b = reg.start("run", "L1", 3), reg.start("run", "L1", 3)
    assert reg.find({"loop": loop.id}, "run") is None  # only the newest `kept` loops are remembered
    reg.end(a)
    assert reg.find({"loop": a.id}, "run") is None and reg.find({"loop": b.id}, "run") is b


def test_refusing_a_restart_names_the_run_and_every_fix():
    e = refuse_restart("my run", "/x/output/pcpo/my run", "a checkpoint at iteration 4")
    assert isinstance(e, RunExists) and isinstance(e, ValueError)
    msg = str(e)
    for words in ("'my run'", "iteration 4", "resume on", "new run_name", "/x/output/pcpo/my run"):
        assert words in msg, words
