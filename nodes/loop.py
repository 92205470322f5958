"""Looping by re-queueing: after an update the PCPO LoRA Update node puts the same prompt back on
ComfyUI's queue until the run reaches its target iteration.  Each queued prompt is one
sample -> score -> update iteration, so nothing accumulates across iterations (no growing cache),
Cancel stops the loop (an interrupted prompt never re-queues), and re-queueing continues the run.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import uuid

log = logging.getLogger("comfyui-pcpo")
LOOP_KEY = "pcpo_loop"


def loop_target(extra_pnginfo, run_name: str):
    """The target iteration carried by a re-queued prompt, or None for a prompt the user queued."""
    if isinstance(extra_pnginfo, dict):
        info = extra_pnginfo.get(LOOP_KEY)
        if isinstance(info, dict) and info.get("run") == run_name:
            return int(info.get("target", 0))
    return None


def _clean_prompt(prompt: dict) -> dict:
    out = {}
    for nid, node in copy.deepcopy(prompt).items():
        out[nid] = {k: v for k, v in node.items() if k in ("inputs", "class_type", "_meta")}
    return out


def requeue(prompt: dict, extra_pnginfo, run_name: str, target: int) -> bool:
    """Queue ``prompt`` again on the running server.  Returns False when there is no server (e.g. a
    script driving the executor itself), in which case the caller's loop is the driver."""
    try:
        import execution
        import server
    except ImportError:
        return False
    srv = getattr(server.PromptServer, "instance", None)
    queue = getattr(srv, "prompt_queue", None)
    if srv is None or queue is None or not isinstance(prompt, dict):
        return False
    prompt = _clean_prompt(prompt)
    prompt_id = str(uuid.uuid4())
    valid = execution.validate_prompt(prompt_id, prompt, None) if _takes_id() else execution.validate_prompt(prompt)
    if asyncio.iscoroutine(valid):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            valid = asyncio.run(valid)
        else:  # nodes run inside the executor's event loop (0.3.7x): validate on a helper thread
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                valid = pool.submit(asyncio.run, valid).result()
    if not valid[0]:
        log.warning("PCPO: could not re-queue the prompt: %s", valid[1])
        return False
    info = dict(extra_pnginfo) if isinstance(extra_pnginfo, dict) else {}
    info[LOOP_KEY] = {"run": run_name, "target": int(target)}
    extra_data = {"extra_pnginfo": info}
    if getattr(srv, "client_id", None):
        extra_data["client_id"] = srv.client_id
    number = srv.number
    srv.number += 1
    if hasattr(execution, "SENSITIVE_EXTRA_DATA_KEYS"):
        queue.put((number, prompt_id, prompt, extra_data, valid[2], {}))
    else:
        queue.put((number, prompt_id, prompt, extra_data, valid[2]))
    return True


def _takes_id() -> bool:
    import inspect

    import execution
    try:
        return len(inspect.signature(execution.validate_prompt).parameters) >= 3
    except (TypeError, ValueError):
        return False
