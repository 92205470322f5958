"""Server routes of the rating panel, registered on ``PromptServer.instance.routes`` when the pack loads.

    GET  /pcpo/ratings/pending                       pending requests (ids, prompts, image ids; no paths)
    GET  /pcpo/ratings/image/{request_id}/{image_id} one image of a pending request (PNG from memory)
    POST /pcpo/ratings/submit   {"request_id", "ratings": {group: {"best","worst"} | {"scores"}}}
    POST /pcpo/ratings/cancel   {"request_id"}        cancels the run waiting on it

A 200 to a submission means the waiting run uses that rating; a request that timed out, was
cancelled, answered, or given up by its run is answered 409 ``{"error", "state", "used": false}``.

Only the request ids this process issued are accepted, every field is validated
(``comfyui_pcpo.ratings.validate_submission``), and anything else is answered with a 4xx.  Nothing a
client sends is used to build a file path: images are served from the request's own memory.
"""
from __future__ import annotations

import logging

from comfyui_pcpo import ratings as H

log = logging.getLogger("comfyui-pcpo")
REGISTRY = H.REGISTRY
_registered = False


def _server():
    try:
        from server import PromptServer
    except Exception:  # imported outside a ComfyUI server (headless executor, tests)
        return None
    return getattr(PromptServer, "instance", None)


def issue(req: H.RatingRequest) -> None:
    REGISTRY.add(req)
    srv = _server()
    if srv is not None:
        try:
            srv.send_sync("pcpo.rating_request", req.public())
        except Exception:  # the page also polls /pcpo/ratings/pending
            log.debug("PCPO: could not announce the rating request", exc_info=True)


def retire(req: H.RatingRequest) -> None:
    REGISTRY.remove(req.request_id)
    srv = _server()
    if srv is not None:
        try:
            srv.send_sync("pcpo.rating_done", {"request_id": req.request_id})
        except Exception:
            pass


def register(routes) -> None:
    from aiohttp import web

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    def closed(e: H.RequestClosed):  # the request is no longer open: nothing sent is used
        return web.json_response({"error": str(e), "state": e.state, "used": False}, status=409)

    async def read_json(request):
        if request.content_type != "application/json":
            return None, error(415, "send application/json")
        if request.content_length is None or request.content_length > H.MAX_BODY_BYTES:
            return None, error(413, f"the body must be at most {H.MAX_BODY_BYTES} bytes, with a Content-Length")
        raw = await request.read()
        if len(raw) > H.MAX_BODY_BYTES:
            return None, error(413, "body too large")
        try:
            return H.parse_body(raw), None
        except H.RatingError as e:
            return None, error(400, str(e))

    @routes.get("/pcpo/ratings/pending")
    async def pending(request):
        return web.json_response({"pending": [r.public() for r in REGISTRY.pending()]},
                                 headers={"Cache-Control": "no-store"})

    @routes.get("/pcpo/ratings/image/{request_id}/{image_id}")
    async def image(request):
        req = REGISTRY.get(request.match_info["request_id"])
        iid = request.match_info["image_id"]
        if req is None or not H.IMAGE_ID_RE.fullmatch(iid) or iid not in req.images:
            return error(404, "no such image in a pending rating request")
        return web.Response(body=req.images[iid], content_type="image/png",
                            headers={"Cache-Control": "no-store"})

    @routes.post("/pcpo/ratings/submit")
    async def submit(request):
        payload, err = await read_json(request)
        if err is not None:
            return err
        if not isinstance(payload, dict) or not isinstance(payload.get("request_id"), str):
            return error(400, "send a JSON object {\"request_id\": \"the request's id\", \"ratings\": {...}}")
        try:
            req = REGISTRY.submit(payload)
        except H.RequestClosed as e:
            return closed(e)
        except LookupError as e:
            return error(404, str(e))
        except H.RatingError as e:
            return error(400, str(e))
        return web.json_response({"ok": True, "used": True, "request_id": req.request_id,
                                  "rated_groups": sorted(req.result)})

    @routes.post("/pcpo/ratings/cancel")
    async def cancel(request):
        payload, err = await read_json(request)
        if err is not None:
            return err
        if not isinstance(payload, dict) or set(payload) != {"request_id"} or not isinstance(payload["request_id"], str):
            return error(400, "send exactly {\"request_id\": \"the request's id\"}")
        try:
            req = REGISTRY.cancel(payload["request_id"])
        except H.RequestClosed as e:
            return closed(e)
        except LookupError as e:
            return error(404, str(e))
        return web.json_response({"ok": True, "request_id": req.request_id})


def register_with_server() -> bool:
    """Add the routes to the running ComfyUI server once (a no-op without one)."""
    global _registered
    if _registered:
        return True
    srv = _server()
    if srv is None or getattr(srv, "routes", None) is None:
        return False
    register(srv.routes)
    _registered = True
    return True


register_with_server()
