"""What the PCPO LoRA Update node says about a press of Run and about human-rated runs (host-free:
comfyui_pcpo/progress.py and comfyui_pcpo/ratings.py, no ComfyUI).

* a press is a new one for the prompt the user queued, and the one carried in the loop marker for a
  re-queued prompt (older markers without the press items still give the right count);
* iteration k of N, the time per iteration (the mean over the press) and the ETA are exact for a
  given clock; the texts read "iteration k of N done", "ETA", and after Cancel "stopped at
  iteration k+1 of N (cancelled) ... Run continues";
* under human ratings the node counts the rated groups over the run (also across iterations without
  a rating) and tracks the model reward of the rated images; without a model reward or a held-out
  evaluation it says so in plain words.
"""
from __future__ import annotations

import json
import math

import pytest

from comfyui_pcpo import progress as P
from comfyui_pcpo import ratings as H


def test_a_press_starts_at_the_users_prompt_and_the_server_keeps_it_for_its_loop():
    from comfyui_pcpo.lineage import LoopRegistry
    press = P.new_press(10, 3, started=1000.0)
    assert press == P.Press(first=10, target=13, started=1000.0) and press.total == 3
    # the re-queued prompts find the press on the server (a loop id is all they carry)
    loops = LoopRegistry()
    loop = loops.start("r", "lineage", press.target, press.first, press.started)
    found = loops.lookup({"run": "r", "loop": loop.id}, "r", "lineage")
    assert P.Press(found.first, found.target, found.started) == press
    # what a client sends never sets the press: a forged id is no loop (the prompt is a new press)
    assert loops.lookup({"run": "r", "loop": "0" * 32, "target": 99}, "r", "lineage") is None


def test_progress_eta_and_texts_of_a_fresh_run():
    press = P.Press(first=0, target=3, started=100.0)
    p1 = P.progress(press, 1, now=102.5)
    assert (p1.done, p1.total, p1.left) == (1, 3, 2)
    assert p1.per_iteration_s == pytest.approx(2.5) and p1.eta_s == pytest.approx(5.0)
    assert P.progress_text(p1) == "iteration 1 of 3 done · 2.5 s per iteration · ETA 5.0 s (2 left)"
    assert P.cancel_text(p1) == ("stopped at iteration 2 of 3 (cancelled): the run keeps its 1 finished "
                                 "iteration(s); Run continues from there")
    p2 = P.progress(press, 2, now=106.0)  # the mean over the press: (106 - 100) / 2
    assert p2.per_iteration_s == pytest.approx(3.0) and p2.eta_s == pytest.approx(3.0)
    assert "iteration 2 of 3 done" in P.progress_text(p2) and "ETA 3.0 s (1 left)" in P.progress_text(p2)
    p3 = P.progress(press, 3, now=109.0)
    assert p3.left == 0 and p3.eta_s == 0.0
    assert P.progress_text(p3) == "iteration 3 of 3 done · 3.0 s per iteration · press finished in 9.0 s"
    # the press is over: a Cancel hits the first iteration of the next press, run iteration 4
    assert P.cancel_text(p3).startswith("stopped at iteration 4 (cancelled): the run keeps its 3 finished")
    ui = P.as_ui(p2)
    json.dumps(ui, allow_nan=False)
    assert ui["text"] == P.progress_text(p2) and ui["cancel_text"] == P.cancel_text(p2)
    assert (ui["done"], ui["total"], ui["eta_s"]) == (2, 3, pytest.approx(3.0))


def test_a_continued_run_names_its_own_iteration_too():
    press = P.Press(first=10, target=15, started=0.0)
    p = P.progress(press, 12, now=100.0)
    assert (p.done, p.total) == (2, 5) and p.per_iteration_s == 50.0 and p.eta_s == 150.0
    assert P.progress_text(p) == ("iteration 2 of 5 (run iteration 12) done · 50 s per iteration · "
                                  "ETA 2 min 30 s (3 left)")
    assert P.cancel_text(p).startswith("stopped at iteration 3 of 5 (run iteration 13) (cancelled): the run keeps "
                                       "its 12 finished")
    # a clock that went back (or an iteration outside the press) never gives a negative time or count
    q = P.progress(press, 9, now=-5.0)
    assert q.done == 1 and q.elapsed_s == 0.0 and q.eta_s == 0.0


@pytest.mark.parametrize("seconds,text", [(0.04, "0.0 s"), (0.8, "0.8 s"), (9.94, "9.9 s"), (42.4, "42 s"),
                                          (9.97, "10 s"), (59.7, "1 min 00 s"),
                                          (185, "3 min 05 s"), (3599.6, "1 h 00 min"), (7620, "2 h 07 min"),
                                          (-3, "0.0 s")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert P.format_duration(seconds) == text


# --------------------------------------------------------------------------- human ratings

def test_the_model_reward_of_the_rated_groups_is_the_mean_of_their_raw_model_values():
    group_ids = [0, 0, 1, 1, 2, 2]
    model = [0.1, 0.3, 0.5, 0.9, 10.0, 20.0]
    assert H.rated_model_reward(group_ids, ["human", "model", "human"], model) == pytest.approx(
        (0.1 + 0.3 + 10.0 + 20.0) / 4)
    assert H.rated_model_reward(group_ids, ["model", "model", "skipped"], model) is None
    assert H.rated_model_reward(group_ids, ["human", "human", "human"], None) is None
    assert H.rated_model_reward(group_ids, ["human", "model", "model"], [math.nan, 1, 1, 1, 1, 1]) is None


def test_rated_groups_add_up_over_the_run_and_the_signal_says_what_moves():
    history = []
    for it, (rated, model_reward) in enumerate([(2, 0.2), (0, None), (1, 0.5)], start=1):
        fields = H.tracking_fields(history, rated, 2, model_reward, "saturation" if model_reward is not None else None)
        history.append({"reward_mean": 0.0, "iteration": it, **fields})
    assert [h["rated_groups_total"] for h in history] == [2, 2, 3]
    assert [h["rated_model_reward"] for h in history] == [0.2, None, 0.5]
    text = H.signal_text(history)
    assert text.startswith("rated groups: 3 (1 of 2 this iteration)")
    assert "saturation of the rated images 0.5000 (running mean 0.3500 over 2)" in text
    # an iteration without a rated group shows the running mean, not a made-up value
    assert "saturation of the rated images - (running mean 0.2000 over 1)" in H.signal_text(history[:2])
    with_heldout = H.signal_text(history, {"reward": 0.61234, "iteration": 2, "name": "saturation"})
    assert with_heldout.endswith("held-out saturation 0.6123 (iteration 2)")
    # a non-human iteration in between (the reward scorer swapped in) does not reset the count
    history.append({"reward_mean": 0.3, "iteration": 4})
    fields = H.tracking_fields(history, 2, 2, None, None)
    assert fields["rated_groups_total"] == 5


def test_without_a_model_reward_or_held_out_the_signal_says_so_plainly():
    history = []
    for it in range(1, 7):
        history.append({"reward_mean": 0.0, **H.tracking_fields(history, 2, 2, None, None)})
    text = H.signal_text(history)
    assert text.startswith("rated groups: 12 (2 of 2 this iteration); no reward model to track progress -- "
                           "wire Held-out Evaluation")
    assert "reward 0.0000" not in text
    # a held-out result that is not a number does not count as a signal
    assert "no reward model" in H.signal_text(history, {"reward": float("nan"), "iteration": 5, "name": "x"})
    assert "held-out x 0.2500" in H.signal_text(history, {"reward": 0.25, "iteration": 5, "name": "x"})
