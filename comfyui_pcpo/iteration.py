"""One PCPO LoRA Update iteration, the rules that need no host (host-free).

What the update node checks before it trains (:func:`check_inputs`), when the iteration's checkpoint
is due (:func:`checkpoint_due`) and which node of the graph writes it (:func:`finishing_node`: a
Reward Guard or Held-out Evaluation of the same run, so their results commit with the update), when
an update carried no usable gradient (:func:`gradient_stalled`, :data:`STALL_LIMIT`,
:func:`stall_error`), and the words it shows (:func:`update_warnings`, :func:`format_stats`).
"""
from __future__ import annotations

import math

RUNNING_MEAN_OF = 10  # iterations in the running mean of the reward shown on the node (web/pcpo.js)
STALL_LIMIT = 3  # iterations in a row without a usable gradient before the run stops with an error


def gradient_stalled(stats: dict) -> bool:
    """True when some group carried a reward signal but no update produced a usable gradient (all
    zero, non-finite, or skipped for overflow)."""
    if stats["zero_std_groups"] >= stats["groups"]:
        return False  # every group scored its samples alike: a zero gradient is correct
    norms = stats.get("grad_norms") or [stats["grad_norm"]]
    usable = [n for n in norms if n > 0 and math.isfinite(n)]
    # a step skipped for overflow has a non-finite norm, so it is already not usable: only skipped
    # steps beyond the non-finite norms can hide among the usable ones
    hidden = max(0, stats.get("skipped_steps", 0) - sum(not math.isfinite(n) for n in norms))
    return len(usable) <= hidden


LOW_ETA = 0.3     # below this the policy ratio is ill-conditioned (weights grow as 1 / noise level)
HIGH_KL = 0.1     # approx KL of one update above which the step left the trust region


def update_warnings(eta: float, stats: dict) -> list:
    """Plain-language warnings about settings or stats that make an update unreliable."""
    out = []
    if eta < LOW_ETA:
        out.append(f"eta {eta:g} is low: the policy ratio is ill-conditioned at low noise (KL and gradient "
                   f"norms grow as 1/eta); use {LOW_ETA:g}-1.0")
    if stats.get("approx_kl", 0.0) > HIGH_KL:
        out.append(f"KL {stats['approx_kl']:.3g} per update is high: lower the learning rate or raise eta")
    if stats.get("skipped_steps"):
        out.append(f"{stats['skipped_steps']} optimizer step(s) skipped: fp16 gradients overflowed (the gradient "
                   "scale was lowered)")
    if gradient_stalled(stats):
        out.append("no usable gradient this iteration although rewards differ within groups")
    return out


FINISHERS = ("PCPORewardGuard", "PCPOHeldOutEvaluation")  # nodes that add to an iteration after the update


def finishing_node(prompt, unique_id):
    """The class of the node that finishes this update's iteration in ``prompt`` -- a Reward Guard of
    the same run, else a Held-out Evaluation of it -- or None (the update finishes it).  That node
    writes the checkpoint, so the guard's decision and the held-out results commit with the update."""
    if not isinstance(prompt, dict) or unique_id is None:
        return None
    me = prompt.get(str(unique_id))
    link = me.get("inputs", {}).get("session") if isinstance(me, dict) else None
    if not (isinstance(link, list) and link):
        return None
    found = {n.get("class_type") for n in prompt.values() if isinstance(n, dict)
             and isinstance(n.get("inputs", {}).get("session"), list) and n["inputs"]["session"][:1] == link[:1]}
    return next((c for c in FINISHERS if c in found), None)


def format_stats(it: int, s: dict) -> str:
    return (f"iter {it}: reward {s['reward_mean']:.4f} ± {s['reward_std']:.4f} | clip {s['clip_fraction']:.3f} | "
            f"kl {s['approx_kl']:.2e} | grad {s['grad_norm']:.3g} | zero-std groups {s['zero_std_groups']}/{s['groups']}")


def check_inputs(run_name: str, iteration: int, token: str, batch, rewards) -> None:
    """Refuse (ValueError, saying what to wire) a trajectory of another run, of another iteration or
    session object, or rewards scored for another rollout."""
    if batch.run_name != run_name:
        raise ValueError(f"the trajectory belongs to run {batch.run_name!r}, not {run_name!r}")
    if batch.iteration != iteration or batch.session_token != token:
        raise ValueError(f"the trajectory is from iteration {batch.iteration} but run {run_name!r} is at "
                         f"{iteration}: sample a fresh rollout (the Trajectory Sampler must run before "
                         "every update)")
    if rewards.trajectory_uid != batch.uid:
        raise ValueError("the rewards were computed for another rollout: wire the Reward Scorer to this "
                         "Trajectory Sampler's output")


def checkpoint_due(iteration: int, every: int, target: int) -> bool:
    """The checkpoint is written every ``every`` iterations and at the press's target iteration."""
    return iteration % int(every) == 0 or iteration >= target


def stall_error(run_name: str, stalled: int, stats: dict, precision: str) -> str:
    return (f"PCPO {run_name}: no usable gradient in {stalled} iterations in a row although "
            f"rewards differ within groups (gradient norm {stats['grad_norm']:.3g}, {stats['skipped_steps']} "
            f"overflowed steps; training precision {precision}). With fp16 the gradients "
            "underflow or overflow: set training_precision to bf16 or fp32. Also check that target_layers "
            "reach the layers that shape the image. The run is saved; queue again after the change.")
