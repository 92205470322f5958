"""Looping by re-queueing: after an update the PCPO LoRA Update node asks for the same prompt to be put
back on ComfyUI's queue until the run reaches its target iteration.  Each queued prompt is one
sample -> score -> update -> export iteration, so nothing accumulates across iterations (no growing
cache), and re-queueing continues the run.

The re-queue is not made from the node: ``requeue`` schedules a coroutine on the server's own event
loop which waits until the whole current prompt has finished (the nodes after the update, e.g. the
export, included) and queues the next one only if that prompt succeeded.  A node error anywhere in
the graph, or Cancel (an interrupt) at any time during the prompt, ends the loop.  The new prompt is
queued the way POST /prompt queues one (queue number taken on the server loop, prompt validated
there) and carries the submitter's whole ``extra_data`` (client id included, so progress goes to the
client that pressed Queue) and its sensitive part.

What a loop is lives on the server, not in the prompt: ``LOOPS`` (``comfyui_pcpo.lineage``) remembers
each loop's run, lineage and target iteration when the user's press starts it, and the re-queued
prompts carry only the loop's id in their marker; a marker with an unknown or forged id is a press.
"""
from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import threading
import time
import uuid

from comfyui_pcpo.lineage import LoopRegistry

log = logging.getLogger("comfyui-pcpo")
LOOP_KEY = "pcpo_loop"
LOOPS = LoopRegistry()  # the loops this process started (a re-queued prompt carries only the id)

POLL_FIRST_S = 0.05   # first poll of the prompt queue's state; grows by half each time...
POLL_MAX_S = 0.5      # ...up to this
MAX_WAIT_S = 24 * 3600.0  # a prompt still running after this long ends the loop
LOST_GRACE_S = 30.0   # a prompt neither running nor in the history this long (history cleared) ends it

_lock = threading.Lock()
_pending: dict[str, dict] = {}  # prompt id -> what to queue once it has finished


# --------------------------------------------------------------------------- the loop marker

def loop_marker(extra_pnginfo, run_name: str):
    """The loop marker of ``run_name`` carried by a prompt (``run`` and whatever keyword items were
    given to ``requeue``), or None.  It is what the client sent: only an id looked up on the server
    (``LOOPS``) says that the prompt continues a loop."""
    if not isinstance(extra_pnginfo, dict):
        return None
    info = extra_pnginfo.get(LOOP_KEY)
    if not isinstance(info, dict):
        return None
    if info.get("run") == run_name:
        return {k: v for k, v in info.items() if k != "runs"}
    runs = info.get("runs")
    if isinstance(runs, dict) and isinstance(runs.get(run_name), dict):
        return dict(runs[run_name])
    return None


def find_loop(extra_pnginfo, run_name: str, lineage):
    """The server's loop of ``run_name`` (and of its ``lineage``) that this prompt continues, or None:
    a press (no marker, or one whose id this server did not issue for this run and lineage)."""
    return LOOPS.lookup(loop_marker(extra_pnginfo, run_name), run_name, lineage)


def _marker_info(markers: dict) -> dict:
    """``extra_pnginfo[LOOP_KEY]`` for the runs to continue: the first run's marker at the top level
    (the common case of one run per graph), every run's under ``runs`` when there are several."""
    first = next(iter(markers.values()))
    info = dict(first)
    if len(markers) > 1:
        info["runs"] = {name: dict(m) for name, m in markers.items()}
    return info


def _clean_prompt(prompt: dict) -> dict:
    out = {}
    for nid, node in copy.deepcopy(prompt).items():
        out[nid] = {k: v for k, v in node.items() if k in ("inputs", "class_type", "_meta")}
    return out


# --------------------------------------------------------------------------- host lookups

def _server():
    try:
        import server
    except ImportError:
        return None
    srv = getattr(getattr(server, "PromptServer", None), "instance", None)
    if srv is None or getattr(srv, "prompt_queue", None) is None:
        return None
    return srv


def _current_prompt_id(srv):
    """The id of the prompt whose node is calling: the executing context (ComfyUI >= 0.3.4x), else the
    server's ``last_prompt_id`` (set by the prompt worker before it runs a prompt)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        ctx = None
    else:
        ctx = get_executing_context()
    pid = getattr(ctx, "prompt_id", None)
    return pid or getattr(srv, "last_prompt_id", None)


def _running_item(queue, prompt_id):
    """The prompt queue's item (number, id, prompt, extra_data, outputs[, sensitive]) for a running
    prompt, or None."""
    running = getattr(queue, "currently_running", None)
    if not isinstance(running, dict):
        return None
    mutex = getattr(queue, "mutex", None) or threading.RLock()
    with mutex:
        for item in running.values():
            if len(item) > 1 and item[1] == prompt_id:
                return item
    return None


def _interrupted() -> bool:
    try:
        import comfy.model_management as mm
        return bool(mm.processing_interrupted())
    except Exception:  # noqa: BLE001 - no host flag: nothing to observe
        return False


def _takes_id() -> bool:
    import execution
    try:
        return len(inspect.signature(execution.validate_prompt).parameters) >= 3
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- the API

def requeue(prompt: dict, extra_pnginfo, run_name: str, target=None, on_cancel: dict | None = None,
            **marker) -> bool:
    """Ask for ``prompt`` to be queued again once the current prompt has finished successfully.

    The loop marker ``{"run": run_name, **marker}`` (and ``"target"`` when given) travels in the new
    prompt's ``extra_pnginfo[LOOP_KEY]`` (read it back with ``loop_marker``).  ``on_cancel``
    (JSON) is sent to the page as a ``pcpo.loop_stopped`` message (``{"run": run_name, **on_cancel}``)
    when a Cancel ends the loop after this prompt's update (the page hears no interrupt of its own
    when the prompt itself finished).  Returns False when there is no running server (a script
    driving the executor itself is its own loop), True when the re-queue was scheduled; whether it
    happens is decided when the prompt ends (success only)."""
    srv = _server()
    if srv is None or not isinstance(prompt, dict):
        return False
    loop = getattr(srv, "loop", None)
    if loop is None or loop.is_closed() or not loop.is_running():
        return False
    prompt_id = _current_prompt_id(srv)
    if not prompt_id:
        log.warning("PCPO: cannot tell which prompt is running; not re-queueing (queue again to continue)")
        return False
    mark = {**marker, "run": run_name}
    if target is not None:
        mark["target"] = int(target)
    with _lock:
        entry = _pending.get(prompt_id)
        if entry is not None:  # a second run in the same graph: one re-queue carries both markers
            entry["markers"][run_name] = mark
            if on_cancel is not None:
                entry["on_cancel"][run_name] = on_cancel
            return True
        item = _running_item(srv.prompt_queue, prompt_id)
        entry = {
            "prompt": _clean_prompt(prompt),
            "extra_pnginfo": copy.deepcopy(extra_pnginfo) if isinstance(extra_pnginfo, dict) else {},
            "item": None if item is None else (copy.deepcopy(item[3]),
                                               copy.deepcopy(item[5]) if len(item) > 5 else None),
            "markers": {run_name: mark},
            "on_cancel": {} if on_cancel is None else {run_name: on_cancel},
        }
        _pending[prompt_id] = entry
    try:
        fut = asyncio.run_coroutine_threadsafe(_requeue_when_done(srv, prompt_id), loop)
    except RuntimeError:  # the loop closed meanwhile
        with _lock:
            _pending.pop(prompt_id, None)
        return False
    fut.add_done_callback(_log_failure)
    return True


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("PCPO: re-queueing failed; the loop stopped", exc_info=fut.exception())


async def wait_finished(srv, prompt_id: str, max_wait_s: float = MAX_WAIT_S,
                        lost_grace_s: float = LOST_GRACE_S):
    """Wait (on the server loop, polling the prompt queue with a growing interval) until ``prompt_id``
    has left the queue.  Returns ``(ok, why)``: ok only for a prompt that finished successfully with no
    node error and no interrupt seen while it ran."""
    queue = srv.prompt_queue
    start = time.monotonic()
    lost_since = None
    delay = POLL_FIRST_S
    while True:
        # read the interrupt flag first: each prompt clears it when it starts, so a set flag read while
        # this prompt is still running (or has only just finished) is a Cancel during it
        if _interrupted():
            return False, "interrupted"
        with queue.mutex:
            done = queue.history.get(prompt_id)
            running = any(len(it) > 1 and it[1] == prompt_id for it in queue.currently_running.values())
            pending = any(len(it) > 1 and it[1] == prompt_id for it in queue.queue)
        if done is not None:
            return _succeeded(done)
        now = time.monotonic()
        if running or pending:
            lost_since = None
        elif lost_since is None:
            lost_since = now
        elif now - lost_since > lost_grace_s:
            return False, "the prompt left the queue without a history entry"
        if now - start > max_wait_s:
            return False, f"the prompt was still running after {max_wait_s:.0f} s"
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, POLL_MAX_S)


def _succeeded(history_entry: dict):
    status = history_entry.get("status") or {}
    kinds = [m[0] for m in status.get("messages") or [] if isinstance(m, (list, tuple)) and m]
    if "execution_interrupted" in kinds:
        return False, "interrupted"
    if "execution_error" in kinds:
        return False, "a node failed"
    if status.get("status_str") != "success":
        return False, f"status {status.get('status_str')!r}"
    if "execution_start" in kinds and "execution_success" not in kinds:  # stopped early without a message
        return False, "the prompt did not run to its end"
    return True, "success"


async def _requeue_when_done(srv, prompt_id: str) -> None:
    try:
        ok, why = await wait_finished(srv, prompt_id)
    finally:
        with _lock:
            entry = _pending.pop(prompt_id, None)
    if entry is None:
        return
    runs = ", ".join(entry["markers"])
    if not ok:
        log.info("PCPO %s: loop stopped (%s)", runs, why)
        await _checkpoint_stopped(srv, entry)
        if why == "interrupted":
            _tell_cancelled(srv, entry)
        return
    if _interrupted():  # a Cancel right after the prompt ended
        log.info("PCPO %s: loop stopped (interrupted)", runs)
        await _checkpoint_stopped(srv, entry)
        _tell_cancelled(srv, entry)
        return
    await _queue(srv, prompt_id, entry)


async def _checkpoint_stopped(srv, entry: dict) -> None:
    """A loop that stops checkpoints its runs: a Cancel that lands after the update, in a later node
    (export, held-out evaluation), left the completed iteration's commit to that node.  Only while no
    prompt runs (the next one may be training the same run), in a worker thread (not on the loop)."""
    from . import session as session_mod
    queue = srv.prompt_queue
    with queue.mutex:
        if queue.currently_running:
            return
    for run in entry["markers"]:
        sess = session_mod.SESSIONS.get(run)
        if sess is not None and getattr(sess, "state", None) is not None:
            try:
                if await asyncio.to_thread(sess.save_if_dirty):
                    log.info("PCPO %s: checkpointed at iteration %d after the loop stopped", run,
                             sess.state.iteration)
            except Exception:
                log.exception("PCPO %s: the checkpoint after the loop stopped failed", run)


def _tell_cancelled(srv, entry: dict) -> None:
    """Send each run's ``on_cancel`` message to the page that pressed Run (every page when the
    prompt carried no client id); a server without ``send_sync`` gets nothing."""
    send = getattr(srv, "send_sync", None)
    if send is None or not entry.get("on_cancel"):
        return
    extra = entry["item"][0] if entry.get("item") is not None else {}
    sid = extra.get("client_id") if isinstance(extra, dict) else None
    for run, message in entry["on_cancel"].items():
        try:
            send("pcpo.loop_stopped", {**message, "run": run}, sid)
        except Exception:  # noqa: BLE001 - a page that cannot be told still has the log line
            log.debug("PCPO %s: could not tell the page that the loop stopped", run, exc_info=True)


async def _queue(srv, prompt_id: str, entry: dict):
    """Queue the next prompt like POST /prompt does; returns its id, or None when it did not validate."""
    import execution

    queue = srv.prompt_queue
    if entry["item"] is not None:
        extra_data, sensitive = entry["item"]
    else:  # not found while running: the finished item (its sensitive part is not kept in the history)
        with queue.mutex:
            done = queue.history.get(prompt_id) or {}
        item = done.get("prompt") or ()
        extra_data = copy.deepcopy(item[3]) if len(item) > 3 and isinstance(item[3], dict) else {}
        sensitive = {} if hasattr(execution, "SENSITIVE_EXTRA_DATA_KEYS") else None
    extra_data = copy.deepcopy(extra_data)
    sensitive = copy.deepcopy(sensitive)
    info = dict(entry["extra_pnginfo"])
    info[LOOP_KEY] = _marker_info(entry["markers"])
    extra_data["extra_pnginfo"] = info

    prompt = copy.deepcopy(entry["prompt"])
    new_id = str(uuid.uuid4())
    valid = execution.validate_prompt(new_id, prompt, None) if _takes_id() else execution.validate_prompt(prompt)
    if inspect.isawaitable(valid):
        valid = await valid
    runs = ", ".join(entry["markers"])
    if not valid[0]:
        log.warning("PCPO %s: could not re-queue the prompt: %s", runs, valid[1])
        return None
    if "create_time" in extra_data:  # the server stamps every item it queues (job listing)
        extra_data["create_time"] = int(time.time() * 1000)
    number = srv.number  # taken and advanced on the server loop, as POST /prompt does
    srv.number += 1
    if sensitive is not None:
        queue.put((number, new_id, prompt, extra_data, valid[2], sensitive))
    else:
        queue.put((number, new_id, prompt, extra_data, valid[2]))
    log.info("PCPO %s: re-queued as prompt %s", runs, new_id)
    return new_id
