"""The shipped workflows (workflows/*.json, workflows/api/*.json, made by tools/build_workflows.py).

* the files are what the generator makes, every UI workflow is well formed (registered node types,
  consistent links and slot types, widget value counts including control_after_generate) and converts
  to exactly the shipped API prompt;
* every API workflow, with its loaders swapped for the tiny stand-ins of tests/tiny_pack and shrunk
  for a CPU, runs end to end through ComfyUI's PromptExecutor twice with one executor (like two
  queued prompts), and the second prompt continues the same run;
* a real ComfyUI server (main.py in a subprocess) given the SD1.5 prompt ONCE with
  iterations_per_queue=3 runs 3 iterations by itself, and a second POST continues the run to 4.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKFLOWS = REPO_ROOT / "workflows"
TINY_PACK = TESTS_DIR / "tiny_pack"

# shipped workflow -> tiny model family used to run it
FAMILY = {
    "pcpo_sd15_jpeg_compressibility": "sd15",
    "pcpo_sdxl_jpeg_compressibility": "sdxl",
    "pcpo_flux_dev_jpeg_compressibility": "flux",
    "demo_tiny_pcpo": "demo",
    "pcpo_sd15_aesthetic": "sd15",
    "pcpo_sdxl_pickscore": "sdxl",
    "pcpo_flux_dev_hps_ocr": "flux",
    "demo_tiny_human_rating": "demo",  # headless: no page to rate on, the unrated rule scores every group
    "demo_tiny_irg": "demo",  # sampling only (no training run): tests/test_irg.py runs it
    "demo_tiny_awm": "demo",
    "demo_tiny_nft": "demo",
}
NAMES = sorted(FAMILY)
TRAINING = [n for n in NAMES if n != "demo_tiny_irg"]
LOADER_STANDINS = {
    "CheckpointLoaderSimple": "PCPOTestCheckpointLoader",
    "UNETLoader": "PCPOTestUNETLoader",
    "CLIPLoader": "PCPOTestCLIPLoader",
    "DualCLIPLoader": "PCPOTestCLIPLoader",
    "VAELoader": "PCPOTestVAELoader",
}
# reward loaders whose weights are not here run as a weight-free reward (OCR's weights ship in its wheel)
REWARD_STANDINS = {"PCPOAestheticReward", "PCPOPickScoreReward", "PCPOHPSReward", "PCPOImageRewardReward",
                   "PCPOCLIPScoreReward"}


def load_tool(script: str):
    """A script of tools/ as a module (once per process)."""
    name = "pcpo_" + script.removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


BW = load_tool("build_workflows.py")


def _read(path: pathlib.Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def host(comfy, pcpo):
    """ComfyUI with our pack and the tiny test pack loaded; returns the node-definition lookup."""
    assert pcpo.ok, "the comfyui-pcpo pack failed to load"
    import nodes
    if "PCPOTestCheckpointLoader" not in nodes.NODE_CLASS_MAPPINGS:
        assert comfy.load_pack(TINY_PACK), "tests/tiny_pack failed to load through ComfyUI's loader"
    return BW.comfy_node_defs()


def _class_of(class_type):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[class_type]


# --------------------------------------------------------------------------- the files

def test_shipped_files_are_what_the_generator_makes(host):
    files = BW.render_all(host)
    other_host = BW.host_version() != BW.GENERATED_WITH  # then compared up to host-version metadata
    for rel, text in files.items():
        assert (REPO_ROOT / rel).is_file(), f"{rel} is missing: run `python tools/build_workflows.py`"
        shipped = (REPO_ROOT / rel).read_text(encoding="utf-8")
        assert shipped == text or (other_host and BW.same_workflow(json.loads(shipped), json.loads(text))), \
            f"{rel} is stale: run `python tools/build_workflows.py`"
    assert {f"workflows/{n}.json" for n in NAMES} | {f"workflows/api/{n}.json" for n in NAMES} == set(files)
    readme = (WORKFLOWS / "README.md").read_text(encoding="utf-8")
    for n in NAMES:
        assert f"{n}.json" in readme, f"workflows/README.md does not describe {n}"


def test_every_template_has_its_generated_thumbnail():
    """ComfyUI's template browser shows workflows/<name>.jpg as the card of workflows/<name>.json: one
    per UI workflow, the generator's picture (the same up to JPEG encoding), and nothing else."""
    from PIL import Image
    images = BW.render_images()
    assert {f"workflows/{n}.jpg" for n in NAMES} | {BW.ICON_PATH} == set(images)
    for rel, img in images.items():
        path = REPO_ROOT / rel
        assert path.is_file() and BW.same_image(path, img), f"{rel} is stale: run `python tools/build_workflows.py`"
        with Image.open(path) as im:
            assert im.format == ("JPEG" if rel.endswith(".jpg") else "PNG")
    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == {p.stem for p in WORKFLOWS.glob("*.json")}
    # the check can fail: another picture is not the same
    other = images[f"workflows/{NAMES[0]}.jpg"].transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    assert not BW.same_image(REPO_ROOT / f"workflows/{NAMES[0]}.jpg", other)


def test_demo_cards_show_the_real_render_and_the_others_what_they_need():
    wfs = {m().name: m() for m in BW.WORKFLOWS}
    assert BW.DEMO_RENDER.is_file()  # cut from tools/run_demo.py's before/after grid
    assert BW.files_needed(wfs["demo_tiny_pcpo"]) == []
    assert "pcpo_rewards/PickScore_v1" in BW.files_needed(wfs["pcpo_sdxl_pickscore"])
    assert "HPS_v2.1_compressed.pt" in BW.files_needed(wfs["pcpo_flux_dev_hps_ocr"])
    demo = BW.thumbnail(wfs["demo_tiny_pcpo"]).convert("RGB")
    card = BW.thumbnail(wfs["pcpo_sd15_aesthetic"]).convert("RGB")
    # the render fills the demo card's top; a card without one is flat there
    def colours(im):
        return len({im.getpixel((x, y)) for x in range(0, im.width, 2) for y in range(0, im.height, 2)})
    assert colours(demo.crop((0, 0, 512, 200))) > 500 > colours(card.crop((0, 70, 512, 200)))
    # the awm / nft demos did not make that render: their cards show none
    awm = BW.thumbnail(wfs["demo_tiny_awm"]).convert("RGB")
    assert colours(awm.crop((0, 70, 512, 200))) < 500


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_well_formed(host, name):
    wf = _read(WORKFLOWS / f"{name}.json")
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf
    nodes_by_id = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes_by_id) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] == max(nodes_by_id)
    assert wf["last_link_id"] == max((ln[0] for ln in wf["links"]), default=0)
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(wf["nodes"])))
    links = {}
    for ln in wf["links"]:
        assert len(ln) == 6 and ln[0] not in links, ln
        links[ln[0]] = ln
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in n, f"node {n.get('id')} lacks {key}"
        if n["type"] in BW.FRONTEND_ONLY:  # a note: no sockets, its text is its only value
            assert n["inputs"] == [] and n["outputs"] == [] and len(n["widgets_values"]) == 1
            continue
        import nodes
        assert n["type"] in nodes.NODE_CLASS_MAPPINGS, f"node type {n['type']} is not registered"
        assert n["properties"]["Node name for S&R"] == n["type"]
        nd = host(n["type"])
        cls = _class_of(n["type"])
        # sockets: every UI input is a socket input of the class with the same type, in order
        assert [i["name"] for i in n["inputs"]] == [s.name for s in nd.sockets]
        for slot, inp in enumerate(n["inputs"]):
            spec = nd.sockets[slot]
            assert inp["type"] == spec.type
            if inp["link"] is None:
                assert spec.optional, f"required input {n['type']}.{spec.name} is not connected"
                continue
            lid, origin, oslot, target, tslot, typ = links[inp["link"]]
            assert (target, tslot) == (n["id"], slot)
            assert typ == spec.type
            src = nodes_by_id[origin]
            assert oslot < len(src["outputs"]) and src["outputs"][oslot]["type"] == typ
            assert lid in src["outputs"][oslot]["links"]
        # outputs: types and names as the class declares them (a newer ComfyUI than the files were
        # generated with may add outputs to a core node, e.g. PreviewImage's pass-through in 0.33)
        if n["type"].startswith("PCPO") or BW.host_version() == BW.GENERATED_WITH:
            assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)
        else:
            assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)[:len(n["outputs"])]
        for slot, out in enumerate(n["outputs"]):
            assert out["slot_index"] == slot
            for lid in out["links"] or []:
                assert links[lid][1:3] == [n["id"], slot]
        # widget values: one per widget input (+ control_after_generate), in INPUT_TYPES order
        assert len(n["widgets_values"]) == nd.widget_value_count(), n["type"]
        it = iter(n["widgets_values"])
        for w in nd.widgets:
            v = next(it)
            if w.type == "INT":
                assert isinstance(v, int) and not isinstance(v, bool), (n["type"], w.name, v)
            elif w.type == "FLOAT":
                assert isinstance(v, (int, float)) and not isinstance(v, bool), (n["type"], w.name, v)
            elif w.type == "BOOLEAN":
                assert isinstance(v, bool), (n["type"], w.name, v)
            elif w.type == "STRING":
                assert isinstance(v, str), (n["type"], w.name, v)
            if w.choices is not None and (n["type"], w.name) in BW._CHECK_COMBOS:  # not file lists
                assert v in w.choices, (n["type"], w.name, v)
            for _ in range(w.control_values):
                assert next(it) in ("fixed", "increment", "decrement", "randomize", "")
            if "min" in w.options and w.type in ("INT", "FLOAT"):
                assert w.options["min"] <= v <= w.options.get("max", v), (n["type"], w.name, v)
    # every link connects existing nodes and is listed on both ends
    for lid, origin, oslot, target, tslot, typ in wf["links"]:
        assert nodes_by_id[target]["inputs"][tslot]["link"] == lid
        assert lid in nodes_by_id[origin]["outputs"][oslot]["links"]
    # the seeds the sampler and the session derive everything from stay fixed between queues
    for n in wf["nodes"]:
        if n["type"] in ("PCPOLoRA", "PCPOPrompts", "PCPOTrajectorySampler"):
            flat = []  # widget names as laid out in widgets_values
            for w in host(n["type"]).widgets:
                flat.append(w.name)
                flat.extend(["<control>"] * w.control_values)
            assert n["widgets_values"][flat.index("seed") + 1] == "fixed", n["type"]


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_the_shipped_api_prompt(host, name):
    ui = _read(WORKFLOWS / f"{name}.json")
    api = _read(WORKFLOWS / "api" / f"{name}.json")
    assert BW.same_workflow(BW.ui_to_api(ui, host), api)  # exact on GENERATED_WITH
    # the API prompt passes ComfyUI's validation once the model files are swapped for stand-ins
    import comfy_harness
    ok, err, outputs, node_errors = comfy_harness.validate_prompt(shrink(api, FAMILY[name], "validate_only"))
    assert ok, (err, node_errors)
    ids = {nid for nid, node in api.items() if node["class_type"] in ("PCPOLoRAUpdate", "PCPOExportLoRA",
                                                                     "PreviewImage")}
    assert ids <= set(outputs)


def test_loader_stand_ins_match_the_real_loaders(host):
    for real, standin in LOADER_STANDINS.items():
        assert _class_of(standin).RETURN_TYPES == _class_of(real).RETURN_TYPES, real


# --------------------------------------------------------------------------- running them

def shrink(api: dict, family: str, run_name: str, iterations_per_queue: int = 1) -> dict:
    """A CPU-sized copy: tiny stand-in loaders, 64x64 px, 3 steps, groups of 2, a unique run."""
    p = copy.deepcopy(api)
    for node in p.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct in LOADER_STANDINS:
            node["class_type"], node["inputs"] = LOADER_STANDINS[ct], {"family": family}
        elif ct in REWARD_STANDINS:
            node["class_type"], node["inputs"] = "PCPOBuiltinReward", {"reward": "brightness"}
        elif ct == "PCPOLoRA":
            inp["run_name"] = run_name
        elif ct == "PCPOPrompts":
            inp["prompts_per_iteration"] = min(int(inp["prompts_per_iteration"]), 2)
        elif ct == "PCPOTrajectorySampler":
            size = 32 if family == "demo" else 64  # the demo model is a 32x32 pixel-space model
            inp.update(steps=3, width=size, height=size, group_size=2)
        elif ct == "PCPOLoRAUpdate":
            inp.update(micro_batch=2, iterations_per_queue=iterations_per_queue)
        elif ct == "PCPOExportLoRA":
            inp["filename"] = f"pcpo_test/{run_name}"
        elif ct == "PCPOHeldOutEvaluation":
            inp.update(steps=3, samples_per_prompt=1)
    return p


def _node_id(api: dict, class_type: str) -> str:
    ids = [nid for nid, node in api.items() if node["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def _safetensors_metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


@pytest.mark.parametrize("name", TRAINING)
def test_workflow_runs_end_to_end_and_the_second_queue_continues_the_run(host, comfy, pcpo, comfy_dirs, name):
    api = _read(WORKFLOWS / "api" / f"{name}.json")
    ui = _read(WORKFLOWS / f"{name}.json")
    run = f"wf_{FAMILY[name]}_{uuid.uuid4().hex[:8]}"
    prompt = shrink(api, FAMILY[name], run)
    lora_id, update_id = _node_id(prompt, "PCPOLoRA"), _node_id(prompt, "PCPOLoRAUpdate")
    export_id, preview_id = _node_id(prompt, "PCPOExportLoRA"), _node_id(prompt, "PreviewImage")
    executor = comfy.new_executor(fresh=True)  # one executor for both prompts, as in a server
    extra = {"extra_pnginfo": {"workflow": ui}}  # what the frontend sends with a queued prompt

    first = comfy.execute_prompt(prompt, executor=executor, extra_data=copy.deepcopy(extra))
    second = comfy.execute_prompt(prompt, executor=executor, extra_data=copy.deepcopy(extra))

    s1, s2 = (json.loads(r.outputs[update_id][1]) for r in (first, second))
    assert (s1["iteration"], s2["iteration"]) == (1, 2)
    assert (s1["target_iteration"], s2["target_iteration"]) == (1, 2)
    session = first.outputs[lora_id][1]
    assert second.outputs[lora_id][1] is session, "the second prompt must continue the same session object"
    assert pcpo.mod("nodes.session").SESSIONS[run] is session and session.iteration == 2
    assert "iter 2" in second.ui[update_id]["text"][0]
    assert second.ui[preview_id]["images"], "the preview shows the decoded samples"

    ckpt = comfy_dirs["output"] / "pcpo" / run / "checkpoint.safetensors"
    assert ckpt.is_file()
    assert _safetensors_metadata(ckpt)["iteration"] == "2"
    lora = comfy_dirs["loras"] / "pcpo_test" / f"{run}.safetensors"
    assert lora.is_file() and pathlib.Path(second.outputs[export_id][0]).resolve() == lora.resolve()
    assert _safetensors_metadata(lora).get("pcpo_run") == run


# --------------------------------------------------------------------------- a real server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, timeout: float = 10.0):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode() or "null")


class _Server:
    def __init__(self, proc, url, log_path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def get(self, path):
        return _http(self.url + path)

    def post(self, path, data):
        return _http(self.url + path, data)


def _start_server(tmp_path: pathlib.Path, comfy_dir: pathlib.Path) -> _Server:
    base = tmp_path / "comfy_base"
    custom = base / "custom_nodes"
    custom.mkdir(parents=True)
    os.symlink(REPO_ROOT, custom / "comfyui-pcpo", target_is_directory=True)
    os.symlink(TINY_PACK, custom / "pcpo_tiny_pack", target_is_directory=True)
    port = _free_port()
    # ComfyUI's main.py run by tools/comfyui_host.py (torchvision/torchaudio shims first)
    args = [sys.executable, str(REPO_ROOT / "tools" / "comfyui_host.py"), "serve", "--",
            "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PCPO_COMFYUI_NO_INSTALL="1",
               PYTHONUNBUFFERED="1", PCPO_COMFYUI_DIR=str(comfy_dir))
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, cwd=str(comfy_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    log.close()
    return _Server(proc, f"http://127.0.0.1:{port}", log_path)


def _stop(server: _Server) -> None:
    if server.proc.poll() is not None:
        return
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.proc.wait(timeout=15)


def _wait_ready(server: _Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            server.get("/system_stats")
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"ComfyUI did not answer within {timeout:.0f} s:\n{server.log_tail()}")


def _wait_completed(server: _Server, count: int, timeout: float) -> dict:
    """Poll /history until ``count`` prompts completed and the queue is empty; fail on any error."""
    deadline = time.monotonic() + timeout
    history: dict = {}
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {server.proc.returncode}:\n{server.log_tail()}")
        history = server.get("/history")
        for pid, h in history.items():
            st = h.get("status") or {}
            if st.get("status_str") == "error":
                errs = [m for m in st.get("messages", []) if m[0] == "execution_error"]
                detail = errs[0][1] if errs else st
                raise AssertionError(
                    f"prompt {pid} failed: {detail.get('node_type')} {detail.get('exception_type')}: "
                    f"{detail.get('exception_message')}\n{''.join(detail.get('traceback', []))}\n"
                    f"server log:\n{server.log_tail(40)}")
        done = sum(1 for h in history.values() if (h.get("status") or {}).get("completed"))
        queue = server.get("/queue")
        if done >= count and not queue["queue_running"] and not queue["queue_pending"]:
            return history
        time.sleep(0.5)
    raise AssertionError(f"{count} completed prompts expected within {timeout:.0f} s, history has "
                         f"{len(history)}:\n{server.log_tail()}")


def test_server_queue_once_runs_iterations_per_queue_iterations(comfy, tmp_path):
    comfy_dir = pathlib.Path(comfy.load_comfy())
    api = _read(WORKFLOWS / "api" / "pcpo_sd15_jpeg_compressibility.json")
    run = f"server_{uuid.uuid4().hex[:8]}"
    server = _start_server(tmp_path, comfy_dir)
    try:
        _wait_ready(server)
        info = server.get("/object_info/PCPOLoRAUpdate")
        assert "PCPOLoRAUpdate" in info, f"our pack did not load in the server:\n{server.log_tail()}"
        assert "PCPOTestCheckpointLoader" in server.get("/object_info/PCPOTestCheckpointLoader")

        res = server.post("/prompt", {"prompt": shrink(api, "sd15", run, iterations_per_queue=3),
                                      "client_id": "pcpo-test"})
        assert not res.get("node_errors"), res
        history = _wait_completed(server, 3, timeout=150)
        assert len(history) == 3, "one POST must run exactly iterations_per_queue=3 prompts"
        ckpt = tmp_path / "comfy_base" / "output" / "pcpo" / run / "checkpoint.safetensors"
        assert _safetensors_metadata(ckpt)["iteration"] == "3"
        update_id = _node_id(api, "PCPOLoRAUpdate")
        stats = [h["outputs"][update_id]["text"][0] for h in history.values()]
        assert sorted(s.split(":")[0] for s in stats) == ["iter 1", "iter 2", "iter 3"], stats

        res = server.post("/prompt", {"prompt": shrink(api, "sd15", run, iterations_per_queue=1),
                                      "client_id": "pcpo-test"})
        assert not res.get("node_errors"), res
        history = _wait_completed(server, 4, timeout=90)
        assert len(history) == 4
        assert _safetensors_metadata(ckpt)["iteration"] == "4"
        lora = tmp_path / "comfy_base" / "models" / "loras" / "pcpo_test" / f"{run}.safetensors"
        assert lora.is_file()
    finally:
        _stop(server)
