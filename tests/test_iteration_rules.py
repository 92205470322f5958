"""Host-free rules of a run's life and of one update iteration (comfyui_pcpo.lineage.session_action,
comfyui_pcpo.iteration): who may continue a run, when the checkpoint is due, which node writes it,
which inputs are refused.  The same rules run in ComfyUI through tests/test_loop.py and
tests/test_run_exact.py."""
import types

import pytest

from comfyui_pcpo import lineage as L
from comfyui_pcpo.iteration import (check_inputs, checkpoint_due, finishing_node, format_stats, gradient_stalled,
                                    stall_error, update_warnings)


@pytest.mark.parametrize("resume, live_in_loop, live_trained, disk_in_loop, on_disk, want", [
    # nothing live
    (True, False, None, False, False, L.NEW_RUN),
    (False, False, None, False, False, L.NEW_RUN),
    (True, False, None, False, True, L.RESUME_DISK),
    (False, False, None, False, True, L.REFUSE),          # a restart / cache miss never overwrites the disk
    (False, False, None, True, True, L.RESUME_DISK),       # the loop's own prompt after a restart
    # a live run
    (True, False, True, False, True, L.CONTINUE_LIVE),
    (False, True, True, False, True, L.CONTINUE_LIVE),     # the loop's own prompt, resume off
    (False, False, True, False, True, L.REFUSE),           # another client's press with resume off
    (False, False, True, False, False, L.REFUSE),          # trained, checkpoint not yet written
    (False, False, False, False, False, L.START_OVER),     # never trained: nothing is lost
    (True, False, False, False, False, L.CONTINUE_LIVE),
])
def test_who_may_continue_a_run(resume, live_in_loop, live_trained, disk_in_loop, on_disk, want):
    assert L.session_action(resume, live_in_loop, live_trained, disk_in_loop, on_disk) == want


def test_no_press_with_resume_off_ever_overwrites_an_existing_run():
    """Over every combination: resume off without a loop of the run never continues or replaces a run
    that has trained or is on disk."""
    for live_trained in (None, False, True):
        for on_disk in (False, True):
            if live_trained is False and on_disk:
                continue  # a live run with a checkpoint counts as trained
            for disk_in_loop in (False, True):
                got = L.session_action(False, False, live_trained, disk_in_loop and live_trained is None, on_disk)
                exists = bool(live_trained) or on_disk
                if exists and not (disk_in_loop and live_trained is None):
                    assert got == L.REFUSE, (live_trained, on_disk, disk_in_loop)
                if not exists:
                    assert got in (L.NEW_RUN, L.START_OVER)


def test_the_checkpoint_is_due_every_n_iterations_and_at_the_target():
    assert [checkpoint_due(i, 3, 7) for i in range(1, 9)] == [False, False, True, False, False, True, True, True]
    assert all(checkpoint_due(i, 1, 100) for i in range(1, 5))


def _prompt(*nodes):
    return {str(i): {"class_type": c, "inputs": {"session": [s, 1]} if s else {}} for i, (c, s) in enumerate(nodes)}


def test_the_node_that_finishes_the_iteration_is_the_guard_then_the_heldout_of_the_same_run():
    p = _prompt(("PCPOLoRA", None), ("PCPOLoRAUpdate", "0"), ("PCPOHeldOutEvaluation", "0"), ("PCPORewardGuard", "0"))
    assert finishing_node(p, "1") == "PCPORewardGuard"
    p = _prompt(("PCPOLoRA", None), ("PCPOLoRAUpdate", "0"), ("PCPOHeldOutEvaluation", "0"))
    assert finishing_node(p, "1") == "PCPOHeldOutEvaluation"
    # a guard of another run (another PCPO LoRA node) does not finish this update's iteration
    p = _prompt(("PCPOLoRA", None), ("PCPOLoRAUpdate", "0"), ("PCPOLoRA", None), ("PCPORewardGuard", "2"))
    assert finishing_node(p, "1") is None
    assert finishing_node(None, "1") is None and finishing_node(p, None) is None


def test_inputs_of_another_run_iteration_or_rollout_are_refused_naming_the_fix():
    batch = types.SimpleNamespace(run_name="a", iteration=3, session_token="t", uid="u")
    ok = types.SimpleNamespace(trajectory_uid="u")
    check_inputs("a", 3, "t", batch, ok)
    with pytest.raises(ValueError, match="belongs to run 'a', not 'b'"):
        check_inputs("b", 3, "t", batch, ok)
    with pytest.raises(ValueError, match="sample a fresh rollout"):
        check_inputs("a", 4, "t", batch, ok)
    with pytest.raises(ValueError, match="sample a fresh rollout"):
        check_inputs("a", 3, "other session", batch, ok)
    with pytest.raises(ValueError, match="wire the Reward Scorer"):
        check_inputs("a", 3, "t", batch, types.SimpleNamespace(trajectory_uid="x"))


def test_stall_rules_and_words():
    base = {"zero_std_groups": 0, "groups": 2, "grad_norm": 0.0, "skipped_steps": 0, "approx_kl": 0.0}
    assert gradient_stalled({**base, "grad_norms": [0.0, 0.0]})
    assert not gradient_stalled({**base, "zero_std_groups": 2, "grad_norms": [0.0]})  # no signal: zero is right
    assert not gradient_stalled({**base, "grad_norms": [0.0, 0.3]})
    assert any("usable gradient" in w for w in update_warnings(1.0, {**base, "grad_norms": [0.0]}))
    assert any("eta 0.1 is low" in w for w in update_warnings(0.1, {**base, "grad_norms": [1.0]}))
    assert update_warnings(1.0, {**base, "grad_norms": [1.0]}) == []
    msg = stall_error("r", 3, {**base, "skipped_steps": 4}, "fp16")
    assert "3 iterations in a row" in msg and "bf16 or fp32" in msg and "4 overflowed steps" in msg
    s = {"reward_mean": 0.5, "reward_std": 0.25, "clip_fraction": 0.1, "approx_kl": 1e-3, "grad_norm": 2.0,
         "zero_std_groups": 1, "groups": 4}
    assert format_stats(7, s) == ("iter 7: reward 0.5000 ± 0.2500 | clip 0.100 | kl 1.00e-03 | grad 2 | "
                                  "zero-std groups 1/4")
