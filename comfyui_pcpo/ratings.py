"""Human ratings as a PCPO reward (no ComfyUI imports).

A rating request shows the rollout's images group by group (a group shares one prompt and one initial
noise).  A person rates a group in one of two modes:

* ``best-worst``: picks the best and the worst image (values +1 / -1, the others 0);
* ``score``: gives every image a score from 1 to 5.

A group the person did not rate is either completed by a model reward or skipped (all its rewards
equal: zero advantage).  ``calibration="rank"`` maps every group's values, human or model, to centred
ranks in [-1, 1] (ties share their mean rank), so human and model groups share one scale; ``"none"``
keeps human values ((score - 3) / 2, or +1/0/-1) and raw model rewards.

Submissions are validated against the request the server issued (:func:`validate_submission`); every
rating is appended, with the images' ids, to ``ratings.jsonl`` in the run folder.  A rating is
recorded before the update that trains on it; the run checkpoint commits the id of the request each
iteration trained on, and after that commit a *trained mark* (:func:`trained_mark`) naming it is
appended.  An iteration that was rated again (after a crash, or after its update failed) leaves
several records of the same iteration: the marked one is the one the run trained on
(:func:`trained_ratings`); the others were not used.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field


MODES = ("best-worst", "score")
CALIBRATIONS = ("rank", "none")
SCORE_MIN, SCORE_MAX = 1, 5
MAX_BODY_BYTES = 64 * 1024
REQUEST_ID_RE = re.compile(r"[0-9a-f]{32}")  # used with fullmatch: no trailing newline
IMAGE_ID_RE = re.compile(r"[0-9a-f]{16}")
CLOSED_KEPT = 256  # closed requests remembered, so a late submission is told what became of it


class RatingError(ValueError):
    """A submission that does not fit the pending request (answered with HTTP 400)."""


class RequestClosed(LookupError):
    """A submission or cancel for a request that is no longer open (answered with HTTP 409): it was
    answered, cancelled, timed out, or the run stopped waiting.  ``state`` says which."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


CLOSED_MESSAGES = {
    "rated": "this rating request is already answered",
    "cancelled": "this rating request was cancelled",
    "timeout": "this rating request timed out before the rating arrived: the rating was not used (the unrated "
               "rule scored the groups)",
    "withdrawn": "the run stopped waiting for this rating request: the rating was not used",
}


@dataclass
class RatingRequest:
    """One pending rating: what the page shows and what a submission must match."""
    run_name: str
    iteration: int
    mode: str
    groups: list            # [{"group": int, "prompt": str, "images": [image id, ...]}] (human-rated groups)
    timeout_s: float
    total_groups: int = 0   # groups in the rollout (mixed mode rates only some)
    request_id: str = field(default_factory=lambda: secrets.token_hex(16))
    created: float = field(default_factory=time.time)
    images: dict = field(default_factory=dict)      # image id -> PNG bytes (served by the route)
    result: dict | None = None                      # validated ratings once submitted
    done: threading.Event = field(default_factory=threading.Event)
    # "pending" until exactly one of: "rated", "cancelled", "timeout", "withdrawn" (then final)
    state: str = "pending"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _close(self, state: str, result: dict | None = None) -> None:
        """Move from pending to ``state`` (with ``result`` when rated); raises :class:`RequestClosed`
        when the request was closed before."""
        with self._lock:
            if self.state != "pending":
                raise RequestClosed(self.state, CLOSED_MESSAGES[self.state])
            self.state, self.result = state, result
            self.done.set()

    @property
    def cancelled(self) -> bool:
        return self.state == "cancelled"

    def answer(self, result: dict) -> None:
        """Accept a validated rating; only while pending (the waiter then uses exactly it)."""
        self._close("rated", result)

    def cancel(self) -> None:
        self._close("cancelled")

    def expire(self, state: str = "timeout") -> str:
        """Close the request unless a rating or cancel got in first; returns the final state (a
        rating accepted before this call is kept: "rated")."""
        try:
            self._close(state)
        except RequestClosed:
            pass
        return self.state

    def public(self) -> dict:
        """What the page gets (no paths, no bytes)."""
        return {"request_id": self.request_id, "run": self.run_name, "iteration": self.iteration,
                "mode": self.mode, "groups": self.groups, "total_groups": self.total_groups,
                "timeout_s": self.timeout_s,
                "seconds_left": max(0.0, self.created + self.timeout_s - time.time())}


def image_id(run_name: str, iteration: int, index: int, png: bytes) -> str:
    """A stable id of one rated image (its content, run, iteration and batch index)."""
    import hashlib
    h = hashlib.sha256(f"{run_name}\0{iteration}\0{index}\0".encode() + png)
    return h.hexdigest()[:16]


MAX_DEPTH = 8  # a submission nests 4 levels deep ({ratings: {group: {scores: {id: n}}}})


def _depth(v, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counting no further than ``limit + 1`` (iterative)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (node.values() if isinstance(node, dict) else node))
    return deepest


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes):
    """The JSON value of a request body, or :class:`RatingError` (HTTP 400) for anything that is not
    strict JSON of at most :data:`MAX_DEPTH` levels: invalid UTF-8 or JSON, NaN/Infinity, an
    integer too long for Python to read (over 4300 digits), nesting too deep for the parser."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RatingError("the body is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RatingError(f"the body nests too deeply (a submission has at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, and the limit on the digits of an integer
        raise RatingError(f"the body is not valid JSON ({str(e)[:120]})") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise RatingError(f"the body nests too deeply (a submission has at most {MAX_DEPTH} levels)")
    return value


def _int(v, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RatingError(f"{name} must be an integer from {lo} to {hi}")
    return v


def validate_submission(request: RatingRequest, payload) -> dict:
    """Check a client's submission against ``request``; return {group index: rating} where a rating is
    {"best": id, "worst": id} or {"scores": {id: 1..5}}.  Groups left out are unrated.  Anything
    else (unknown keys, wrong types, out-of-range scores, image ids of another group) raises
    :class:`RatingError`."""
    if not isinstance(payload, dict):
        raise RatingError("the body must be a JSON object")
    extra = set(payload) - {"request_id", "ratings"}
    if extra:
        raise RatingError(f"unknown fields: {sorted(extra)}")
    if payload.get("request_id") != request.request_id:
        raise RatingError("request_id does not name the pending rating request")
    ratings = payload.get("ratings")
    if not isinstance(ratings, dict):
        raise RatingError("ratings must be an object {group index: rating}")
    groups = {g["group"]: g for g in request.groups}
    out = {}
    for key, r in ratings.items():
        if not isinstance(key, str) or not re.fullmatch(r"\d{1,4}", key) or int(key) not in groups:
            raise RatingError(f"group {key!r} is not in this request")
        ids = groups[int(key)]["images"]
        if not isinstance(r, dict):
            raise RatingError(f"group {key}: a rating must be an object")
        if request.mode == "best-worst":
            if set(r) != {"best", "worst"}:
                raise RatingError(f"group {key}: best-worst ratings have exactly the keys best and worst")
            best, worst = r["best"], r["worst"]
            if best not in ids or worst not in ids:
                raise RatingError(f"group {key}: best and worst must be image ids of this group")
            if best == worst:
                raise RatingError(f"group {key}: best and worst must differ")
            out[int(key)] = {"best": best, "worst": worst}
        else:
            if set(r) != {"scores"} or not isinstance(r["scores"], dict):
                raise RatingError(f"group {key}: score ratings have exactly the key scores")
            scores = r["scores"]
            if set(scores) != set(ids):
                raise RatingError(f"group {key}: scores must rate every image of the group, by id")
            out[int(key)] = {"scores": {i: _int(scores[i], f"group {key}: score", SCORE_MIN, SCORE_MAX) for i in ids}}
    return out


def human_values(rating: dict, ids: list) -> list:
    """One group's rating as values in [-1, 1], in the order of ``ids``."""
    if "scores" in rating:
        return [(rating["scores"][i] - 3) / 2 for i in ids]
    return [1.0 if i == rating["best"] else -1.0 if i == rating["worst"] else 0.0 for i in ids]


def centred_ranks(values: list) -> list:
    """Ranks scaled to [-1, 1] (lowest -1, highest +1), ties sharing their mean rank; a group of
    equal values (or of one sample) is all zeros."""
    n = len(values)
    if n < 2:
        return [0.0] * n
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    half = (n - 1) / 2
    return [(r - half) / half for r in ranks]


def combine(group_ids: list, image_ids: list, ratings: dict, model_values: list | None,
            calibration: str = "rank") -> tuple[list, list]:
    """Per-sample rewards from human ratings (groups in ``ratings``) and, for the other groups, the
    model reward ``model_values`` (None: those groups are skipped, all zeros).

    Returns (values, sources) with one source per group index in order of first appearance:
    ``"human"``, ``"model"`` or ``"skipped"``."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}")
    values = [0.0] * len(group_ids)
    sources = {}
    for g in dict.fromkeys(group_ids):
        idx = [i for i, gi in enumerate(group_ids) if gi == g]
        if g in ratings:
            vals, src = human_values(ratings[g], [image_ids[i] for i in idx]), "human"
        elif model_values is not None:
            vals, src = [float(model_values[i]) for i in idx], "model"
        else:
            vals, src = [0.0] * len(idx), "skipped"
        if calibration == "rank" and src != "skipped":
            vals = centred_ranks(vals)
        for i, v in zip(idx, vals):
            values[i] = float(v)
        sources[g] = src
    return values, [sources[g] for g in sources]


def rated_model_reward(group_ids: list, sources: list, model_values: list | None) -> float | None:
    """Mean model reward (raw, before any calibration) over the samples of the human-rated groups;
    None without a model reward, without a rated group, or when a value is not finite.  Human
    ratings are relative within a group (their mean is 0 by construction), so this is what shows
    whether the rated images get better."""
    if model_values is None:
        return None
    order = list(dict.fromkeys(group_ids))
    rated = {g for g, s in zip(order, sources) if s == "human"}
    vals = [float(model_values[i]) for i, g in enumerate(group_ids) if g in rated]
    if not vals or not all(math.isfinite(v) for v in vals):
        return None
    return sum(vals) / len(vals)


def tracking_fields(history: list, rated_now: int, groups_now: int, model_reward: float | None,
                    model_name: str | None) -> dict:
    """The fields a human-rated iteration adds to the run's history: the groups rated this iteration
    and in the run so far (``history`` holds the earlier iterations' fields), and the model reward
    of the rated images."""
    before = next((h["rated_groups_total"] for h in reversed(history or []) if "rated_groups_total" in h), 0)
    return {"rated_groups": int(rated_now), "groups": int(groups_now),
            "rated_groups_total": int(before) + int(rated_now),
            "rated_model_reward": finite(model_reward) if model_reward is not None else None,
            "rated_model_reward_name": model_name if model_reward is not None else None}


def signal_text(history: list, heldout: dict | None = None, running_of: int = 10) -> str:
    """What tells a person rating the images whether the run learns, from the run's ``history``
    (its last entry this iteration's, with :func:`tracking_fields`): the groups rated so far, the
    model reward of the rated images with its running mean, and the latest held-out reward
    (``heldout``: {"reward", "iteration", "name"}).  Without either it says so and what to wire."""
    last = history[-1]
    out = (f"rated groups: {last.get('rated_groups_total', 0)} ({last.get('rated_groups', 0)} of "
           f"{last.get('groups', 0)} this iteration)")
    parts = []
    tracked = [h for h in history if h.get("rated_model_reward") is not None][-running_of:]
    if tracked:
        name = tracked[-1].get("rated_model_reward_name") or "model reward"
        now = last.get("rated_model_reward")
        mean = sum(h["rated_model_reward"] for h in tracked) / len(tracked)
        parts.append(f"{name} of the rated images {'-' if now is None else f'{now:.4f}'} "
                     f"(running mean {mean:.4f} over {len(tracked)})")
    if heldout and heldout.get("reward") is not None and math.isfinite(heldout["reward"]):
        parts.append(f"held-out {heldout.get('name') or 'reward'} {heldout['reward']:.4f} "
                     f"(iteration {heldout.get('iteration')})")
    if not parts:
        return (out + "; no reward model to track progress -- wire Held-out Evaluation, or set the Human "
                "Rating's unrated to model reward (ratings compare the images within a group: they cannot show "
                "whether the run improves)")
    return out + " · " + " · ".join(parts)


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line and flush it to disk.  A record with a NaN or infinite number is refused
    (ValueError): a rating is never written as something else than what was given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = json.dumps(record, sort_keys=True, allow_nan=False)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list:
    """The records of a ratings file (a torn last line, from a crash mid-write, is ignored)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def trained_mark(run: str, lineage: str, iteration: int, request_ids: list) -> dict:
    """The line that says which rating record(s) iteration ``iteration`` of a run trained on."""
    return {"trained": True, "run": run, "lineage": lineage, "iteration": int(iteration),
            "request_ids": sorted(str(r) for r in request_ids)}


def is_mark(record: dict) -> bool:
    return isinstance(record, dict) and record.get("trained") is True and "request_ids" in record


def trained_ratings(path: str, lineage: str | None = None) -> dict:
    """{iteration: [rating records the run trained on]} of a ratings file (the records named by its
    trained marks; with ``lineage``, only that run's marks).  A record without a mark was not used."""
    records = read_jsonl(path)
    by_id = {r.get("request_id"): r for r in records if not is_mark(r)}
    out = {}
    for m in records:
        if is_mark(m) and (lineage is None or m.get("lineage") == lineage):
            out[int(m["iteration"])] = [by_id[i] for i in m["request_ids"] if i in by_id]
    return dict(sorted(out.items()))


def ensure_mark(path: str, mark: dict) -> bool:
    """Append ``mark`` unless the file already has it (a resume after a kill right after the
    checkpoint committed); True when appended."""
    for r in read_jsonl(path):
        if is_mark(r) and all(r.get(k) == mark[k] for k in ("lineage", "iteration", "request_ids")):
            return False
    append_jsonl(path, mark)
    return True


def finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class Registry:
    """The pending rating requests of this process (one per Human Rating node that is waiting)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[str, RatingRequest] = {}
        self._closed: dict[str, str] = {}  # request id -> final state, of the last CLOSED_KEPT removed

    def add(self, req: RatingRequest) -> None:
        with self._lock:
            self._pending[req.request_id] = req

    def remove(self, request_id: str) -> None:
        """Forget a request (still open: closed as withdrawn first); a later submission for it is
        told what became of it."""
        with self._lock:
            req = self._pending.pop(request_id, None)
        if req is not None:
            req.expire("withdrawn")
            with self._lock:
                self._closed[request_id] = req.state
                while len(self._closed) > CLOSED_KEPT:
                    self._closed.pop(next(iter(self._closed)))

    def _closed_error(self, request_id) -> LookupError:
        with self._lock:
            state = self._closed.get(request_id) if isinstance(request_id, str) else None
        if state is None:
            return LookupError("no pending rating request with this id")
        return RequestClosed(state, CLOSED_MESSAGES[state])

    def get(self, request_id) -> RatingRequest | None:
        if not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id):
            return None
        with self._lock:
            return self._pending.get(request_id)

    def pending(self) -> list:
        with self._lock:
            return [r for r in self._pending.values() if r.state == "pending"]

    def submit(self, payload) -> RatingRequest:
        """Validate and accept a rating; returning means the waiting run uses it.  A request that is
        no longer open raises :class:`RequestClosed` (timed out, cancelled, answered, withdrawn)."""
        rid = payload.get("request_id") if isinstance(payload, dict) else None
        req = self.get(rid)
        if req is None:
            raise self._closed_error(rid)
        if req.state != "pending":
            raise RequestClosed(req.state, CLOSED_MESSAGES[req.state])
        req.answer(validate_submission(req, payload))
        return req

    def cancel(self, request_id) -> RatingRequest:
        req = self.get(request_id)
        if req is None:
            raise self._closed_error(request_id)
        req.cancel()
        return req


REGISTRY = Registry()
