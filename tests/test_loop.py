"""The re-queue loop (nodes/requeue.py) against a real ComfyUI server (main.py in a subprocess).

One server runs every scenario (a run name each), with our pack, the tiny stand-in pack and a probe
pack written here: a probe node that runs after the Export node (it takes the export's path), logs
what it sees (the loop marker, the sensitive API key, the time), and can fail, or wait for a Cancel,
on a chosen call.

* one POST with iterations_per_queue=3 runs 3 prompts, every one carrying the submitter's client id,
  its other extra_data keys and its sensitive part; each re-queue is made only after the previous
  prompt's Export (and the probe after it) ran;
* a node error after the update (the Export, or the probe) ends the loop: nothing more is queued;
* Cancel (POST /interrupt) while a node after the update runs ends the loop, whether that node stops
  (the prompt fails) or ignores the interrupt (the prompt still succeeds).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from test_workflows import (REPO_ROOT, TINY_PACK, WORKFLOWS, _free_port, _node_id, _read, _safetensors_metadata,
                            _Server, _stop, _wait_ready, shrink)

CLIENT_ID = "pcpo-loop-client"
API_KEY = "pcpo-test-not-a-key"

PROBE_PACK = textwrap.dedent('''\
    """Test-only probe node for tests/test_loop.py."""
    import json, os, time

    import comfy.model_management as mm


    class PCPOLoopProbe:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {
                        "after": ("STRING", {"forceInput": True}),
                        "log_path": ("STRING", {"default": ""}),
                        "sleep_s": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0}),
                        "fail_on_call": ("INT", {"default": 0, "min": 0, "max": 100}),
                        "wait_on_call": ("INT", {"default": 0, "min": 0, "max": 100}),
                        "ignore_interrupt": ("BOOLEAN", {"default": False})},
                    "hidden": {"extra_pnginfo": "EXTRA_PNGINFO", "api_key": "API_KEY_COMFY_ORG"}}

        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "run"
        CATEGORY = "testing"

        @classmethod
        def IS_CHANGED(cls, **kw):
            return float("nan")

        def run(self, after, log_path, sleep_s, fail_on_call, wait_on_call, ignore_interrupt,
                extra_pnginfo=None, api_key=None):
            calls = 1
            if os.path.exists(log_path):
                with open(log_path) as f:
                    calls += sum(1 for _ in f)
            try:
                from comfy_execution.utils import get_executing_context
                prompt_id = get_executing_context().prompt_id
            except Exception:
                prompt_id = None
            rec = {"call": calls, "start": time.time(), "prompt_id": prompt_id, "export": after,
                   "export_mtime": os.path.getmtime(after),
                   "marker": (extra_pnginfo or {}).get("pcpo_loop"),
                   "workflow": (extra_pnginfo or {}).get("workflow"), "api_key": api_key}
            if sleep_s:
                time.sleep(sleep_s)
            if calls == wait_on_call:
                open(log_path + ".waiting", "w").close()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if ignore_interrupt:
                        if mm.processing_interrupted():
                            break  # seen, not consumed: the prompt goes on and succeeds
                    else:
                        mm.throw_exception_if_processing_interrupted()
                    time.sleep(0.02)
            rec["end"] = time.time()
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\\n")
            if calls == fail_on_call:
                raise RuntimeError("probe failure on purpose")
            return {}


    def _loop_module():
        import importlib.util, sys
        mod = sys.modules.get("pcpo_loop_under_test")
        if mod is None:
            spec = importlib.util.spec_from_file_location("pcpo_loop_under_test", LOOP_PY)
            mod = importlib.util.module_from_spec(spec)
            sys.modules["pcpo_loop_under_test"] = mod
            spec.loader.exec_module(mod)
        return mod


    class PCPOLoopCounter:
        """nodes/requeue.py alone: counts in its loop marker and re-queues itself until ``target``."""
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"run": ("STRING", {"default": ""}), "target": ("INT", {"default": 1}),
                                 "log_path": ("STRING", {"default": ""})},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "run"
        CATEGORY = "testing"

        @classmethod
        def IS_CHANGED(cls, **kw):
            return float("nan")

        def run(self, run, target, log_path, prompt=None, extra_pnginfo=None):
            loop = _loop_module()
            marker = loop.loop_marker(extra_pnginfo, run)
            count = 1 if marker is None else marker["done"] + 1
            queued = None
            if count < target:
                queued = loop.requeue(prompt, extra_pnginfo, run, target, done=count)
            with open(log_path, "a") as f:
                f.write(json.dumps({"count": count, "marker": marker, "queued": queued}) + "\\n")
            return {}


    NODE_CLASS_MAPPINGS = {"PCPOLoopProbe": PCPOLoopProbe, "PCPOLoopCounter": PCPOLoopCounter}
''')


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop_server")
    comfy_dir = pathlib.Path(comfy.load_comfy())
    base = tmp / "comfy_base"
    custom = base / "custom_nodes"
    custom.mkdir(parents=True)
    os.symlink(REPO_ROOT, custom / "comfyui-pcpo", target_is_directory=True)
    os.symlink(TINY_PACK, custom / "pcpo_tiny_pack", target_is_directory=True)
    (custom / "pcpo_loop_probe").mkdir()
    (custom / "pcpo_loop_probe" / "__init__.py").write_text(
        f"LOOP_PY = {str(REPO_ROOT / 'nodes' / 'requeue.py')!r}\n" + PROBE_PACK)
    port = _free_port()
    # ComfyUI's main.py run by tools/comfyui_host.py (import shims first), as in test_workflows
    args = [sys.executable, str(REPO_ROOT / "tools" / "comfyui_host.py"), "serve", "--",
            "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PCPO_COMFYUI_NO_INSTALL="1",
               PYTHONUNBUFFERED="1", PCPO_COMFYUI_DIR=str(comfy_dir))
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=str(comfy_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = _Server(proc, f"http://127.0.0.1:{port}", log_path)
    srv.base = base
    srv.tmp = tmp
    try:
        _wait_ready(srv)
        for node in ("PCPOLoopProbe", "PCPOLoopCounter", "PCPOTestCheckpointLoader", "PCPOLoRAUpdate"):
            assert node in srv.get(f"/object_info/{node}"), f"{node} did not load:\n{srv.log_tail()}"
        yield srv
    finally:
        _stop(srv)


API = _read(WORKFLOWS / "api" / "pcpo_sd15_jpeg_compressibility.json")


def _prompt(srv, run: str, iterations: int, **probe) -> tuple[dict, pathlib.Path]:
    p = shrink(API, "sd15", run, iterations_per_queue=iterations)
    log_path = srv.tmp / f"{run}.probe.jsonl"
    export_id = _node_id(p, "PCPOExportLoRA")
    p["100"] = {"class_type": "PCPOLoopProbe", "inputs": {
        "after": [export_id, 0], "log_path": str(log_path), "sleep_s": probe.get("sleep_s", 0.0),
        "fail_on_call": probe.get("fail_on_call", 0), "wait_on_call": probe.get("wait_on_call", 0),
        "ignore_interrupt": probe.get("ignore_interrupt", False)}}
    return p, log_path


def _post(srv, prompt: dict, extra: dict | None = None) -> str:
    extra_data = {"extra_pnginfo": {"workflow": {"from": "the test"}}, "pcpo_test_key": "kept",
                  "api_key_comfy_org": API_KEY}
    extra_data.update(extra or {})
    res = srv.post("/prompt", {"prompt": prompt, "client_id": CLIENT_ID, "extra_data": extra_data})
    assert not res.get("node_errors"), res
    return res["prompt_id"]


def _run_of(entry: dict):
    prompt = entry["prompt"][2]
    for node in prompt.values():
        if node["class_type"] == "PCPOLoRA":
            return node["inputs"]["run_name"]
        if node["class_type"] == "PCPOLoopCounter":
            return node["inputs"]["run"]
    return None


def _wait_idle(srv, run: str, count: int, timeout: float, settle: float = 2.0) -> list:
    """Wait until ``count`` prompts of ``run`` are in the history and the queue is empty, then ``settle``
    seconds more (a late re-queue would show up); returns the run's history entries in queue order."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {srv.proc.returncode}:\n{srv.log_tail()}")
        entries = [h for h in srv.get("/history").values() if _run_of(h) == run]
        queue = srv.get("/queue")
        idle = not queue["queue_running"] and not queue["queue_pending"]
        if len(entries) >= count and idle:
            break
        idle_since = (idle_since or time.monotonic()) if idle and entries else None
        if idle_since is not None and time.monotonic() - idle_since > 5.0:  # the loop stopped early
            raise AssertionError(f"{count} prompts of {run} expected, the queue went idle after "
                                 f"{[_status(h) for h in entries]}:\n{srv.log_tail()}")
        time.sleep(0.25)
    else:
        raise AssertionError(f"{count} prompts of {run} expected within {timeout:.0f} s:\n{srv.log_tail()}")
    time.sleep(settle)
    queue = srv.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"], "a prompt was queued after the loop ended"
    entries = [h for h in srv.get("/history").values() if _run_of(h) == run]
    return sorted(entries, key=lambda h: h["prompt"][0])


def _probe_log(path: pathlib.Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _status(entry: dict) -> tuple[str, list]:
    st = entry.get("status") or {}
    return st.get("status_str"), [m[0] for m in st.get("messages", [])]


def _messages(entry: dict, kind: str) -> list:
    return [m[1] for m in (entry.get("status") or {}).get("messages", []) if m[0] == kind]


def _ckpt_iteration(srv, run: str) -> int:
    ckpt = srv.base / "output" / "pcpo" / run / "checkpoint.safetensors"
    return int(_safetensors_metadata(ckpt)["iteration"])


# --------------------------------------------------------------------------- the loop alone

def test_a_node_loops_through_requeue_with_its_marker(server):
    """nodes/requeue.py without the training nodes: a node re-queues its prompt with a marker item until
    its target; the marker comes back, the submitter's extra_data stays."""
    run = f"counter_{uuid.uuid4().hex[:8]}"
    log_path = server.tmp / f"{run}.jsonl"
    prompt = {"1": {"class_type": "PCPOLoopCounter", "inputs": {"run": run, "target": 4, "log_path": str(log_path)}}}
    _post(server, prompt)
    entries = _wait_idle(server, run, 4, timeout=30, settle=1.0)
    assert len(entries) == 4
    calls = _probe_log(log_path)
    assert [c["count"] for c in calls] == [1, 2, 3, 4]
    assert [c["queued"] for c in calls] == [True, True, True, None]
    assert calls[0]["marker"] is None
    assert [c["marker"] for c in calls[1:]] == [{"run": run, "target": 4, "done": n} for n in (1, 2, 3)]
    for h in entries:
        extra = h["prompt"][3]
        assert (extra["client_id"], extra["pcpo_test_key"]) == (CLIENT_ID, "kept")
        assert extra["extra_pnginfo"]["workflow"] == {"from": "the test"}
        assert _status(h)[0] == "success"


# --------------------------------------------------------------------------- (a), (b)

def test_one_post_runs_three_iterations_with_the_submitters_extra_data(server):
    run = f"loop_{uuid.uuid4().hex[:8]}"
    prompt, probe_log = _prompt(server, run, 3, sleep_s=0.5)
    first_id = _post(server, prompt)
    entries = _wait_idle(server, run, 3, timeout=120)

    assert len(entries) == 3, "one POST must run exactly iterations_per_queue=3 prompts"
    assert entries[0]["prompt"][1] == first_id
    assert _ckpt_iteration(server, run) == 3
    update_id = _node_id(prompt, "PCPOLoRAUpdate")
    assert [h["outputs"][update_id]["text"][0].split(":")[0] for h in entries] == ["iter 1", "iter 2", "iter 3"]
    for i, h in enumerate(entries):
        assert _status(h)[0] == "success", h["status"]
        number, pid, queued, extra, outputs = h["prompt"][:5]
        assert extra["client_id"] == CLIENT_ID, "progress of a re-queued prompt goes to the submitter"
        assert extra["pcpo_test_key"] == "kept"
        assert extra["extra_pnginfo"]["workflow"] == {"from": "the test"}
        assert "api_key_comfy_org" not in extra, "the sensitive part never reaches the history"
        assert set(queued) == set(prompt) and all(set(n) <= {"inputs", "class_type", "_meta"} for n in queued.values())
        marker = extra["extra_pnginfo"].get("pcpo_loop")
        if i == 0:
            assert marker is None
        else:
            # the re-queued prompt carries only the loop's id: its target stays on the server
            assert marker["run"] == run and isinstance(marker.get("loop"), str) and "target" not in marker, marker
            uuid.UUID(pid)  # a canonical UUID, as newer servers require of client ids
            assert str(uuid.UUID(pid)) == pid
            assert number > entries[i - 1]["prompt"][0]

    calls = _probe_log(probe_log)
    assert [c["call"] for c in calls] == [1, 2, 3]
    assert [c["prompt_id"] for c in calls] == [h["prompt"][1] for h in entries]
    assert all(c["api_key"] == API_KEY for c in calls), "the submitter's sensitive extra_data is kept"
    assert [c["marker"] and sorted(c["marker"]) for c in calls] == [None, ["loop", "run"], ["loop", "run"]]

    # (b) each re-queue is made after the previous prompt ran to its end: its Export wrote the LoRA and
    # the probe after the Export (which sleeps 0.5 s) finished before the next prompt was queued
    for prev, nxt, h_prev, h_next in zip(calls, calls[1:], entries, entries[1:]):
        queued_ms = h_next["prompt"][3]["create_time"]
        assert queued_ms >= prev["end"] * 1000 - 1, (queued_ms, prev)
        assert queued_ms >= prev["export_mtime"] * 1000 - 1
        done_ms = _messages(h_prev, "execution_success")[0]["timestamp"]
        assert queued_ms >= done_ms - 1, "re-queued before the previous prompt finished"
        assert nxt["export_mtime"] > prev["export_mtime"]


# --------------------------------------------------------------------------- (c)

@pytest.mark.parametrize("where", ["export", "probe"])
def test_a_node_error_after_the_update_ends_the_loop(server, where):
    run = f"loop_err_{where}_{uuid.uuid4().hex[:8]}"
    prompt, probe_log = _prompt(server, run, 3, fail_on_call=2 if where == "probe" else 0)
    if where == "export":  # a file where the export's folder must go: the export fails in iteration 1
        blocker = server.base / "models" / "loras" / f"block_{run}"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a folder")
        prompt[_node_id(prompt, "PCPOExportLoRA")]["inputs"]["filename"] = f"block_{run}/{run}"
    _post(server, prompt)
    expected = 1 if where == "export" else 2
    entries = _wait_idle(server, run, expected, timeout=90)

    assert len(entries) == expected, [_status(h) for h in entries]
    status, kinds = _status(entries[-1])
    assert status == "error" and "execution_error" in kinds
    failed = _messages(entries[-1], "execution_error")[0]["node_type"]
    assert failed == ("PCPOExportLoRA" if where == "export" else "PCPOLoopProbe")
    assert all(_status(h)[0] == "success" for h in entries[:-1])
    assert _ckpt_iteration(server, run) == expected, "the update ran, only the loop stopped"
    assert len(_probe_log(probe_log)) == expected - (1 if where == "export" else 0)


# --------------------------------------------------------------------------- (d)

@pytest.mark.parametrize("ignore_interrupt", [False, True], ids=["node_stops", "node_ignores"])
def test_cancel_during_an_iteration_ends_the_loop(server, ignore_interrupt):
    run = f"loop_cancel_{uuid.uuid4().hex[:8]}"
    prompt, probe_log = _prompt(server, run, 3, wait_on_call=2, ignore_interrupt=ignore_interrupt)
    _post(server, prompt)
    waiting = pathlib.Path(str(probe_log) + ".waiting")
    deadline = time.monotonic() + 90
    while not waiting.exists():
        assert time.monotonic() < deadline, f"iteration 2 never reached the probe:\n{server.log_tail()}"
        assert server.proc.poll() is None, server.log_tail()
        failed = [h for h in server.get("/history").values() if _run_of(h) == run and _status(h)[0] != "success"]
        assert not failed, f"a prompt failed before the probe waited:\n{server.log_tail()}"
        time.sleep(0.2)
    server.post("/interrupt", {})
    entries = _wait_idle(server, run, 2, timeout=60)

    assert len(entries) == 2, "Cancel must end the loop: nothing is queued after the cancelled prompt"
    status, kinds = _status(entries[-1])
    if ignore_interrupt:  # the prompt ran to its end, yet the Cancel during it ends the loop
        assert status == "success", kinds
    else:
        assert status == "error" and "execution_interrupted" in kinds, kinds
    assert _ckpt_iteration(server, run) == 2
    assert len(_probe_log(probe_log)) == (2 if ignore_interrupt else 1)


# --------------------------------------------------------------------------- without a server

def test_no_server_means_no_requeue_and_markers_round_trip(comfy, pcpo):
    loop = pcpo.mod("nodes.requeue")
    assert loop.requeue({"1": {"class_type": "X", "inputs": {}}}, {}, "r", 3, note="x") is False
    info = {"workflow": {}, loop.LOOP_KEY: {"run": "r", "target": 5, "started_at": 2}}
    assert loop.loop_marker(info, "r") == {"run": "r", "target": 5, "started_at": 2}
    assert loop.loop_marker(info, "other") is None and loop.loop_marker(None, "r") is None
    # a marker is what the client sent: without an id the server issued, no loop (the prompt is a press)
    assert loop.find_loop(info, "r", "lin") is None
    own = loop.LOOPS.start("a", "lin", 2)
    two = {loop.LOOP_KEY: loop._marker_info({"a": {"run": "a", "loop": own.id}, "b": {"run": "b", "target": 7}})}
    assert loop.loop_marker(two, "a") == {"run": "a", "loop": own.id}
    assert loop.find_loop(two, "a", "lin") is own and loop.find_loop(two, "b", "lin") is None
    assert loop.find_loop(two, "a", "another lineage") is None
    loop.LOOPS.end(own)


# --------------------------------------------------------------------------- who may continue a run

def test_a_forged_loop_marker_is_a_press(server):
    """A client that sends its own ``pcpo_loop`` marker (a target, a made-up loop id) gets a press of
    iterations_per_queue like any other: the loop's target lives on the server."""
    run = f"forged_{uuid.uuid4().hex[:8]}"
    prompt, _ = _prompt(server, run, 2)
    _post(server, prompt, {"extra_pnginfo": {"workflow": {"from": "the test"},
                                             "pcpo_loop": {"run": run, "target": 1, "loop": "0" * 32}}})
    entries = _wait_idle(server, run, 2, timeout=120)
    assert len(entries) == 2 and all(_status(h)[0] == "success" for h in entries)
    assert _ckpt_iteration(server, run) == 2
    # and a forged target far ahead does not extend the press either
    _post(server, prompt, {"extra_pnginfo": {"workflow": {"from": "the test"},
                                             "pcpo_loop": {"run": run, "target": 50}}})
    entries = _wait_idle(server, run, 4, timeout=120)
    assert len(entries) == 4 and _ckpt_iteration(server, run) == 4


def test_a_second_clients_copy_with_resume_off_cannot_restart_a_live_run(server):
    """Client A presses Run for 3 iterations; while its loop runs, client B queues its own copy of the
    same workflow (same node ids) with resume off.  B's prompt is refused naming the run; A's loop
    goes on and its run reaches iteration 3 with every iteration kept."""
    run = f"shared_{uuid.uuid4().hex[:8]}"
    prompt, _ = _prompt(server, run, 3, sleep_s=1.0)
    _post(server, prompt)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ckpt = server.base / "output" / "pcpo" / run / "checkpoint.safetensors"
        if ckpt.exists():
            break
        time.sleep(0.1)
    copy_b = json.loads(json.dumps(prompt))
    copy_b[_node_id(copy_b, "PCPOLoRA")]["inputs"]["resume"] = False
    res = server.post("/prompt", {"prompt": copy_b, "client_id": "another-client",
                                  "extra_data": {"extra_pnginfo": {"workflow": {"from": "client B"}}}})
    assert not res.get("node_errors"), res
    entries = _wait_idle(server, run, 4, timeout=180)
    b = [h for h in entries if h["prompt"][1] == res["prompt_id"]]
    a = [h for h in entries if h["prompt"][1] != res["prompt_id"]]
    assert len(b) == 1 and _status(b[0])[0] == "error"
    err = " ".join(str(m.get("exception_message", "")) for m in _messages(b[0], "execution_error"))
    assert f"run {run!r} already exists" in err and "resume is off" in err, err
    assert len(a) == 3 and all(_status(h)[0] == "success" for h in a)
    assert _ckpt_iteration(server, run) == 3
    update_id = _node_id(prompt, "PCPOLoRAUpdate")
    assert [h["outputs"][update_id]["text"][0].split(":")[0] for h in a] == ["iter 1", "iter 2", "iter 3"]
