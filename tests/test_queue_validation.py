"""Every input is checked when the prompt is queued, with its name, before any work.

Through ComfyUI's own validation (``execution.validate_prompt``) and executor, on a full training
graph (PCPO LoRA -> Prompts -> Trajectory Sampler -> Reward -> Update -> Export, plus Held-out
Evaluation, Reward Guard and an Implicit Reward Guidance branch):

* NaN, out-of-range and oversized values of every kind (FLOAT of a node with and without a
  VALIDATE_INPUTS, INT, names) are refused at queue time with an error filed under that input whose
  message names it, and executing the prompt samples, trains and writes nothing (ComfyUI runs the
  outputs that passed, so the pack refuses the whole prompt in its first node);
* the shipped defaults of the graph validate and run (the negative control);
* sizes inside the widget limits that cannot fit in memory are refused before sampling, naming
  the inputs;
* the rating routes answer 400 to malformed bodies (deep nesting, a 5000-digit integer, NaN,
  wrong shapes) on submit and cancel.
"""
from __future__ import annotations

import asyncio
import math
import os
import pathlib

import pytest

from comfyui_pcpo import validate as V

TESTS_DIR = pathlib.Path(__file__).resolve().parent
RUN = "qv_run"


def graph(irg: bool = False, **changes) -> dict:
    """A full training graph (``irg``: plus an IRG preview branch); ``changes``: {"node.input": value}."""
    g = {
        "1": {"class_type": "PCPOTestCheckpointLoader", "inputs": {"family": "sd15"}},
        "2": {"class_type": "PCPOLoRA", "inputs": {
            "model": ["1", 0], "run_name": RUN, "rank": 4, "alpha": 4.0, "target_layers": "attention",
            "learning_rate": 1e-3, "optimizer": "AdamW", "weight_decay": 0.01, "seed": 3, "resume": True}},
        "3": {"class_type": "PCPOPrompts", "inputs": {
            "clip": ["1", 1], "prompts": "a red circle\na blue square", "prompt_file": "(none)",
            "negative_prompt": "", "prompts_per_iteration": 2, "seed": 0}},
        "5": {"class_type": "PCPOTrajectorySampler", "inputs": {
            "session": ["2", 1], "steps": 3, "cfg": 3.0, "group_size": 2, "seed": 11, "eta": 1.0,
            "rollout_variant": "uw-sigma", "flow_noise_rule": "constant", "scheduler": "simple",
            "width": 64, "height": 64, "groups": 2, "prompts": ["3", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PCPORewardScorer", "inputs": {"images": ["6", 0], "trajectory": ["5", 1],
                                                           "reward": "brightness"}},
        "8": {"class_type": "PCPOLoRAUpdate", "inputs": {
            "session": ["2", 1], "trajectory": ["5", 1], "rewards": ["7", 0], "objective": "pcpo",
            "clip_range": 1e-4, "advantage_clip": 5.0, "train_fraction": 1.0, "micro_batch": 2, "grad_clip": 1.0,
            "updates_per_rollout": 1, "iterations_per_queue": 1, "checkpoint_every": 1}},
        "9": {"class_type": "PCPOExportLoRA", "inputs": {"session": ["2", 1], "filename": "pcpo/{run}",
                                                         "dtype": "fp32", "also_diffusers": False, "stats": ["8", 1]}},
        "10": {"class_type": "PCPOHeldOutEvaluation", "inputs": {
            "session": ["2", 1], "clip": ["1", 1], "vae": ["1", 2], "prompts": "a red circle", "negative": "",
            "every": 1, "samples_per_prompt": 2, "steps": 3, "cfg": 3.0, "eta": 1.0, "scheduler": "simple",
            "width": 64, "height": 64, "seed": 1, "reward": "brightness", "guard_reward": "(none)",
            "stats": ["8", 1]}},
        "11": {"class_type": "PCPORewardGuard", "inputs": {
            "session": ["2", 1], "heldout": ["10", 0], "heldout_margin": 0.05, "guard_margin": 0.05,
            "kl_bound": 0.0, "action": "lower_lr", "lr_factor": 0.5, "best_filename": "pcpo/{run}_best",
            "dtype": "fp16"}},
        # an IRG branch of its own (a preview of a guided sample)
        "12": {"class_type": "PCPOImplicitRewardGuidance", "inputs": {
            "model": ["1", 0], "lora_name": "pcpo/qv_run.safetensors", "guidance": 1.5}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "14": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "15": {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0, "positive": ["13", 0], "negative": ["13", 0], "latent_image": ["14", 0]}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}},
    }
    if not irg:
        for nid in ("12", "13", "14", "15", "16", "17"):
            del g[nid]
    for key, value in changes.items():
        nid, name = key.split(".")
        g[nid]["inputs"][name] = value
    return g


@pytest.fixture
def host(pcpo, comfy, comfy_dirs):
    assert comfy.load_pack(TESTS_DIR / "tiny_pack")
    yield comfy
    pcpo.mod("nodes.session").SESSIONS.pop(RUN)


def _files(dirs) -> list:
    found = []
    for key in ("output", "loras", "temp"):
        for base, _, names in os.walk(dirs[key]):
            found += [os.path.join(base, n) for n in names]
    return found


LONG = "x" * 300
CASES = [  # (node, input, value, text the error must contain)
    ("8", "clip_range", math.nan, "clip_range is nan"),
    ("8", "grad_clip", math.nan, "grad_clip is nan"),
    ("8", "advantage_clip", math.nan, "advantage_clip is nan"),
    ("8", "train_fraction", math.inf, "train_fraction is inf"),
    ("5", "cfg", math.nan, "cfg is nan"),
    ("5", "eta", math.nan, "eta is nan"),
    ("10", "cfg", math.nan, "cfg is nan"),
    ("2", "rank", 200000, "Value 200000 bigger than max of 256"),
    ("2", "alpha", 1e9, "alpha 1e+09 is above its maximum 1024"),
    ("2", "alpha", math.nan, "alpha is nan"),
    ("2", "learning_rate", 2.0, "learning_rate 2 is above its maximum 0.1"),
    ("2", "seed", 2 ** 64, "bigger than max of 4294967295"),
    ("5", "seed", 2 ** 64, "bigger than max of 18446744073709551615"),
    ("3", "prompts_per_iteration", 100000, "Value 100000 bigger than max of 256"),
    ("12", "guidance", math.nan, "guidance is nan"),
    ("12", "guidance", 1e9, "guidance 1e+09 is above its maximum 10"),
    ("11", "best_filename", "../x", "best_filename '../x' contains '..'"),
    ("11", "best_filename", "/tmp/x", "best_filename '/tmp/x' is an absolute path"),
    ("11", "lr_factor", math.nan, "lr_factor is nan"),
    ("2", "run_name", "a\n", "run_name 'a\\n' contains the control character '\\n'"),
    ("9", "filename", LONG, "300 characters long, more than 128"),
    ("9", "filename", "pcpo/a\tb", "contains the control character '\\t'"),
]


@pytest.mark.parametrize("nid,name,value,text", CASES, ids=[f"{c[1]}={c[2]!r}"[:40] for c in CASES])
def test_a_bad_input_is_refused_at_queue_time_under_its_name_and_nothing_runs(pcpo, host, comfy_dirs, nid, name,
                                                                                value, text):
    prompt = graph(irg=nid == "12", **{f"{nid}.{name}": value})
    ok, error, outputs, node_errors = host.validate_prompt(prompt)
    assert nid in node_errors, (name, node_errors)
    errs = node_errors[nid]["errors"]
    mine = [e for e in errs if e["extra_info"].get("input_name") == name]
    assert mine, errs  # filed under the input at fault
    assert any(text in (e["details"] + " " + e["message"]) for e in mine), mine
    # every error of that node names the input at fault (none blames another input)
    assert all(name in e["details"] for e in errs), errs
    # queued anyway (ComfyUI runs the outputs that passed): nothing is sampled, trained or written
    with pytest.raises(host.PromptError) as ei:
        host.execute_prompt(prompt)
    assert name in str(ei.value)
    assert RUN not in pcpo.mod("nodes.session").SESSIONS
    assert _files(comfy_dirs) == []


def test_the_graph_with_sane_values_validates_and_trains(pcpo, host, comfy_dirs):
    """The negative control of the cases above: the same graph runs and writes its files."""
    ok, error, outputs, node_errors = host.validate_prompt(graph(irg=True))
    assert ok and not node_errors, (error, node_errors)  # the IRG LoRA is looked for when the node runs
    res = host.execute_prompt(graph())
    assert "8" in res.outputs
    names = {os.path.basename(p) for p in _files(comfy_dirs)}
    assert {"checkpoint.safetensors", f"{RUN}.safetensors"} <= names, names


def test_an_export_path_that_is_a_folder_is_refused_before_any_work(pcpo, host, comfy_dirs):
    import folder_paths
    root = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(os.path.join(root, "pcpo", f"{RUN}.safetensors"))
    with pytest.raises(host.PromptError, match="is the existing folder") as ei:
        host.execute_prompt(graph())
    assert "filename" in str(ei.value)
    assert RUN not in pcpo.mod("nodes.session").SESSIONS
    assert [p for p in _files(comfy_dirs)] == []


def test_every_float_input_of_the_pack_is_checked_by_its_node(pcpo):
    """Structure behind the cases above: no VALIDATE_INPUTS takes **kwargs (which switches ComfyUI's
    range and list checks off for every input), and every FLOAT input is one the node checks
    (ComfyUI's own check lets NaN through)."""
    import inspect
    for name, cls in pcpo.nodes.items():
        specs = V.input_specs(cls.INPUT_TYPES())
        floats = {k for k, (t, _) in specs.items() if t == "FLOAT"}
        fn = getattr(cls, "VALIDATE_INPUTS", None)
        if fn is None:
            assert not floats, (name, floats)
            continue
        spec = inspect.getfullargspec(fn)
        assert spec.varkw is None, name
        assert floats <= set(spec.args), (name, floats - set(spec.args))


def test_a_size_that_cannot_fit_in_memory_is_refused_before_sampling(pcpo, host, comfy_dirs):
    """8192x8192 x group_size 256 x 200 steps fits every widget and no computer (terabytes of
    recorded rollout): refused by the Trajectory Sampler before it samples, naming the inputs."""
    prompt = graph(**{"5.width": 8192, "5.height": 8192, "5.group_size": 256, "5.steps": 200})
    ok, _, _, node_errors = host.validate_prompt(prompt)
    assert ok and not node_errors  # every value is inside its widget's limits
    with pytest.raises(host.PromptError) as ei:
        host.execute_prompt(prompt)
    msg = str(ei.value)
    assert "PCPOTrajectorySampler" in msg and "GiB" in msg, msg
    for name in ("group_size", "steps", "width/height", "Nothing was sampled"):
        assert name in msg, (name, msg)
    names = {os.path.basename(p) for p in _files(comfy_dirs)}
    assert "checkpoint.safetensors" not in names and f"{RUN}.safetensors" not in names


def test_memory_estimate_closed_form():
    est = V.memory_estimate(samples=6, steps=10, latent_elements=4 * 8 * 8, model_bytes=1000, micro_batch=3,
                            guided=True)
    assert est.rollout_bytes == V.RECORD_COPIES * 6 * 31 * 256 * 4
    assert est.gradient_bytes == int(3 * 2 * 1000 * V.ACTIVATION_FACTOR * 256 / V.REF_LATENT_ELEMENTS)
    ck = V.memory_estimate(6, 10, 256, 1000, 3, guided=False, checkpointing=True)
    assert ck.gradient_bytes == int(3 * 1000 * V.ACTIVATION_FACTOR * V.CHECKPOINTED_FACTOR * 256 / V.REF_LATENT_ELEMENTS)
    assert V.memory_error(est, est.rollout_bytes, est.gradient_bytes, "s") is None  # fits exactly
    assert "micro_batch" in V.memory_error(est, est.rollout_bytes, est.gradient_bytes - 1, "s")
    assert "group_size" in V.memory_error(est, est.rollout_bytes - 1, None, "s")
    both = est.rollout_bytes + est.gradient_bytes
    assert V.memory_error(est, both, both, "s", same_memory=True) is None
    assert "micro_batch" in V.memory_error(est, both - 1, both - 1, "s", same_memory=True)


@pytest.mark.parametrize("value,ok", [("pcpo_run", True), ("a" * 128, True), ("a" * 129, False), ("a\n", False),
                                      ("a/b", False), ("..a", False), ("a..b", False), ("-a", False), ("", False),
                                      ("a b", False), ("r\u200b", False)])
def test_run_name_rule(value, ok):
    assert (V.name_error("run_name", value, kind="run") is None) == ok


@pytest.mark.parametrize("value,ok", [("pcpo/run1", True), ("a b/c", True), ("x" * 128, True), ("x" * 129, False),
                                      ("a\n", False), ("../x", False), ("a/../b", False), ("/x", False),
                                      ("C:/x", False), ("a:b", False), ("a/", False), (" a", False),
                                      ("a\x00", False), ("a\\..\\b", False)])
def test_file_name_rule(value, ok):
    assert (V.name_error("filename", value) is None) == ok


# ----------------------------------------------------------------------------- the rating routes

def _deep(n, open_="[", close="]"):
    return (open_ * n + close * n).encode()


MALFORMED = {
    "nested arrays": _deep(30000),
    "nested objects": ('{"a":' * 10000 + "1" + "}" * 10000).encode(),
    "nested under ratings": ('{"request_id": "RID", "ratings": {"0": ' + "[" * 30 + "]" * 30 + "}}").encode(),
    "5000-digit integer": b'{"request_id": "RID", "ratings": {"0": {"scores": {"x": ' + b"9" * 5000 + b"}}}}",
    "5000-digit request id": b'{"request_id": ' + b"1" * 5000 + b"}",
    "NaN": b'{"request_id": "RID", "ratings": NaN}',
    "request id a list": b'{"request_id": ["RID"], "ratings": {}}',
    "request id an object": b'{"request_id": {"a": 1}, "ratings": {}}',
    "not an object": b"[1, 2]",
    "not UTF-8": b'{"request_id": "\xff"}',
}


def test_rating_routes_answer_400_to_malformed_bodies(pcpo):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from comfyui_pcpo import ratings as H
    routes_mod = pcpo.mod("nodes.human_routes")
    req = H.RatingRequest(run_name="r", iteration=0, mode="score", timeout_s=60, total_groups=1,
                          groups=[{"group": 0, "prompt": "a", "images": ["a" * 16, "b" * 16]}])

    async def scenario():
        routes = web.RouteTableDef()
        routes_mod.register(routes)
        app = web.Application()
        app.add_routes(routes)
        routes_mod.REGISTRY.add(req)
        got = {}
        async with TestClient(TestServer(app)) as client:
            for name, body in MALFORMED.items():
                body = body.replace(b"RID", req.request_id.encode())
                assert len(body) < H.MAX_BODY_BYTES, name
                for route in ("submit", "cancel"):
                    r = await client.post(f"/pcpo/ratings/{route}", data=body,
                                          headers={"Content-Type": "application/json"})
                    got[(name, route)] = (r.status, (await r.json()).get("error", ""))
            pending = await client.get("/pcpo/ratings/pending")
            still = [p["request_id"] for p in (await pending.json())["pending"]]
        routes_mod.retire(req)
        return got, still

    got, still = asyncio.run(scenario())
    for key, (status, message) in got.items():
        assert status == 400 and message, (key, status, message)
    assert req.request_id in still and req.result is None  # nothing sent was used


def test_request_ids_must_match_whole():
    from comfyui_pcpo import ratings as H
    reg = H.Registry()
    req = H.RatingRequest(run_name="r", iteration=0, mode="score", timeout_s=60, total_groups=1,
                          groups=[{"group": 0, "prompt": "a", "images": ["a" * 16, "b" * 16]}])
    reg.add(req)
    assert reg.get(req.request_id) is req
    assert reg.get(req.request_id + "\n") is None
