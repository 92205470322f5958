"""The host-free run state (comfyui_pcpo.run_state): settings, one-file checkpoint, atomic iterations,
the registry of live runs."""
import json
import os

import pytest
import torch

from comfyui_pcpo.lora import LoRAWeightDelta
from comfyui_pcpo.run_state import (CheckpointError, RunRegistry, RunSettings, RunState, read_checkpoint,
                              rollout_generator, write_checkpoint)


def make_state(optimizer="AdamW", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    adapters = {"a.q": LoRAWeightDelta((6, 5), 2, 2.0, generator=g), "b.conv": LoRAWeightDelta((4, 3, 3, 3), 2, 4.0, generator=g)}
    return RunState(adapters, RunSettings(rank=2, alpha=2.0, optimizer=optimizer, seed=seed, **kw), arch="Toy")


def train_steps(state, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        state.optimizer.zero_grad()
        loss = sum((a.delta() * torch.randn(a.shape, generator=g)).sum() + (a.down ** 2).sum() for a in state.adapters.values())
        loss.backward()
        state.optimizer.step()
        torch.randperm(7, generator=state.generator)  # the trainer draws timesteps from it
    state.commit({"reward_mean": 0.5}, n, "brightness", "pcpo")


def full_state(state):
    tensors, md = state.state_tensors()
    return tensors, {k: v for k, v in md.items() if k != "saved"}


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD"])
def test_checkpoint_round_trip_is_exact(tmp_path, optimizer):
    state = make_state(optimizer)
    train_steps(state, 3)
    path = str(tmp_path / "run" / "checkpoint.safetensors")
    state.save(path)
    assert not state.dirty and os.listdir(tmp_path / "run") == ["checkpoint.safetensors"]
    other = make_state(optimizer)
    with torch.inference_mode():  # as inside ComfyUI's executor
        other.load(path)
    a, amd = full_state(state)
    b, bmd = full_state(other)
    assert set(a) == set(b) and amd == bmd
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_inference() for s in other.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    # the two continue identically, and the loaded one can update its state in place
    train_steps(state, 2, seed=1)
    train_steps(other, 2, seed=1)
    a, _ = full_state(state)
    b, _ = full_state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if optimizer != "SGD":
        assert all(float(s["step"]) == 5 for s in other.optimizer.state.values())


def test_snapshot_restore_undoes_an_update_exactly():
    state = make_state()
    train_steps(state, 2)
    before, md_before = full_state(state)
    snap = state.snapshot()
    train_steps(state, 1, seed=3)  # an update that is then interrupted
    state.history.pop()
    state.iteration -= 1
    state.optimizer_steps -= 1
    state.restore(snap)
    after, md_after = full_state(state)
    assert all(torch.equal(before[k], after[k]) for k in before) and md_before == md_after
    assert all(p.grad is None for p in state.params())


def test_hyperparameters_apply_and_fixed_settings_refuse():
    state = make_state()
    assert state.apply_hyperparameters(RunSettings(rank=2, alpha=2.0, learning_rate=1e-2, weight_decay=0.0)) == [
        "learning_rate 0.0003 -> 0.01", "weight_decay 0.0001 -> 0"]
    assert all(g["lr"] == 1e-2 and g["weight_decay"] == 0.0 for g in state.optimizer.param_groups)
    with pytest.raises(ValueError, match="alpha 2.0 \\(got 4.0\\)"):
        state.check_settings(RunSettings(rank=2, alpha=4.0))
    for bad, word in (({"rank": 0}, "rank"), ({"optimizer": "Lion"}, "optimizer"), ({"target_layers": "x"}, "target_layers"),
                      ({"learning_rate": -1}, "learning_rate"), ({"alpha": float("nan")}, "alpha")):
        with pytest.raises(ValueError, match=word):
            RunSettings(**bad)


def test_unusable_checkpoints_name_the_file_and_change_nothing(tmp_path):
    state = make_state()
    train_steps(state, 1)
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    data = open(path, "rb").read()
    fresh = make_state()
    untouched = full_state(fresh)[0]
    open(path, "wb").write(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        fresh.load(path)
    assert path in str(e.value)
    open(path, "wb").write(data)
    with pytest.raises(CheckpointError, match="optimizer='AdamW'"):
        make_state("SGD").load(path)
    with pytest.raises(CheckpointError, match="seed=0"):
        make_state(seed=1).load(path)
    tensors, md = read_checkpoint(path)
    tensors["optimizer.0.exp_avg"][0, 0] = float("inf")
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=md)  # changed behind the checksums' back: damaged
    with pytest.raises(CheckpointError, match="do not match their checksum"):
        fresh.load(path)
    write_checkpoint(path, tensors, md)  # written so by the pack (a diverged run): sealed, but not finite
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        fresh.load(path)
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "something else"})
    with pytest.raises(CheckpointError, match="not a pcpo-run-2"):
        fresh.load(path)
    assert all(torch.equal(untouched[k], full_state(fresh)[0][k]) for k in untouched)
    assert fresh.iteration == 0 and json.loads(fresh.metadata()["history"]) == []


def test_registry_evicts_least_recently_used():
    reg = RunRegistry(max_live=2)
    evicted = []
    reg.put("a", "A", evicted.append)
    reg.put("b", "B", evicted.append)
    assert reg.get("a") == "A"  # a is now the most recently used
    assert reg.put("c", "C", evicted.append) == ["b"] and evicted == ["B"]
    assert reg.names() == ["a", "c"] and "b" not in reg


def test_rollout_seeds_differ_per_group_and_iteration_and_repeat():
    draws = {(i, g): torch.randn(3, generator=rollout_generator(7, i, g)) for i in range(3) for g in range(3)}
    assert len({tuple(v.tolist()) for v in draws.values()}) == 9
    assert torch.equal(draws[(1, 2)], torch.randn(3, generator=rollout_generator(7, 1, 2)))


def test_a_changed_seed_refusal_names_the_control_after_generate_widget(tmp_path):
    """A seed set to randomize changes on every press of Run: the refusal says which widget to set."""
    state = make_state()
    with pytest.raises(ValueError) as e:
        state.check_settings(RunSettings(rank=2, alpha=2.0, seed=4250894884))
    assert "seed 0 (got 4250894884)" in str(e.value)
    assert "set 'control after generate' to fixed" in str(e.value)
    with pytest.raises(ValueError) as e:
        state.check_settings(RunSettings(rank=2, alpha=4.0))
    assert "control after generate" not in str(e.value)  # only a changed seed mentions it
    train_steps(state, 1)
    path = str(tmp_path / "checkpoint.safetensors")
    state.save(path)
    with pytest.raises(CheckpointError) as e:
        make_state(seed=7).load(path)
    assert "seed=0" in str(e.value) and "set 'control after generate' to fixed" in str(e.value)
