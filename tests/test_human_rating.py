"""Human ratings as a reward (comfyui_pcpo/ratings.py) and the PCPO Human Rating node in-process.

* a submission is accepted only for the pending request, with every field checked (types, ranges,
  image ids of the right group, no extra keys); anything else is refused;
* best/worst and 1-5 scores become rewards; rank calibration puts human and model groups on one
  scale; unrated groups are completed by the model reward or skipped (all equal: zero advantage);
* the node waits for the rating (a stand-in page answers through the registry), appends it with the
  image ids to ratings.jsonl in the run folder (surviving a re-read), keeps the rated PNGs, and
  times out into the unrated rule; the rewards feed a real update.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from comfyui_pcpo import ratings as H


def _req(mode="best-worst"):
    return H.RatingRequest(run_name="r", iteration=0, mode=mode, timeout_s=60, total_groups=2,
                           groups=[{"group": 0, "prompt": "a", "images": ["a" * 16, "b" * 16, "c" * 16]},
                                   {"group": 1, "prompt": "b", "images": ["d" * 16, "e" * 16, "f" * 16]}])


@pytest.mark.parametrize("payload", [
    None, [], "x", {"request_id": "0" * 32, "ratings": {}}, {"ratings": {}},
    {"REQ": True}, {"request_id": "RID", "ratings": []}, {"request_id": "RID", "ratings": {}, "extra": 1},
    {"request_id": "RID", "ratings": {"2": {"best": "a" * 16, "worst": "b" * 16}}},
    {"request_id": "RID", "ratings": {"-1": {"best": "a" * 16, "worst": "b" * 16}}},
    {"request_id": "RID", "ratings": {"0": {"best": "a" * 16, "worst": "d" * 16}}},
    {"request_id": "RID", "ratings": {"0": {"best": "a" * 16, "worst": "a" * 16}}},
    {"request_id": "RID", "ratings": {"0": {"best": "a" * 16}}},
    {"request_id": "RID", "ratings": {"0": {"best": "a" * 16, "worst": "b" * 16, "x": 1}}},
    {"request_id": "RID", "ratings": {"0": {"best": ["a" * 16], "worst": "b" * 16}}},
    {"request_id": "RID", "ratings": {"0": "best"}},
])
def test_bad_best_worst_submissions_are_refused(payload):
    req = _req()
    if isinstance(payload, dict) and payload.get("request_id") == "RID":
        payload = dict(payload, request_id=req.request_id)
    with pytest.raises(H.RatingError):
        H.validate_submission(req, payload)


@pytest.mark.parametrize("scores", [
    {"a" * 16: 1, "b" * 16: 2},                              # not every image
    {"a" * 16: 1, "b" * 16: 2, "c" * 16: 6},                 # out of range
    {"a" * 16: 0, "b" * 16: 2, "c" * 16: 3},
    {"a" * 16: 1.5, "b" * 16: 2, "c" * 16: 3},               # not an integer
    {"a" * 16: True, "b" * 16: 2, "c" * 16: 3},
    {"a" * 16: "5", "b" * 16: 2, "c" * 16: 3},
    {"a" * 16: 1, "b" * 16: 2, "c" * 16: 3, "d" * 16: 3},    # another group's image
])
def test_bad_scores_are_refused(scores):
    req = _req("score")
    with pytest.raises(H.RatingError):
        H.validate_submission(req, {"request_id": req.request_id, "ratings": {"0": {"scores": scores}}})


def test_good_submissions_and_the_registry():
    req = _req()
    reg = H.Registry()
    reg.add(req)
    with pytest.raises(LookupError):
        reg.submit({"request_id": "f" * 32, "ratings": {}})
    with pytest.raises(LookupError):
        reg.submit({"request_id": "../../x", "ratings": {}})
    with pytest.raises(H.RatingError):
        reg.submit({"request_id": req.request_id, "ratings": {"0": {"best": "a" * 16, "worst": "a" * 16}}})
    assert not req.done.is_set()
    reg.submit({"request_id": req.request_id, "ratings": {"1": {"best": "f" * 16, "worst": "d" * 16}}})
    assert req.done.is_set() and req.result == {1: {"best": "f" * 16, "worst": "d" * 16}}
    with pytest.raises(LookupError):  # answered once only
        reg.submit({"request_id": req.request_id, "ratings": {}})
    assert reg.pending() == []
    req2 = _req("score")
    reg.add(req2)
    out = H.validate_submission(req2, {"request_id": req2.request_id, "ratings": {
        "0": {"scores": {"a" * 16: 5, "b" * 16: 1, "c" * 16: 3}}}})
    assert out == {0: {"scores": {"a" * 16: 5, "b" * 16: 1, "c" * 16: 3}}}
    reg.cancel(req2.request_id)
    assert req2.cancelled and req2.done.is_set()
    public = json.dumps(req2.public())
    assert "/" not in public.replace("request_id", "")  # no paths go to the page


def test_rewards_from_ratings_calibration_and_unrated_groups():
    gids = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ids = [f"{i:016x}" for i in range(9)]
    ratings = {0: {"best": ids[2], "worst": ids[0]}, 1: {"scores": {ids[3]: 5, ids[4]: 5, ids[5]: 1}}}
    model = [0.1, 0.2, 0.3, 9.0, 8.0, 7.0, 0.5, 0.9, 0.7]
    values, sources = H.combine(gids, ids, ratings, model, "rank")
    assert sources == ["human", "human", "model"]
    assert values == [-1.0, 0.0, 1.0, 0.5, 0.5, -1.0, -1.0, 1.0, 0.0]
    values, sources = H.combine(gids, ids, ratings, None, "rank")
    assert sources == ["human", "human", "skipped"] and values[6:] == [0.0, 0.0, 0.0]
    values, _ = H.combine(gids, ids, ratings, model, "none")
    assert values == [-1.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5, 0.9, 0.7]
    assert H.centred_ranks([3.0, 1.0, 2.0, 2.0]) == [1.0, -1.0, 0.0, 0.0]
    assert H.centred_ranks([2.0]) == [0.0] and H.centred_ranks([1.0, 1.0]) == [0.0, 0.0]


def test_ratings_file_appends_and_survives_a_torn_line(tmp_path):
    path = str(tmp_path / "run" / "ratings.jsonl")
    H.append_jsonl(path, {"a": 1})
    H.append_jsonl(path, {"a": 2})
    with open(path, "a") as f:
        f.write('{"a": 3')  # a crash mid-write
    assert H.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError):
        H.append_jsonl(path, {"a": float("nan")})


# --------------------------------------------------------------------------- the node in-process

def _rollout(comfy, tiny, pcpo, comfy_dirs, run, groups=2, group_size=4):
    """A rollout of the demo model through the pack's nodes (PCPO LoRA, Prompts, Sampler, VAE Decode)."""
    api = {
        "1": {"class_type": "PCPODemoModelLoader", "inputs": {}},
        "2": {"class_type": "PCPOLoRA", "inputs": {"model": ["1", 0], "run_name": run, "rank": 4, "alpha": 4.0,
                                                   "target_layers": "attention", "learning_rate": 1e-3,
                                                   "optimizer": "AdamW", "weight_decay": 0.0, "seed": 0,
                                                   "resume": False}},
        "3": {"class_type": "PCPOPrompts", "inputs": {"clip": ["1", 1], "prompts": "a red circle on a blue "
              "background\na green square on a white background", "prompt_file": "(none)", "negative_prompt": "",
              "prompts_per_iteration": groups, "seed": 0}},
        "4": {"class_type": "PCPOTrajectorySampler", "inputs": {
            "session": ["2", 1], "prompts": ["3", 0], "steps": 3, "cfg": 4.0, "group_size": group_size, "seed": 0,
            "eta": 1.0, "rollout_variant": "uw-sigma", "flow_noise_rule": "constant", "scheduler": "simple",
            "width": 32, "height": 32, "groups": 1}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    res = comfy.execute_prompt(api)
    return res, res["4"][1], res["5"][0], res["2"][1]


def test_node_waits_for_the_page_records_the_rating_and_feeds_the_update(comfy, tiny, pcpo, comfy_dirs, monkeypatch):
    human = pcpo.mod("nodes.human")
    routes = pcpo.mod("nodes.human_routes")
    update = pcpo.mod("nodes.update")
    monkeypatch.setattr(routes, "register_with_server", lambda: True)
    run = "human_inproc"
    _, traj, images, session = _rollout(comfy, tiny, pcpo, comfy_dirs, run)
    answered = {}

    def page():  # the panel: waits for the request, then picks best/worst in group 0 and leaves group 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = routes.REGISTRY.pending()
            if pending:
                req = pending[0]
                g0 = req.groups[0]
                answered["ids"] = g0["images"]
                answered["png"] = req.images[g0["images"][0]][:8]
                routes.REGISTRY.submit({"request_id": req.request_id, "ratings": {
                    str(g0["group"]): {"best": g0["images"][3], "worst": g0["images"][1]}}})
                return
            time.sleep(0.02)

    t = threading.Thread(target=page)
    t.start()
    out = human.PCPOHumanRating().rate(images, traj, "best-worst", 0, "skip", "rank", 30, "saturation")
    t.join()
    rewards, mean = out["result"]
    assert answered["png"] == b"\x89PNG\r\n\x1a\n"
    assert rewards.values.tolist() == [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.name == "human" and rewards.trajectory_uid == traj.uid and mean == 0.0
    run_dir = comfy_dirs["output"] / "pcpo" / run
    rec = H.read_jsonl(str(run_dir / "ratings.jsonl"))
    assert len(rec) == 1 and rec[0]["status"] == "rated" and rec[0]["iteration"] == 1
    assert [g["source"] for g in rec[0]["groups"]] == ["human", "skipped"]
    assert rec[0]["groups"][0]["images"] == answered["ids"]
    assert sorted(p.stem for p in (run_dir / "rated").glob("*.png")) == sorted(answered["ids"])
    # the update trains on exactly these rewards: one group with a signal, one with zero advantage
    res = update.PCPOLoRAUpdate().update(session, traj, rewards, "pcpo", 1e-4, 5.0, 1.0, 4, 1.0, 1, 1, 1)
    stats = json.loads(res["result"][1])
    assert stats["reward_mean"] == 0.0 and stats["zero_std_groups"] == 1 and stats["groups"] == 2
    assert stats["reward_std"] == pytest.approx((2 / 8) ** 0.5)


def test_node_times_out_into_the_model_reward_in_mixed_mode(comfy, tiny, pcpo, comfy_dirs, monkeypatch):
    human = pcpo.mod("nodes.human")
    routes = pcpo.mod("nodes.human_routes")
    monkeypatch.setattr(routes, "register_with_server", lambda: True)
    run = "human_timeout"
    _, traj, images, _ = _rollout(comfy, tiny, pcpo, comfy_dirs, run)
    seen = []
    t = threading.Thread(target=lambda: (time.sleep(0.5), seen.append([len(r.groups) for r in routes.REGISTRY.pending()])))
    t.start()
    out = human.PCPOHumanRating().rate(images, traj, "score", 1, "model reward", "none", 1, "saturation")
    t.join()
    assert seen == [[1]]  # mixed mode: one group shown
    rewards, _ = out["result"]
    from comfyui_pcpo import rewards as R
    want = R.builtin_reward("saturation").score(images.cpu(), traj.prompts)
    assert rewards.values.tolist() == pytest.approx(want.double().tolist())
    assert rewards.name == "human+saturation"
    rec = H.read_jsonl(str(comfy_dirs["output"] / "pcpo" / run / "ratings.jsonl"))
    assert rec[0]["status"] == "timeout" and [g["source"] for g in rec[0]["groups"]] == ["model", "model"]
    assert routes.REGISTRY.pending() == []


# --------------------------------------------------------------------------- what the page shows of a run

def test_stats_are_strict_json_and_the_default_export_name_follows_the_run(comfy, tiny, pcpo, comfy_dirs):
    update = pcpo.mod("nodes.update")
    export = pcpo.mod("nodes.export")
    assert update.strict_json({"a": float("nan"), "b": [1.0, float("inf"), None], "c": {"d": -float("inf")}}) == \
        {"a": None, "b": [1.0, None, None], "c": {"d": None}}
    run = "strict_stats"
    _, traj, images, session = _rollout(comfy, tiny, pcpo, comfy_dirs, run)
    scorer = pcpo.mod("nodes.reward").PCPORewardScorer()
    rewards, _ = scorer.score(images, traj, "saturation")
    res = update.PCPOLoRAUpdate().update(session, traj, rewards, "pcpo", 1e-4, 5.0, 0.5, 4, 1.0, 2, 1, 1)
    text = res["result"][1]
    stats = json.loads(text, parse_constant=lambda c: pytest.fail(f"stats hold {c}: not strict JSON"))
    assert None in stats["clip_fraction_per_step"]  # steps not trained (train_fraction 0.5) are null
    shown = res["ui"]["pcpo_stats"][0]
    assert shown["iteration"] == 1 and shown["running_mean"] == pytest.approx(stats["reward_mean"])
    default = export.PCPOExportLoRA.INPUT_TYPES()["required"]["filename"][1]["default"]
    assert default == "pcpo/{run}"
    out = export.PCPOExportLoRA().export(session, default)
    path = out["result"][0]
    assert path.endswith(f"pcpo/{run}.safetensors") and (comfy_dirs["loras"] / "pcpo" / f"{run}.safetensors").is_file()
    assert any(path in t for t in out["ui"]["text"])  # what the extension shows on the Export node
