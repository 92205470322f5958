"""Gradient variance of the first, on-policy update: PCPO against the clipped-ratio baseline
(DanceGRPO / Flow-GRPO style) and DDPO, at fixed model states.

For each regime and model state, ``--groups`` independent rollout groups are drawn (group k: one
prompt drawn with seed k, ``--group-size`` samples from noise seed k, the same for every arm; arms
with the same rollout share the group exactly), scored with ``prompt-colour-agreement``, and each
arm's LoRA gradient of the first update of the PCPO LoRA Update's loss is recorded: every candidate
step trained (train fraction 1), one update, no gradient clipping, an optimizer with learning rate
0 (the model never moves).  The gradient goes through the node layer's own code path (ComfyUI's
guider, cond/uncond batching, the LoRA Update's predictor and ``PCPOTrainer``).

Per arm, from the groups' gradients g_1..g_n (statistics from their Gram matrix, unbiased):

* inverse SNR = tr Cov(g) / |E g|^2 (lower = less noisy; |E g|^2 estimated by
  sum_{i != j} g_i.g_j / (n (n - 1)), tr Cov by the sample covariance),
* mean cosine of a group's gradient with the mean gradient of the other groups (leave-one-out),
* the share of a group's gradient norm each timestep bin contributes, |g_b| / sum_b' |g_b'|
  (bins of consecutive candidate steps, bin 1 = highest noise),

each with a 95% percentile bootstrap CI over groups (``--resamples``, fixed RNG); for each PCPO arm
against each baseline the ratio of inverse SNRs and the difference of mean cosines on the same
resamples (paired), with the verdict "resolved" when the CI excludes 1 (ratio) / 0 (difference),
"bounded within 10%" when it lies inside [0.9, 1.1] / [-0.1, 0.1].

Regimes (``--regimes``): ``d50`` the demo model at 50 steps, eta 1, on ``normal`` (its native
weights: one large weight at the second-to-last step, about 17x spread, closest in shape to the
paper's SD1.x grid); ``d10`` the demo's 10-step ``simple`` grid (1.5x spread: the control);
``flow-constant`` and ``flow-flowgrpo`` the demo flow model at shift 3, 16 steps, with the two flow
noise rules.  Model states (``--states``): ``base`` (LoRA at zero) and ``trained`` (the LoRA after
``--train-iterations`` demo iterations: 4 prompts x 8, lr 2e-3, PCPO, the regime's sampler).

Each (regime, state, arm, group) gradient is saved under ``--cache`` (a .npy per gradient, temp
file + os.replace), so a killed run resumes where it stopped; the summary JSON (``--json``) holds
every group's statistics needed for the report (Gram matrices, bin norms, rewards).  A cell of more
than 128 groups keeps its Gram matrices in ``<json without .json>.gram.npz`` beside the JSON (the
upper triangle in float32; the JSON names the file), written before the JSON.

    python benchmarks/variance.py --json benchmarks/variance.json --groups 64
    python benchmarks/variance.py --report benchmarks/variance.json
    python benchmarks/variance.py --smoke --json /tmp/variance.json     # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _smoke  # noqa: E402
from _smoke import save_atomic  # noqa: E402

# regime -> (model, steps, scheduler, eta / noise level, flow noise rule or None, {arm: (objective, rollout)})
DIFF_ARMS = {"pcpo-uw-sigma": ("pcpo", "uw-sigma"), "pcpo-uw-lambda": ("pcpo", "uw-lambda"),
             "grpo-clip": ("grpo-clip", "native"), "ddpo": ("ddpo", "native")}
FLOW_ARMS = {"pcpo": ("pcpo", "native"), "grpo-clip": ("grpo-clip", "native"), "ddpo": ("ddpo", "native")}
REGIMES = {
    "d50": ("demo", 50, "normal", 1.0, None, DIFF_ARMS),
    "d10": ("demo", 10, "simple", 1.0, None, DIFF_ARMS),
    "flow-constant": ("flow", 16, "simple", 0.3, "constant", FLOW_ARMS),
    "flow-flowgrpo": ("flow", 16, "simple", 0.7, "flow-grpo", FLOW_ARMS),
}
PCPO_ARMS = ("pcpo-uw-sigma", "pcpo-uw-lambda", "pcpo")
BASELINES = ("grpo-clip", "ddpo")
CFG = 4.0
LR_TRAIN = 2e-3


# ----------------------------------------------------------------------------- statistics (no ComfyUI)

def gram_stats(G: np.ndarray, counts: np.ndarray | None = None) -> tuple:
    """(inverse SNR, mean leave-one-out cosine) of gradients with Gram matrix ``G`` (n x n), the
    groups weighted by ``counts`` (a bootstrap resample: how often each group was drawn; default 1).

    inverse SNR = tr Cov / |mu|^2 with |mu|^2 = sum_{i != j} c_i c_j G_ij / (m^2 - sum c_i^2) (pairs of
    distinct groups: unbiased, and may come out <= 0 when the noise swamps the mean: then inf) and
    tr Cov = (sum_i c_i G_ii - m |g_bar|^2) / (m - 1), m = sum c.  cosine_i = g_i . g_bar_{-i} / (|g_i| |g_bar_{-i}|),
    g_bar_{-i} the mean of the other draws; groups with a zero gradient are left out of the mean
    cosine (no direction)."""
    n = G.shape[0]
    c = np.ones(n) if counts is None else np.asarray(counts, dtype=np.float64)
    m = c.sum()
    diag = np.diag(G)
    total = c @ G @ c                     # |sum g|^2
    # pairs of distinct draws: all pairs minus each draw with itself (c_i draws of group i: c_i self-pairs)
    # pairs of distinct groups only (a resample's copies of one group are not independent draws)
    cross = total - (c * c) @ diag
    mu2 = cross / (m * m - (c * c).sum())
    gbar2 = total / (m * m)
    trcov = (c @ diag - m * gbar2) / (m - 1)
    inv_snr = trcov / mu2 if mu2 > 0 else float("inf")
    # leave-one-out cosines: g_i . (sum - c_i g_i) / (|g_i| |sum - c_i g_i|) (every copy of group i left out)
    s_dot = G @ c                          # g_i . sum
    norms = np.sqrt(np.maximum(diag, 0))
    loo_dot = s_dot - c * diag
    loo_norm2 = total - 2 * c * s_dot + c * c * diag
    ok = (norms > 0) & (loo_norm2 > 0)
    cos = np.zeros(n)
    cos[ok] = loo_dot[ok] / (norms[ok] * np.sqrt(loo_norm2[ok]))
    w = c * ok
    mean_cos = float((w * cos).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return float(inv_snr), mean_cos


def bootstrap_counts(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) draw counts of a bootstrap over n groups (fixed RNG)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    out = np.zeros((resamples, n))
    np.add.at(out, (np.arange(resamples)[:, None], idx), 1.0)
    return out


def ci(values, level: float = 0.95) -> tuple:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    a = (1 - level) / 2
    return (float(np.quantile(v, a)), float(np.quantile(v, 1 - a))) if v.size else (float("nan"), float("nan"))


def verdict_ratio(lo: float, hi: float) -> str:
    if lo > 1 or hi < 1:
        return "resolved"
    if lo >= 0.9 and hi <= 1.1:
        return "bounded within 10%"
    return "not resolved"


def verdict_diff(lo: float, hi: float, bound: float = 0.1) -> str:
    if lo > 0 or hi < 0:
        return "resolved"
    if lo >= -bound and hi <= bound:
        return f"bounded within {bound:g}"
    return "not resolved"


def bin_edges(n_cand: int, n_bins: int) -> list:
    """Split ``n_cand`` consecutive candidate steps into ``n_bins`` near-equal bins: [(start, end)]."""
    n_bins = max(1, min(n_bins, n_cand))
    b = np.linspace(0, n_cand, n_bins + 1).round().astype(int)
    return [(int(b[i]), int(b[i + 1])) for i in range(n_bins)]


def norm_cv(norms: np.ndarray, counts: np.ndarray | None = None) -> float:
    """Coefficient of variation std / mean of the groups' gradient norms (weighted by ``counts``): how
    much the size of one group's update fluctuates (what gradient clipping and the optimizer see)."""
    c = np.ones(len(norms)) if counts is None else counts
    m = (c * norms).sum() / c.sum()
    v = (c * (norms - m) ** 2).sum() / (c.sum() - 1)
    return float(np.sqrt(v) / m) if m > 0 else float("nan")


def arm_summary(entry: dict, counts: np.ndarray) -> dict:
    """Point estimates and bootstrap CIs of one arm's statistics; ``counts`` (R, n) resamples."""
    G = np.asarray(entry["gram"], dtype=np.float64)
    inv, cos = gram_stats(G)
    boots = np.array([gram_stats(G, c) for c in counts])
    shares = np.asarray(entry["bin_norms"], dtype=np.float64)  # (n, bins)
    tot = shares.sum(1, keepdims=True)
    ok = tot[:, 0] > 0
    share = np.where(tot > 0, shares / np.where(tot > 0, tot, 1), 0.0)
    share_mean = share[ok].mean(0) if ok.any() else np.full(shares.shape[1], np.nan)
    share_boot = np.array([(c[ok, None] * share[ok]).sum(0) / max(c[ok].sum(), 1) for c in counts])
    norms = np.sqrt(np.maximum(np.diag(G), 0))
    cv = norm_cv(norms)
    cv_boot = np.array([norm_cv(norms, c) for c in counts])
    return {"inv_snr": inv, "inv_snr_ci": ci(boots[:, 0]), "cos": cos, "cos_ci": ci(boots[:, 1]),
            "norm_cv": cv, "norm_cv_ci": ci(cv_boot), "boot_cv": cv_boot, "boot_share": share_boot,
            "share": share_mean.tolist(), "share_ci": [ci(share_boot[:, j]) for j in range(share.shape[1])],
            "boot_inv": boots[:, 0], "boot_cos": boots[:, 1], "zero_groups": int((~ok).sum()),
            "norm": float(np.sqrt(np.diag(G)).mean())}


# ----------------------------------------------------------------------------- the host side

def make_host(model: str, threads: int):
    import torch
    torch.set_num_threads(threads)
    if model == "flow":
        from convergence_flow import make_host as flow_host
        return flow_host(threads)
    from _common import Host
    return Host(threads)


def rollout(host, sess, prompts, model, group_size, steps, seed, variant, scheduler, level, rule):
    if model == "flow":
        return host.flow_rollout(sess, prompts, group_size, steps, seed, rule, level, scheduler, CFG)
    return host.rollout(sess, prompts, group_size, steps=steps, seed=seed, variant=variant, scheduler=scheduler,
                        eta=level, cfg=CFG)


def gradient(host, sess, lat_batch, objective, n_bins):
    """The LoRA gradient (flat float32 numpy) of the first update of ``objective`` on the batch, every
    candidate step trained, and the norms of its parts per timestep bin.  The LoRA Update node's
    path (its predictor, ComfyUI's guider, PCPOTrainer), with a learning-rate-0 optimizer."""
    import torch
    from comfyui_pcpo.trainer import PCPOConfig, PCPOTrainer, candidate_steps
    upd = sys.modules[host.N["PCPOLoRAUpdate"].__module__]
    lat, batch = lat_batch
    rewards = host.score(lat, batch)
    session = sess.live()
    state = session.state
    params = state.params()
    traj = batch.traj
    cand = [int(s) for s in candidate_steps(traj)]
    edges = bin_edges(len(cand), n_bins)
    bin_of = {}
    for b, (s0, s1) in enumerate(edges):
        for s in cand[s0:s1]:
            bin_of[s] = b
    sig = traj.plan.sigmas.float()
    G = int(traj.batch_size)
    cfg = PCPOConfig(objective=objective, train_fraction=1.0, micro_batch=G, grad_clip=0.0, updates_per_rollout=1)
    opt = torch.optim.SGD(params, lr=0.0)
    trainer = PCPOTrainer(params, opt, cfg, generator=torch.Generator().manual_seed(0),
                          compute_dtype=session.options.precision.dtype)
    model = session.model
    device = model.load_device
    seen = {"step": None}
    rec = {"prev": None, "bins": [None] * len(edges), "full": None}

    def flat():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten().cpu()
                          for p in params])

    def progress(done, total):
        cur = flat()
        delta = cur if rec["prev"] is None else cur - rec["prev"]
        b = bin_of[seen["step"]]
        rec["bins"][b] = delta if rec["bins"][b] is None else rec["bins"][b] + delta
        rec["prev"] = cur
        if done == total:
            rec["full"] = cur

    def run_group(g, work):
        pos, neg = batch.group_conds[g]

        def fn(predict):
            def pred(x, s, idx):
                seen["step"] = int(torch.argmin((sig - float(s[0])).abs()))
                x, s = x.to(device).clone(), s.to(device)
                return upd.prediction_from_denoised(traj.plan, x, predict(x, s), s)
            return work(pred)
        upd.run_in_guider(model, upd.clone_conditioning(pos), upd.clone_conditioning(neg), batch.cfg,
                          (G, *batch.latent_shape), sig, fn)

    upd.load_for_training(model, batch.latent_shape, G)
    with upd.training_mode():
        stats = trainer.update(traj, rewards.values, run_group=run_group, on_progress=progress)
    full = rec["full"]
    bins = [float(torch.linalg.vector_norm(v)) if v is not None else 0.0 for v in rec["bins"]]
    parts = sum(v for v in rec["bins"] if v is not None)
    # the bins' parts add up to the gradient (every backward call was attributed to one bin)
    bin_error = float(torch.linalg.vector_norm(parts - full) / torch.linalg.vector_norm(full).clamp_min(1e-300))
    return (full.float().numpy(), bins, [float(r) for r in rewards.values], float(stats["first_update_log_ratio"]),
            edges, cand, bin_error)


def lora_values(sess):
    return [p.detach().clone() for p in sess.live().state.params()]


def set_lora(sess, values):
    import torch
    with torch.no_grad():
        for p, v in zip(sess.live().state.params(), values):
            p.copy_(v)


def train_state(host, sess, model, regime, iterations, seed=0):
    """``iterations`` demo iterations (4 prompts x 8 samples, lr 2e-3, PCPO, 2 optimizer steps) with
    the regime's sampler; returns the batch rewards."""
    _, steps, scheduler, level, rule, _ = REGIMES[regime]
    prompts = host.prompts(4, seed=1000 + seed)
    out = []
    for _ in range(iterations):
        lat, batch = rollout(host, sess, prompts, model, 8, steps, 1000 + seed, "uw-sigma" if model == "demo" else "native",
                             scheduler, level, rule)
        st = host.update(sess, batch, host.score(lat, batch), objective="pcpo", train_fraction=0.5, micro_batch=8)
        out.append(st["reward_mean"])
    return out


def save_npy(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def run_cell(host, regime, state, args, data, json_path):
    """All arms' gradients of ``args.groups`` groups for one (regime, model state)."""
    model, steps, scheduler, level, rule, arms = REGIMES[regime]
    tag = args.caption.replace(" ", "-") if args.caption else ""
    key = f"{regime}/{state}" + (f"/{tag}" if tag else "")
    cell = data["cells"].setdefault(key, {"arms": {}, "groups": {}})
    cell["caption"] = args.caption or None
    cache = os.path.join(args.cache, regime, state, *([tag] if tag else []))
    os.makedirs(cache, exist_ok=True)
    sess = host.session(f"var_{regime}_{state}", LR_TRAIN, seed=0)
    lora_file = os.path.join(args.cache, regime, state, "lora.pt")  # one trained state per regime
    import torch
    if state == "trained":
        if os.path.exists(lora_file):
            set_lora(sess, torch.load(lora_file, weights_only=True))
        else:
            t0 = time.time()
            r = train_state(host, sess, model, regime if model == "flow" else "d10", args.train_iterations)
            tmp = lora_file + ".tmp"
            torch.save(lora_values(sess), tmp)
            os.replace(tmp, lora_file)
            cell["training_rewards"] = r
            print(f"{key}: trained {len(r)} iterations, batch reward {np.mean(r[:3]):.3f} -> {np.mean(r[-3:]):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    sess.live().state.iteration = 0  # every group draws its prompt from its own seed at iteration 0
    before = lora_values(sess)
    variants = sorted({v for _, v in arms.values()})
    t0 = time.time()
    for k in range(args.groups):
        want = [a for a in arms if a != "ddpo" or k < args.ddpo_groups]
        if str(k) in cell["groups"] and all(os.path.exists(os.path.join(cache, f"{a}_{k}.npy")) for a in want):
            continue
        g_info = {}
        for variant in variants:
            prompts = host.prompts(1, seed=k) if not args.caption else host.fixed_prompt(args.caption)
            lb = rollout(host, sess, prompts, model, args.group_size, steps, k, variant, scheduler, level, rule)
            for arm, (objective, v) in arms.items():
                if v != variant or arm not in want:
                    continue
                g, bins, rewards, first_lr, edges, cand, bin_err = gradient(host, sess, lb, objective, args.bins)
                cell["bin_sum_error"] = max(cell.get("bin_sum_error", 0.0), bin_err)
                save_npy(os.path.join(cache, f"{arm}_{k}.npy"), g)
                g_info[arm] = {"bins": bins, "rewards": rewards, "first_update_log_ratio": first_lr}
                cell["edges"], cell["candidates"] = edges, cand
        cell["groups"][str(k)] = g_info
        finalize(cell, arms, cache)
        save(json_path, data)
        el = time.time() - t0
        print(f"{key} group {k + 1}/{args.groups} ({el:.0f} s)", flush=True)
    # the learning-rate-0 optimizer never moved the LoRA: every gradient is of the same model state
    cell["lora_moved"] = max(float((a - b).abs().max()) for a, b in zip(before, lora_values(sess)))
    finalize(cell, arms, cache)
    save(json_path, data)


_GRADIENTS = {}  # (cache, arm) -> (groups, their gradients as rows, Gram matrix): loaded once per process


def gram_of(cache: str, arm: str, ks: list) -> np.ndarray:
    """Gram matrix of ``arm``'s gradients of groups ``ks`` (in that order), from the cached .npy files;
    the gradients already read stay in memory, so adding a group costs one row, not the whole matrix."""
    have, M, G = _GRADIENTS.get((cache, arm), ([], np.zeros((0, 0)), np.zeros((0, 0))))
    if have != ks[:len(have)]:
        have, M, G = [], np.zeros((0, 0)), np.zeros((0, 0))
    new = ks[len(have):]
    if new:
        N = np.stack([np.load(os.path.join(cache, f"{arm}_{k}.npy")).astype(np.float64) for k in new])
        M = N if not have else np.concatenate([M, N])
        cross = N @ M.T  # (new, all)
        n0 = len(have)
        G2 = np.zeros((len(ks), len(ks)))
        G2[:n0, :n0] = G
        G2[n0:, :] = cross
        G2[:, n0:] = cross.T
        have, G = list(ks), G2
        _GRADIENTS[(cache, arm)] = (have, M, G)
    return G


def finalize(cell, arms, cache):
    """Gram matrices and bin norms of the groups done so far (in group order)."""
    ks = sorted(int(k) for k in cell["groups"])
    for arm in arms:
        ks_a = [k for k in ks if arm in cell["groups"][str(k)]]
        if not ks_a:
            continue
        cell["arms"][arm] = {"groups": ks_a, "gram": gram_of(cache, arm, ks_a),
                             "bin_norms": [cell["groups"][str(k)][arm]["bins"] for k in ks_a],
                             "rewards": [cell["groups"][str(k)][arm]["rewards"] for k in ks_a],
                             "first_update_log_ratio": max(cell["groups"][str(k)][arm]["first_update_log_ratio"]
                                                           for k in ks_a)}


# ----------------------------------------------------------------------------- the report

GRAM_IN_JSON = 128  # a cell with more groups keeps its Gram matrices in the .gram.npz beside the JSON


def gram_path(json_path: str) -> str:
    return (json_path[:-5] if json_path.endswith(".json") else json_path) + ".gram.npz"


def split_grams(data: dict, json_path: str) -> tuple:
    """(a JSON-ready copy of ``data``, {"cell|arm": upper triangle in float32} of the cells whose Gram
    matrices go to the .npz): small Gram matrices stay in the JSON as lists."""
    out = json.loads(json.dumps(data, default=lambda o: None))  # a copy without the numpy arrays
    big = {}
    for key, cell in data["cells"].items():
        for arm, a in cell["arms"].items():
            G = np.asarray(a["gram"], dtype=np.float64)
            entry = out["cells"][key]["arms"][arm]
            if G.shape[0] > GRAM_IN_JSON:
                big[f"{key}|{arm}"] = G[np.triu_indices(G.shape[0])].astype(np.float32)
                entry["gram"], entry["gram_file"] = None, os.path.basename(gram_path(json_path))
            else:
                entry["gram"] = G.tolist()
    return out, big


def save(json_path: str, data: dict) -> None:
    """The summary JSON, and the large Gram matrices in their .npz (written first, through a temp file
    and os.replace: a JSON on disk never names Gram rows its .npz lacks)."""
    out, big = split_grams(data, json_path)
    if big:
        tmp = gram_path(json_path) + ".tmp.npz"
        np.savez(tmp, **big)
        os.replace(tmp, gram_path(json_path))
    save_atomic(json_path, out)


def load(json_path: str) -> dict:
    """A summary JSON with its Gram matrices (from the .npz beside it where the JSON names one)."""
    with open(json_path) as f:
        data = json.load(f)
    npz = None
    for key, cell in data["cells"].items():
        for arm, a in cell["arms"].items():
            if a.get("gram_file"):
                if npz is None:
                    npz = np.load(os.path.join(os.path.dirname(os.path.abspath(json_path)), a["gram_file"]))
                tri = npz[f"{key}|{arm}"].astype(np.float64)
                n = len(a["groups"])
                G = np.zeros((n, n))
                G[np.triu_indices(n)] = tri
                a["gram"] = G + np.triu(G, 1).T
    return data


def fmt(x, lo, hi, d=3):
    return f"{x:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def report(data, resamples: int = 2000):
    out = {}
    for key, cell in data["cells"].items():
        arms = cell["arms"]
        if not arms:
            continue
        most = max(len(a["groups"]) for a in arms.values())
        # ddpo's gradient equals grpo-clip's on the first update: it may be computed on a few groups only
        # (--ddpo-groups), shown by the equality check below, and is then left out of the tables
        checked = {arm: a for arm, a in arms.items() if len(a["groups"]) < most}
        arms = {arm: a for arm, a in arms.items() if arm not in checked}
        groups = set.intersection(*(set(a["groups"]) for a in arms.values()))
        n = len(groups)
        if n < 3:
            continue
        sub = {}
        for arm, a in arms.items():
            idx = [a["groups"].index(k) for k in sorted(groups)]
            G = np.asarray(a["gram"])[np.ix_(idx, idx)]
            sub[arm] = {"gram": G, "bin_norms": [a["bin_norms"][i] for i in idx]}
        counts = bootstrap_counts(n, resamples)
        summ = {arm: arm_summary(e, counts) for arm, e in sub.items()}
        regime = key.split("/")[0]
        model, steps, scheduler, level, rule, _ = REGIMES[regime]
        edges = cell.get("edges", [])
        cand = cell.get("candidates", [])
        print(f"\n## {key}: {'demo flow model, ' + rule + ' rule ' + format(level, 'g') if model == 'flow' else 'demo model, eta ' + format(level, 'g')}, "
              f"{steps} steps, {scheduler}; {n} groups x {data['config']['group_size']} samples")
        if "training_rewards" in cell:
            r = cell["training_rewards"]
            print(f"trained state: {len(r)} PCPO iterations, batch reward {np.mean(r[:3]):.3f} -> {np.mean(r[-3:]):.3f}")
        zero = {arm: s["zero_groups"] for arm, s in summ.items()}
        print("groups with a zero gradient (every sample scored the same): " + ", ".join(f"{a} {z}" for a, z in zero.items()))
        print("| arm | inverse SNR tr Cov / |E g|^2 | mean cosine with the mean of the other groups | "
              "gradient norm: mean, CV (std / mean) |")
        print("|---|---|---|---|")
        for arm, s in summ.items():
            print(f"| {arm} | {fmt(s['inv_snr'], *s['inv_snr_ci'], 1)} | {fmt(s['cos'], *s['cos_ci'])} | "
                  f"{s['norm']:.3e}, {fmt(s['norm_cv'], *s['norm_cv_ci'])} |")
        labels = [f"{cand[s0] + 1}-{cand[s1 - 1] + 1}" if s1 - s0 > 1 else f"{cand[s0] + 1}" for s0, s1 in edges] if cand else []
        print("share of a group's gradient norm per timestep bin (|g_b| / sum |g_b'|; step 1 = highest noise):")
        print("| arm | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for arm, s in summ.items():
            print(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in s["share"]) + " |")
        comps = {}
        print("paired (same resampled groups): ratios PCPO / baseline of the inverse SNR and of the gradient norm's "
              "CV, differences of the mean cosine and of the last bin's share")
        print("| comparison | inverse SNR ratio | verdict | norm CV ratio | verdict | cosine difference | verdict | "
              "last-bin share difference | verdict |")
        print("|---|---|---|---|---|---|---|---|---|")
        for p in PCPO_ARMS:
            for b in BASELINES:
                if p not in summ or b not in summ:
                    continue
                r = summ[p]["inv_snr"] / summ[b]["inv_snr"]
                rb = summ[p]["boot_inv"] / summ[b]["boot_inv"]
                d = summ[p]["cos"] - summ[b]["cos"]
                db = summ[p]["boot_cos"] - summ[b]["boot_cos"]
                rlo, rhi = ci(rb)
                dlo, dhi = ci(db)
                cr = summ[p]["norm_cv"] / summ[b]["norm_cv"]
                clo, chi = ci(summ[p]["boot_cv"] / summ[b]["boot_cv"])
                ls = summ[p]["share"][-1] - summ[b]["share"][-1]
                llo, lhi = ci(summ[p]["boot_share"][:, -1] - summ[b]["boot_share"][:, -1])
                comps[f"{p} / {b}"] = {"inv_snr_ratio": r, "ci": [rlo, rhi], "verdict": verdict_ratio(rlo, rhi),
                                       "norm_cv_ratio": cr, "norm_cv_ci": [clo, chi],
                                       "norm_cv_verdict": verdict_ratio(clo, chi),
                                       "cos_diff": d, "cos_ci": [dlo, dhi], "cos_verdict": verdict_diff(dlo, dhi),
                                       "last_share_diff": ls, "last_share_ci": [llo, lhi],
                                       "last_share_verdict": verdict_diff(llo, lhi, 0.02)}
                print(f"| {p} / {b} | {fmt(r, rlo, rhi)} | {verdict_ratio(rlo, rhi)} | {fmt(cr, clo, chi)} | "
                      f"{verdict_ratio(clo, chi)} | {fmt(d, dlo, dhi)} | {verdict_diff(dlo, dhi)} | "
                      f"{fmt(ls, llo, lhi)} | {verdict_diff(llo, lhi, 0.02)} |")
        every = dict(cell["arms"])
        if "grpo-clip" in every and "ddpo" in every:
            ks = sorted(set(every["grpo-clip"]["groups"]) & set(every["ddpo"]["groups"]))
            ic = [every["grpo-clip"]["groups"].index(k) for k in ks]
            idd = [every["ddpo"]["groups"].index(k) for k in ks]
            Gc = np.diag(np.asarray(every["grpo-clip"]["gram"]))[ic]
            Gd = np.diag(np.asarray(every["ddpo"]["gram"]))[idd]
            rel = float(np.abs(Gc - Gd).max() / max(Gc.max(), 1e-300))
            print(f"grpo-clip vs ddpo on the same {len(ks)} groups: max relative difference of |g|^2 {rel:.1e} "
                  "(on the first, on-policy update rho = 1 and the two gradients are equal"
                  + ("; ddpo is left out of the tables" if "ddpo" in checked else "") + ")")
        out[key] = {"groups": n, "arms": {a: {k: v for k, v in s.items() if not k.startswith("boot")}
                                          for a, s in summ.items()}, "comparisons": comps}
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="d50,flow-constant,flow-flowgrpo,d10")
    ap.add_argument("--states", default="base,trained")
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--bins", type=int, default=5, help="timestep bins of the candidate steps")
    ap.add_argument("--ddpo-groups", type=int, default=4,
                    help="groups on which ddpo's gradient is computed (it equals grpo-clip's on the first update)")
    ap.add_argument("--train-iterations", type=int, default=20)
    ap.add_argument("--caption", default="", help="every group samples this one caption (default: group k draws "
                    "one training caption with seed k)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=os.path.join(HERE, ".variance_cache"))
    ap.add_argument("--json", default="")
    ap.add_argument("--report", default="")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true",
                    help="3 groups x 2 samples on 5 (d50) and 4 (flow) steps, one state each, in seconds")
    args = ap.parse_args(argv)
    if args.report:  # one or more JSONs (comma-separated: runs of different regimes in parallel processes)
        data = None
        for path in args.report.split(","):
            d = load(path)
            if data is None:
                data = d
            else:
                data["cells"].update(d["cells"])
        res = report(data, args.resamples)
        return 0 if res else 1
    if args.smoke:
        args.json = _smoke.json_path(args.json)
        args.groups, args.group_size, args.train_iterations, args.resamples, args.ddpo_groups = 3, 2, 1, 50, 2
        args.cache = args.json + ".cache"
        REGIMES["d50"] = ("demo", 5, "normal", 1.0, None, DIFF_ARMS)
        REGIMES["flow-constant"] = ("flow", 4, "simple", 0.3, "constant", FLOW_ARMS)
        args.regimes, args.states = "d50,flow-constant", ""
    data = {"config": {"group_size": args.group_size, "groups": args.groups, "bins": args.bins,
                       "train_iterations": args.train_iterations, "cfg": CFG},
            "cells": {}}
    if args.json and os.path.exists(args.json):
        data = load(args.json)
        data["config"]["groups"] = max(data["config"]["groups"], args.groups)
    t0 = time.time()
    hosts = {}
    # the smoke run: one state per regime (the base model of the diffusion regime, the trained flow LoRA)
    cells = ([(r, s) for r in args.regimes.split(",") for s in args.states.split(",")] if args.states
             else [("d50", "base"), ("flow-constant", "trained")])
    for regime, state in cells:
        model = REGIMES[regime][0]
        if model not in hosts:
            hosts[model] = make_host(model, args.threads)
        run_cell(hosts[model], regime, state, args, data, args.json)
    data["wall_s"] = data.get("wall_s", 0.0) + time.time() - t0
    if args.json:
        save(args.json, data)
    print(f"wall {time.time() - t0:.0f} s")
    res = report(data, args.resamples)
    if args.smoke:
        vals = {f"{k} {a} {m}": v[m] for k, r in res.items() for a, v in r["arms"].items() for m in ("cos", "norm")}
        return _smoke.finish(args.json, split_grams(data, args.json)[0], vals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
