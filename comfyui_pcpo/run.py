"""The headless runner: ``python -m comfyui_pcpo.run <workflow_api.json> --comfyui DIR --iterations N``.

Loads the user's ComfyUI as a library with this pack (ComfyUI is imported only inside the functions
here), then executes the API-format workflow once per iteration through ComfyUI's own executor, as
the LoRA Update node's re-queue does in the page: the same nodes, the same run (session,
checkpoint, export).  ``--iterations N`` is the run's target: a run that is resumed from its
checkpoint at iteration k runs N - k more, so the same command continues an interrupted run.

Under ``torchrun --nproc_per_node K`` every process executes the workflow on its own groups and the
LoRA gradients are averaged across processes (``comfyui_pcpo.distributed``); rank 0 writes the
checkpoint and the export and prints progress.  A rank that fails stops the others with its error.

Exit codes: 0 done, 1 error (the message says which node and, with several processes, which
rank), 2 bad arguments or workflow, 130 interrupted (Ctrl-C; the run is saved at its last
completed iteration).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import signal
import sys
import time
from typing import Optional

from . import distributed

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-pcpo"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class WorkflowError(ValueError):
    """A workflow file the runner cannot run (the message says why and what to do)."""


# --------------------------------------------------------------------------- the workflow

def read_workflow(path: str) -> dict:
    """The API-format prompt in ``path`` (node id -> {class_type, inputs})."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise WorkflowError(f"cannot read the workflow {path}: {e}") from e
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"{path} is a UI workflow: export it in API format (ComfyUI menu Workflow > Export "
                            "(API)) or use its twin in workflows/api/")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # the body of a POST /prompt
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs"), dict) for n in data.values()):
        raise WorkflowError(f"{path} is not an API-format ComfyUI workflow (node id -> class_type and inputs)")
    return data


def training_nodes(prompt: dict) -> tuple[str, str, str]:
    """(PCPO LoRA node id, PCPO LoRA Update node id, run name) of the workflow's one run."""
    updates = [nid for nid, n in prompt.items() if n["class_type"] == "PCPOLoRAUpdate"]
    if len(updates) != 1:
        raise WorkflowError(f"the workflow has {len(updates)} PCPO LoRA Update nodes; the runner trains exactly one "
                            "run per workflow")
    link = prompt[updates[0]]["inputs"].get("session")
    if not (isinstance(link, list) and link and str(link[0]) in prompt):
        raise WorkflowError("the PCPO LoRA Update node's session input is not connected")
    lora = str(link[0])
    if prompt[lora]["class_type"] != "PCPOLoRA":
        raise WorkflowError(f"the PCPO LoRA Update's session comes from a {prompt[lora]['class_type']} node, "
                            "not a PCPO LoRA node")
    run = prompt[lora]["inputs"].get("run_name")
    if not isinstance(run, str) or not run:
        raise WorkflowError("the PCPO LoRA node's run_name must be a text value in the workflow")
    return lora, updates[0], run


def checkpoint_iteration(path: str) -> Optional[int]:
    """Iteration stored in a run checkpoint, or None when there is none (or it cannot be read, or
    holds no non-negative whole number: the PCPO LoRA node's load then names the damage)."""
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("iteration", "0")
    except Exception:
        return None
    return int(raw) if isinstance(raw, str) and raw.isascii() and raw.isdigit() else None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(iteration: int, target: int, reward: float, running: float, done: int, elapsed: float,
                  world: int = 1) -> str:
    """One line per iteration: iteration, reward, time per iteration, ETA."""
    per = elapsed / max(done, 1)
    eta = per * max(target - iteration, 0)
    ranks = f" | {world} processes" if world > 1 else ""
    return (f"iteration {iteration}/{target} | reward {reward:.4f} (running mean {running:.4f}) | "
            f"{per:.1f} s/it | ETA {format_duration(eta)}{ranks}")


# --------------------------------------------------------------------------- loading ComfyUI

def comfyui_module(name: str):
    """A module of the ComfyUI that :func:`load_comfyui` put on ``sys.path`` (the host the runner loads
    at run time from ``--comfyui``; never a dependency of the core, hence no import statement)."""
    return importlib.import_module(name)


def host_module():
    """``tools/comfyui_host.py`` of this pack (how the pack loads ComfyUI as a library)."""
    path = PACK_ROOT / "tools" / "comfyui_host.py"
    if not path.is_file():
        raise WorkflowError(f"{path} is missing: run the runner from a clone of the comfyui-pcpo pack")
    mod = sys.modules.get("comfyui_host")
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "")) == str(path):
        return mod
    spec = importlib.util.spec_from_file_location("comfyui_host", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_host"] = mod
    spec.loader.exec_module(mod)
    return mod


def load_comfyui(comfy_dir: str, out: Optional[str], extra_packs: list, all_custom_nodes: bool):
    """Import the ComfyUI at ``comfy_dir`` with its built-in extra nodes and this pack (and the
    packs in ``extra_packs``, or with ``all_custom_nodes`` everything in its custom_nodes folder).
    Returns (host module, the loaded pack's ``nodes.session`` module)."""
    tree = pathlib.Path(comfy_dir).expanduser().resolve()
    if not (tree / "nodes.py").is_file() or not (tree / "comfy").is_dir():
        raise WorkflowError(f"--comfyui {tree} is not a ComfyUI folder (no nodes.py and comfy/ in it)")
    host = host_module()
    host.prepare_import(tree)
    folder_paths, nodes = comfyui_module("folder_paths"), comfyui_module("nodes")
    comfyui_module("execution")
    yaml_path = tree / "extra_model_paths.yaml"
    if yaml_path.is_file():
        try:
            comfyui_module("utils.extra_config").load_extra_path_config(str(yaml_path))
        except Exception as e:  # an old tree without it, or a broken file: say so, go on
            logging.getLogger("comfyui-pcpo").warning("extra_model_paths.yaml not loaded: %s", e)
    if out:
        outp = pathlib.Path(out).expanduser().resolve()
        outp.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(outp))
    host.run_maybe_async(nodes.init_extra_nodes(init_custom_nodes=bool(all_custom_nodes), init_api_nodes=False))
    if "PCPOLoRAUpdate" not in nodes.NODE_CLASS_MAPPINGS:
        if not host.load_pack(PACK_ROOT):
            raise RuntimeError(f"ComfyUI could not load the comfyui-pcpo pack at {PACK_ROOT} (see the log above)")
    for pack in extra_packs:
        if not host.load_pack(pack):
            raise RuntimeError(f"ComfyUI could not load the custom node pack {pack} (see the log above)")
    return host, _session_module(nodes.NODE_CLASS_MAPPINGS["PCPOLoRA"])


def _session_module(lora_class):
    mod = sys.modules.get(lora_class.__module__)
    if mod is None or not hasattr(mod, "SESSIONS"):
        raise RuntimeError("the PCPO LoRA node's module has no run registry")
    return mod


# --------------------------------------------------------------------------- the loop

class _Interrupt:
    """Ctrl-C: the first asks ComfyUI to stop the current iteration (as Cancel does in the page);
    a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if hasattr(signal, "SIGINT"):
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:
            comfyui_module("comfy.model_management").interrupt_current_processing(True)
        except Exception:
            pass


def _say(msg: str, rank: int, file=None, all_ranks: bool = False) -> None:
    if rank == 0 or all_ranks:
        prefix = f"[rank {rank}] " if all_ranks and distributed.active() else ""
        print(prefix + msg, file=file if file is not None else sys.stdout, flush=True)


def run(args) -> int:
    prompt = read_workflow(args.workflow)
    lora_id, update_id, run_name = training_nodes(prompt)
    rank, world = distributed.init_from_env(timeout_s=args.timeout, backend=args.backend)
    logging.basicConfig(level=logging.INFO if args.verbose else (logging.WARNING if rank == 0 else logging.ERROR),
                        format="%(levelname)s %(name)s: %(message)s")
    host, sessions = load_comfyui(args.comfyui, args.out, args.nodes, args.all_custom_nodes)
    if rank == 0:
        host.announce(args.comfyui)
    output = comfyui_module("folder_paths").get_output_directory()
    ckpt = os.path.join(output, "pcpo", run_name, "checkpoint.safetensors")
    resume = bool(prompt[lora_id]["inputs"].get("resume", True))
    if not resume and os.path.exists(ckpt):  # a run on disk is never overwritten (see comfyui_pcpo.lineage)
        from .lineage import refuse_restart
        raise WorkflowError(str(refuse_restart(run_name, os.path.dirname(ckpt), f"its checkpoint {ckpt}")))
    start = (checkpoint_iteration(ckpt) or 0) if resume else 0
    target = int(args.iterations)
    _say(f"run {run_name}: {'resumed at iteration ' + str(start) if start else 'starts at iteration 0'}, target "
         f"{target}; checkpoint {ckpt}" + (f"; {world} processes ({_backend()})" if world > 1 else ""), rank)
    if start >= target:
        _say(f"run {run_name} is already at iteration {start} >= {target}: nothing to do", rank)
        distributed.shutdown()
        return 0
    ok, error, _, node_errors = host.validate_prompt(prompt)
    if not ok or node_errors:  # ComfyUI would run the valid outputs only: refuse instead of dropping nodes
        raise WorkflowError(host._validation_message(prompt, error, node_errors))
    executor = host.new_executor()
    iteration, done, t0 = start, 0, time.monotonic()
    t_last, cpu_last = t0, time.process_time()
    rewards: list = []
    # this command's loop, remembered in-process as a server remembers a press's loop: the prompts
    # carry only its id, and the LoRA Update reads the target from here
    loop = sessions.LOOPS.start(run_name, None, target, start, time.time())
    marker = {"run": run_name, "loop": loop.id}
    with _Interrupt() as stop:
        while iteration < target and not stop.requested:
            peer = distributed.peer_failure() if world > 1 else None
            if peer is not None:  # another rank failed outside a collective: stop here too
                print(f"[rank {rank}] stopped: {peer}", file=sys.stderr, flush=True)
                return EXIT_ERROR
            try:
                res = host.execute_prompt(prompt, executor=executor,
                                          extra_data={"extra_pnginfo": {"pcpo_loop": marker}})
            except KeyboardInterrupt:
                stop.requested = True
                break
            except Exception as e:
                if stop.requested:
                    break
                return _failed(e, rank, world)
            stats = json.loads(res.outputs[update_id][1])
            iteration, done = int(stats["iteration"]), done + 1
            rewards.append(float(stats["reward_mean"]))
            recent = rewards[-10:]
            now = time.monotonic()
            _say(progress_line(iteration, target, rewards[-1], sum(recent) / len(recent), done, now - t0, world),
                 rank)
            if args.timings:
                cpu = time.process_time()
                _log_timing(args.timings if rank == 0 else f"{args.timings}.rank{rank}", iteration, rewards[-1],
                            now - t_last, cpu - cpu_last, world)
                cpu_last = cpu
            t_last = now
    if stop.requested:
        sess = sessions.SESSIONS.get(run_name)
        if sess is not None and sess.state is not None:
            sess.save_if_dirty()
            for k in range(iteration + 1, sess.state.iteration + 1):  # updated, then interrupted before its line
                _say(f"iteration {k}/{target} | its update is applied and saved; the rest of its prompt was "
                     "interrupted", rank)
            iteration = sess.state.iteration
        _say(f"interrupted: run {run_name} saved at iteration {iteration} ({ckpt}); run the same command to "
             "continue", rank, file=sys.stderr)
        distributed.shutdown()
        return EXIT_INTERRUPTED
    _say(f"done: run {run_name} at iteration {iteration}; checkpoint {ckpt}", rank)
    distributed.shutdown()
    return 0


def _log_timing(path: str, iteration: int, reward: float, seconds: float, cpu_seconds: float, world: int) -> None:
    """One JSON line per iteration: wall and CPU seconds of this process, and its seconds in the training
    collectives so far (rank 0 writes FILE, rank r FILE.rank<r>)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"iteration": iteration, "reward_mean": reward, "seconds": seconds,
                            "cpu_seconds": cpu_seconds, "processes": world,
                            "collective_seconds_total": distributed.COLLECTIVE_SECONDS[0]}) + "\n")


def _backend() -> str:
    import torch.distributed as dist
    return str(dist.get_backend())


def _failed(e: Exception, rank: int, world: int) -> int:
    """Report an iteration's error; with several processes, tell the others (or name theirs)."""
    msg = str(e).strip()
    if world > 1:
        peer = distributed.peer_failure()
        if peer is not None:  # another rank failed first: this rank's error is the broken collective
            print(f"[rank {rank}] stopped: {peer}", file=sys.stderr, flush=True)
            return EXIT_ERROR
        distributed.report_failure(f"rank {rank} failed: {msg.splitlines()[0] if msg else type(e).__name__}")
        print(f"[rank {rank}] error: {msg}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m comfyui_pcpo.run",
        description="Run a PCPO training workflow (API format) headless in your ComfyUI, one iteration per "
                    "execution; under torchrun --nproc_per_node K on K processes (one per GPU).")
    ap.add_argument("workflow", help="the workflow in API format (ComfyUI: Workflow > Export (API)); e.g. "
                                     "workflows/api/pcpo_sd15_jpeg_compressibility.json")
    ap.add_argument("--comfyui", required=True, help="your ComfyUI folder (models are read from its models/)")
    ap.add_argument("--iterations", type=int, required=True,
                    help="train until the run has this many iterations (a resumed run continues to it)")
    ap.add_argument("--out", default=None, help="ComfyUI output folder for this run (default: ComfyUI's output/); "
                                                "the run checkpoint is <out>/pcpo/<run name>/checkpoint.safetensors")
    ap.add_argument("--nodes", action="append", default=[], metavar="PATH",
                    help="also load this custom node pack (folder or .py); repeatable")
    ap.add_argument("--all-custom-nodes", action="store_true",
                    help="load every pack in ComfyUI's custom_nodes folder (for workflows that use other packs)")
    ap.add_argument("--timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S,
                    help="several processes: seconds a collective waits for the other ranks before failing "
                         "(default %(default)g)")
    ap.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                    help="several processes: torch.distributed backend (auto: NCCL on GPUs, gloo on CPU)")
    ap.add_argument("--timings", default=None, metavar="FILE",
                    help="append one JSON line per iteration (wall and CPU seconds, seconds in collectives) to FILE "
                         "(other ranks: FILE.rank<r>)")
    ap.add_argument("--verbose", action="store_true", help="ComfyUI's and the pack's info log")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.iterations < 1:
        print("error: --iterations must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(args)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # outside an iteration (loading ComfyUI or the pack): tell the other ranks too
        if distributed.active():
            rank = distributed.context()[0]
            distributed.report_failure(f"rank {rank} failed: {type(e).__name__}: {e}")
        raise


if __name__ == "__main__":  # python -m comfyui_pcpo.run <workflow_api.json> --comfyui DIR --iterations N
    sys.exit(main())
