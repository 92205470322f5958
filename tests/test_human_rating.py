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


def _rating(req):
    return {"request_id": req.request_id, "ratings": {"0": {"best": "a" * 16, "worst": "b" * 16}}}


def test_a_rating_after_the_timeout_is_refused_and_one_before_it_is_used():
    """The timeout closes the request: a submission after it is refused (RequestClosed, nothing
    stored), also once the request is forgotten; a rating accepted before the timeout stays."""
    reg = H.Registry()
    late = _req()
    reg.add(late)
    assert late.expire() == "timeout" and late.done.is_set()
    with pytest.raises(H.RequestClosed, match="timed out") as e:
        reg.submit(_rating(late))
    assert e.value.state == "timeout" and late.result is None and reg.pending() == []
    reg.remove(late.request_id)
    with pytest.raises(H.RequestClosed, match="not used"):
        reg.submit(_rating(late))
    with pytest.raises(H.RequestClosed):
        reg.cancel(late.request_id)
    early = _req()
    reg.add(early)
    reg.submit(_rating(early))
    assert early.expire() == "rated"  # the rating got in first: it stays
    assert early.state == "rated" and early.result == {0: {"best": "a" * 16, "worst": "b" * 16}}
    gone = _req()
    reg.add(gone)
    reg.remove(gone.request_id)  # the run stopped waiting (interrupted)
    with pytest.raises(H.RequestClosed) as e:
        reg.submit(_rating(gone))
    assert e.value.state == "withdrawn" and gone.result is None


def test_the_timeout_and_a_rating_arriving_with_it(pcpo):
    """wait_for_rating with a controlled clock: a rating that arrives as the timeout is reached is
    used ("rated"); after a timeout the submission is refused."""
    human = pcpo.mod("nodes.human")
    reg = H.Registry()
    req = _req()
    req.timeout_s = 5
    reg.add(req)
    calls = []

    def clock():  # the start, then the timeout check: the rating arrives right then
        calls.append(1)
        if len(calls) == 2:
            reg.submit(_rating(req))
        return 0.0 if len(calls) == 1 else 5.0

    assert human.wait_for_rating(req, clock=clock) == "rated"
    assert req.result == {0: {"best": "a" * 16, "worst": "b" * 16}}
    late = _req()
    late.timeout_s = 5
    reg.add(late)
    ticks = iter([0.0, 5.0])
    assert human.wait_for_rating(late, clock=lambda: next(ticks)) == "timeout"
    with pytest.raises(H.RequestClosed, match="timed out"):
        reg.submit(_rating(late))
    assert late.result is None


def test_rating_routes_answer_what_happened_to_a_submission(pcpo):
    """Through the server routes: 200 (used) while pending, 409 with the reason once timed out,
    also after the run forgot the request."""
    import asyncio
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    routes_mod = pcpo.mod("nodes.human_routes")
    human = pcpo.mod("nodes.human")

    async def scenario():
        routes = web.RouteTableDef()
        routes_mod.register(routes)
        app = web.Application()
        app.add_routes(routes)
        on_time, late = _req(), _req()
        for r in (on_time, late):
            routes_mod.REGISTRY.add(r)
        async with TestClient(TestServer(app)) as client:
            ok = await client.post("/pcpo/ratings/submit", json=_rating(on_time))
            body_ok = await ok.json()
            late.timeout_s = 0.2
            assert human.wait_for_rating(late) == "timeout"  # the run's timeout fired, the request still listed
            refused = await client.post("/pcpo/ratings/submit", json=_rating(late))
            body_refused = await refused.json()
            routes_mod.retire(late)
            after = await client.post("/pcpo/ratings/submit", json=_rating(late))
            body_after = await after.json()
            cancel = await client.post("/pcpo/ratings/cancel", json={"request_id": late.request_id})
        routes_mod.retire(on_time)
        return (ok.status, body_ok, refused.status, body_refused, after.status, body_after, cancel.status,
                on_time, late)

    ok, body_ok, refused, body_refused, after, body_after, cancel, on_time, late = asyncio.run(scenario())
    assert refused == 409 and body_refused["state"] == "timeout" and body_refused["used"] is False
    assert ok == 200 and body_ok["used"] is True and on_time.result == {0: {"best": "a" * 16, "worst": "b" * 16}}
    assert "timed out" in body_refused["error"] and late.result is None
    assert after == 409 and body_after["state"] == "timeout" and cancel == 409


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
    # the node says what shows progress: with unrated=skip there is no model reward, nor a held-out one
    shown = res["ui"]["pcpo_stats"][0]
    assert shown["rated_groups_total"] == 1
    assert shown["signal"].startswith("rated groups: 1 (1 of 2 this iteration); no reward model to track "
                                      "progress -- wire Held-out Evaluation")
    assert session.state.history[-1]["rated_groups_total"] == 1
    assert shown["progress"]["text"].startswith("iteration 1 of 1 done")


def test_rated_groups_are_tracked_with_the_model_reward_of_their_images(comfy, tiny, pcpo, comfy_dirs, monkeypatch):
    """Human ratings are relative (mean 0): with unrated=model reward the model reward also scores the
    rated groups, and the Update node shows its mean over the rated images and the rated-group count
    over the run (kept in the run's history, so it survives a resume)."""
    human = pcpo.mod("nodes.human")
    routes = pcpo.mod("nodes.human_routes")
    update = pcpo.mod("nodes.update")
    monkeypatch.setattr(routes, "register_with_server", lambda: True)
    run = "human_tracked"
    _, traj, images, session = _rollout(comfy, tiny, pcpo, comfy_dirs, run)

    def page():  # rates group 0 only; group 1 goes to the model reward
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = routes.REGISTRY.pending()
            if pending:
                req = pending[0]
                g0 = req.groups[0]
                routes.REGISTRY.submit({"request_id": req.request_id, "ratings": {
                    str(g0["group"]): {"best": g0["images"][0], "worst": g0["images"][2]}}})
                return
            time.sleep(0.02)

    t = threading.Thread(target=page)
    t.start()
    out = human.PCPOHumanRating().rate(images, traj, "best-worst", 0, "model reward", "rank", 30, "saturation")
    t.join()
    rewards, _ = out["result"]
    from comfyui_pcpo import rewards as R
    sat = R.builtin_reward("saturation").score(images.cpu(), traj.prompts).double().tolist()
    gids = traj.traj.group_ids.tolist()
    first = gids[0]
    want = sum(v for v, g in zip(sat, gids) if g == first) / gids.count(first)
    assert rewards.human["rated_groups"] == 1 and rewards.human["groups"] == 2
    assert rewards.human["model_reward_name"] == "saturation"
    assert rewards.human["model_reward"] == pytest.approx(want, rel=1e-6)
    # the rewards themselves are unchanged: the rated group's ranks from the rating, the other's from the model
    rated_vals = [v for v, g in zip(rewards.values.tolist(), gids) if g == first]
    assert sorted(rated_vals) == [-1.0, 0.0, 0.0, 1.0]
    res = update.PCPOLoRAUpdate().update(session, traj, rewards, "pcpo", 1e-4, 5.0, 1.0, 4, 1.0, 1, 3, 1)
    shown = res["ui"]["pcpo_stats"][0]
    assert shown["signal"] == (f"rated groups: 1 (1 of 2 this iteration) · saturation of the rated images "
                               f"{want:.4f} (running mean {want:.4f} over 1)")
    assert session.state.history[-1]["rated_model_reward"] == pytest.approx(want, rel=1e-6)
    assert shown["progress"]["text"].startswith("iteration 1 of 3 done · ") and "ETA" in shown["progress"]["text"]
    assert shown["progress"]["cancel_text"].startswith("stopped at iteration 2 of 3 (cancelled)")


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
