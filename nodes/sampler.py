"""PCPO Trajectory Sampler (records a rollout) and PCPO SDE Sampler (the same stochastic sampler as a
SAMPLER for SamplerCustom)."""
from __future__ import annotations

import copy
import math
import time
import uuid
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from comfyui_pcpo import distributed
from comfyui_pcpo.step_plan import (FLOW_NOISE_RULES, VARIANTS, StepPlan, check_training_schedule, diffusion_plan,
                                final_only_plan, flow_plan, prediction_from_denoised)
from comfyui_pcpo.rollout import make_trajectory, rollout, windowed_rollout
from comfyui_pcpo.sde_window import WINDOW_SCHEDULES, place_window
from comfyui_pcpo.run_state import rollout_generator, step_noise_seed
from comfyui_pcpo.trajectory import Trajectory
from comfyui_pcpo.validate import memory_error, memory_estimate

from .validation import check_prompt, verdict
from .model_hooks import ModelFamily, interrupted, lora_multiplier, run_in_guider, training_flag


MIN_ETA = 0.1  # lower noise levels make the policy ratio (and KL, gradient norms) blow up as 1/eta


@dataclass
class RolloutBatch:
    """What flows on a PCPO_TRAJECTORY socket: the core record plus what the gradient pass needs
    to rebuild the model call (per-group conditioning, cfg, latent shape)."""
    traj: Trajectory
    group_conds: list           # per group: (positive, negative) CONDITIONING
    cfg: float
    latent_shape: tuple         # (C, H, W) of one sample
    run_name: str
    iteration: int
    uid: str
    family: ModelFamily
    session_token: str = ""
    started: float = 0.0        # wall-clock time (time.time()) the rollout began: the iteration's start

    @property
    def prompts(self) -> list:
        return self.traj.sample_prompts()


def make_plan(family: ModelFamily, sigmas, eta: float, variant: str, flow_rule: str, window=None) -> StepPlan:
    if family.kind == "diffusion":
        return diffusion_plan(sigmas, eta=eta, variant=variant, window=window)
    return flow_plan(sigmas, noise_rule=flow_rule, level=eta, variant="uw-lambda" if variant == "uw-lambda" else "native",
                     window=window)


# ComfyUI's deterministic k-diffusion samplers (no noise added after the initial one), in the order
# offered; a host that lacks one does not offer it
ODE_SAMPLER_CANDIDATES = ("euler", "heun", "dpmpp_2m", "dpm_2", "lms", "ipndm", "deis", "res_multistep")


def ode_samplers() -> list:
    """The deterministic samplers this host has, by ComfyUI's names."""
    import comfy.k_diffusion.sampling as kds
    return [n for n in ODE_SAMPLER_CANDIDATES if callable(getattr(kds, f"sample_{n}", None))]


def k_solver(name: str, predict, on_step=None):
    """``comfyui_pcpo.rollout.OdeFn`` running ComfyUI's sampler function ``sample_<name>`` on a grid
    segment with the guider's model call (``predict.k_model``: as KSampler runs it); ``on_step()``
    after each step (progress, Cancel)."""
    import comfy.k_diffusion.sampling as kds
    fn = getattr(kds, f"sample_{name}", None)
    if name not in ODE_SAMPLER_CANDIDATES or fn is None:
        raise ValueError(f"ode_sampler {name!r} is not a deterministic sampler of this ComfyUI; choose one of "
                         f"{', '.join(ode_samplers())}")

    def solve(x, segment):
        cb = (lambda _d: on_step()) if on_step is not None else None
        return fn(predict.k_model, x, segment.to(x.device, torch.float32), extra_args=predict.extra_args,
                  callback=cb, disable=True)
    return solve


def latent_shape_for(model, latent, width: int, height: int) -> tuple:
    if latent is not None:
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if samples.ndim != 4:
            raise ValueError(f"LATENT must be a batch of images (B, C, H, W); got shape {tuple(samples.shape)}")
        return tuple(samples.shape[1:])
    fmt = model.model.latent_format
    ds = int(getattr(fmt, "spacial_downscale_ratio", 8))
    if width % ds or height % ds:
        raise ValueError(f"width and height must be multiples of {ds} for this model (got {width}x{height})")
    return (int(fmt.latent_channels), height // ds, width // ds)


def available_memory(device) -> tuple:
    """(host bytes available or None, device bytes free or None, whether the device computes in host
    memory).  Host: psutil's available virtual memory when psutil is installed.  CUDA: free memory
    plus what torch holds reserved but unused."""
    host = None
    try:
        import psutil
        host = int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unable to read: the host part is not checked
        host = None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu":
        return host, host, True
    if dev.type == "cuda" and torch.cuda.is_available():
        try:
            free, _total = torch.cuda.mem_get_info(dev)
            free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            return host, int(free), False
        except Exception:
            return host, None, False
    return host, None, False


def prompt_micro_batch(prompt) -> int | None:
    """The largest constant micro_batch of the PCPO LoRA Update nodes in the queued prompt."""
    found = []
    for node in (prompt or {}).values() if isinstance(prompt, dict) else ():
        if isinstance(node, dict) and node.get("class_type") == "PCPOLoRAUpdate":
            mb = (node.get("inputs") or {}).get("micro_batch")
            if isinstance(mb, int) and not isinstance(mb, bool):
                found.append(mb)
    return max(found) if found else None


def check_memory(session, groups: int, group_size: int, steps: int, shape: tuple, cfg: float,
                 micro_batch: int | None) -> None:
    """Refuse, before sampling, an iteration whose recorded rollout or gradient pass cannot fit
    (``comfyui_pcpo.validate.memory_estimate``: a lower bound), naming the inputs to lower."""
    model = session.model
    try:
        model_bytes = int(session.base_model.model_size())
    except Exception:
        model_bytes = 0
    elements = int(math.prod(shape))
    est = memory_estimate(groups * group_size, steps, elements, model_bytes, micro_batch, guided=cfg != 1.0,
                          checkpointing=bool(getattr(session.options, "checkpointing", False)))
    host, dev, same = available_memory(getattr(model, "load_device", None))
    sizes = (f"{groups} groups x group_size {group_size} x {steps} steps x latent {'x'.join(map(str, shape))}"
             + (f", micro_batch {micro_batch}" if micro_batch else ""))
    err = memory_error(est, host, dev, sizes, same_memory=same)
    if err:
        raise ValueError(f"PCPO Trajectory Sampler: {err}. Nothing was sampled")


def start_latents(model, latent, groups: int) -> list:
    """Per group, the (1, C, H, W) latent the rollout starts from before the noise is added: the
    LATENT's image in the model's latent space (``process_latent_in``), as ComfyUI's samplers use it,
    or None (zeros) for no LATENT or an empty one (ComfyUI never shifts an empty latent).  One image
    serves every group; a batch gives one image per group."""
    if latent is None:
        return [None] * groups
    if latent.get("noise_mask") is not None:
        raise ValueError("the Trajectory Sampler does not inpaint: remove the noise_mask from the LATENT "
                         "(no Set Latent Noise Mask / inpaint encode before it)")
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if torch.count_nonzero(samples) == 0:
        return [None] * groups
    B = int(samples.shape[0])
    if B not in (1, groups):
        raise ValueError(f"LATENT has {B} images for {groups} groups: give 1 image (every group starts from it) "
                         f"or one per group ({groups})")
    x = model.model.process_latent_in(samples.float().cpu())
    return [x[:1]] * groups if B == 1 else list(x.split(1))


FLOW_NOISE_TOOLTIP = ("Flow models (SD3, FLUX) only; SD1.x/SDXL ignore it. How the added noise is spread over the "
                      "steps. constant (pick this): the same noise level eta at every step (DanceGRPO). flow-grpo: "
                      "eta*sqrt(t/(1-t)) as in Flow-GRPO, a lot of noise in the early, blurry steps and little in "
                      "the last, detailed ones; use eta near 0.7 with it.")


def policy_and_base(plan: StepPlan, predict, adapters: dict):
    """The kernel's prediction (eps / v) of the policy and of the base model (every adapter at 0),
    from a guider's denoised-x0 predictor ``predict(x, sigma)``."""
    def pred(x, s):
        return prediction_from_denoised(plan, x, predict(x, s), s)

    def ref(x, s):
        with lora_multiplier(adapters, 0.0):
            return pred(x, s)
    return pred, ref


def step_progress(pbar):
    """A rollout callback: one step of ComfyUI's progress bar, and Cancel honoured after each step."""
    def step_cb(i, _x_next):
        pbar.update(1)
        interrupted()
    return step_cb


class PCPOTrajectorySampler:
    CATEGORY = "PCPO"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "PCPO_TRAJECTORY")
    RETURN_NAMES = ("latent", "trajectory")
    OUTPUT_TOOLTIPS = ("Final samples of every group (decode with VAE Decode, then score).",
                       "The recorded rollout for the PCPO LoRA Update.")
    DESCRIPTION = ("Samples groups of images with the training policy (stochastic DDIM for eps/v models, the "
                   "reverse SDE for flow models) and records every transition. All samples of a group share one "
                   "prompt and one initial noise. With a sampler wired in (for awm / nft), it samples with that "
                   "sampler instead, each sample from its own noise, and records only the final images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "session": ("PCPO_SESSION", {"tooltip": "From PCPO LoRA: samples with the live LoRA."}),
            "steps": ("INT", {"default": 20, "min": 2, "max": 200, "tooltip": "Sampling steps (reference: 50 for SD1.5, 16 for FLUX)."}),
            "cfg": ("FLOAT", {"default": 4.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip":
                              "Classifier-free guidance scale (reference: 5). The policy is the guided prediction."}),
            "group_size": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip":
                                   "Samples per prompt (reference: 12-16); at least 2. They start from one initial noise "
                                   "and differ by the noise the steps add; with a sampler wired in, each starts from "
                                   "its own noise."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip":
                             "Base seed; each iteration and group derive their own noise from it."}),
            "eta": ("FLOAT", {"default": 1.0, "min": MIN_ETA, "max": 1.0, "step": 0.01, "tooltip":
                              "How much fresh random noise every sampling step adds. Training needs it: the LoRA "
                              "learns which of these random turns led to a better reward. SD1.x/SDXL: keep 1 (the "
                              "reference, like DDPM). Flow models (SD3, FLUX): the noise level of their SDE, 0.3 "
                              "with flow_noise_rule constant (DanceGRPO), 0.7 with flow-grpo (Flow-GRPO). Lower "
                              "values give cleaner rollouts but a shakier update: below 0.3 the update warns, as "
                              "its KL and gradients grow like 1/eta."}),
            "rollout_variant": (list(VARIANTS), {"default": "uw-sigma", "tooltip":
                                "How the rollout adds noise. uw-sigma (pick this for SD1.x/SDXL): the PCPO "
                                "reference, noise reshaped so every step weighs the same in the loss. uw-lambda: the "
                                "exact equal weighting, twice the model calls per step. native: plain DDIM noise. "
                                "Flow models (SD3, FLUX) use their own SDE: uw-lambda applies there, uw-sigma and "
                                "native both mean the plain flow SDE."}),
            "flow_noise_rule": (list(FLOW_NOISE_RULES), {"default": "constant", "tooltip": FLOW_NOISE_TOOLTIP}),
            "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"default": "simple", "tooltip":
                          "Sigma schedule (ignored when SIGMAS are wired). ddim_uniform matches SD1.5 DDIM."}),
            "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Image width (ignored with a LATENT)."}),
            "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": "Image height (ignored with a LATENT)."}),
            "groups": ("INT", {"default": 2, "min": 1, "max": 256, "tooltip":
                               "Groups per iteration when plain CONDITIONING is wired (with PCPO Prompts, its "
                               "prompts_per_iteration sets the number of groups)."}),
        }, "optional": {
            "prompts": ("PCPO_PROMPTS", {"tooltip": "Training prompts (PCPO Prompts). Or wire positive/negative."}),
            "positive": ("CONDITIONING", {"tooltip": "Single-prompt run: the positive conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "Single-prompt run: the negative conditioning."}),
            "latent": ("LATENT", {"tooltip": "Sets the sample size. An image (VAE Encode) is the start of every "
                                  "rollout, as in KSampler/SamplerCustom: noise scaled to the first sigma is added "
                                  "to it (img2img with SIGMAS that start below the model's sigma_max). 1 image for "
                                  "every group, or one per group; an empty latent only sets the size."}),
            "sigmas": ("SIGMAS", {"tooltip": "A custom schedule (overrides steps/scheduler). It must end at 0 and "
                                  "have 2 or more steps. One that starts below sigma_max (SplitSigmas second half, "
                                  "denoise below 1) denoises the LATENT from noise * sigmas[0]; without a LATENT image "
                                  "it starts from that noise alone, as KSampler does with an empty latent."}),
            "sde_window": ("PCPO_SDE_WINDOW", {"tooltip": "Faster iterations: wire PCPO SDE Window to make only a few "
                           "steps random and trained, the rest a fast deterministic sampler. Unwired: every step "
                           "is random and trained (the original PCPO rollout)."}),
            "sampler": ("SAMPLER", {"tooltip": "For the LoRA Update objectives awm and nft only: sample with this "
                        "ComfyUI sampler (KSamplerSelect: euler, dpmpp_2m, ...) and record just the final images, "
                        "which is all those objectives train on. pcpo, grpo-clip and ddpo need the recorded random "
                        "steps: leave it unwired for them."}),
        }, "hidden": {"prompt": "PROMPT"}}

    @classmethod
    def VALIDATE_INPUTS(cls, cfg=None, eta=None):
        """The FLOAT inputs, checked when the prompt is queued (finite and in range: see nodes/validation.py)."""
        return verdict(cls, cfg=cfg, eta=eta)

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")  # every queue is a new rollout of the live policy

    def sample(self, session, steps, cfg, group_size, seed, eta, rollout_variant, flow_noise_rule, scheduler,
               width, height, groups, prompts=None, positive=None, negative=None, latent=None, sigmas=None,
               sde_window=None, sampler=None, prompt=None):
        check_prompt(prompt, getattr(session, "run_name", None))  # the first node that runs every iteration
        if group_size < 2:
            raise ValueError("group_size must be at least 2: PCPO compares samples of the same prompt "
                             "(group-relative advantages); use 4 or more")
        if not eta >= MIN_ETA:
            raise ValueError(f"eta {eta:g} is below {MIN_ETA:g}: at such low noise the policy ratio is ill-conditioned "
                             "(KL and gradient norms grow as 1/eta); use 0.3-1.0")
        session = session.live()
        session.commit_pending()  # an iteration whose finishing node did not run: commit it before sampling
        started = time.time()
        try:
            with training_flag():  # the numerics of the gradient pass
                out = self._sample(session, steps, cfg, group_size, seed, eta, rollout_variant, flow_noise_rule,
                                   scheduler, width, height, groups, prompts, positive, negative, latent, sigmas,
                                   prompt_micro_batch(prompt), sde_window, sampler)
            out[1].started = started
            return out
        except comfy.model_management.InterruptProcessingException:
            session.save_if_dirty()  # Cancel: the run on disk is the run in memory
            raise

    def _sample(self, session, steps, cfg, group_size, seed, eta, rollout_variant, flow_noise_rule, scheduler,
                width, height, groups, prompts, positive, negative, latent, sigmas, micro_batch=None, window=None,
                sampler=None):
        model = session.model
        fam = session.family
        ms = model.get_model_object("model_sampling")
        if sigmas is None:
            sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps)
        sig = torch.as_tensor(sigmas).detach().double().cpu()
        plan = check_training_schedule(make_plan(fam, sig, eta, rollout_variant, flow_noise_rule))
        shape = latent_shape_for(model, latent, width, height)
        iteration = session.iteration
        if sampler is not None and window:
            raise ValueError("wire either a PCPO SDE Window (pcpo, grpo-clip, ddpo) or a SAMPLER (awm, nft) into the "
                             "Trajectory Sampler, not both")
        window = dict(window or {})
        solver = window.pop("solver", "euler")
        win = place_window(window.get("size", 0), plan.num_steps, window.get("schedule", "fixed"), iteration, seed,
                           window.get("start", 0), window.get("slide_every", 1))
        if win is not None:  # only the window's steps are stochastic, recorded and trained
            k_solver(solver, None)  # an unknown solver fails before any work
            plan = make_plan(fam, sig, eta, rollout_variant, flow_noise_rule, window=win)

        rank, world = distributed.context()
        if prompts is not None:
            if world > 1:  # this rank's share of the global draw (world x prompts_per_iteration)
                source = copy.copy(prompts)
                source.per_iteration = prompts.per_iteration * world
                texts = distributed.rank_slice(source.draw(iteration), rank, world)
            else:
                texts = prompts.draw(iteration)
            neg = negative if negative is not None else prompts.encode(prompts.negative)
            conds = [(prompts.encode(t), neg) for t in texts]
        elif positive is not None:
            if negative is None and cfg != 1.0:
                raise ValueError("wire a negative CONDITIONING (e.g. an empty prompt) or set cfg to 1")
            texts = [""] * int(groups)
            conds = [(positive, negative if negative is not None else positive)] * int(groups)
        else:
            raise ValueError("wire either PCPO Prompts or positive/negative CONDITIONING into the Trajectory Sampler")

        if sampler is not None:  # a final-only rollout, for the forward-process objectives
            return self._sample_final(session, sampler, sig, shape, conds, texts, int(group_size), seed, cfg, latent,
                                      micro_batch, iteration)
        check_memory(session, len(conds), int(group_size), plan.num_steps, shape, float(cfg), micro_batch)
        starts = start_latents(model, latent, len(conds))
        G = int(group_size)
        sigma0 = float(sig[0])
        max_denoise = math.isclose(float(ms.sigma_max), sigma0, rel_tol=1e-5) or sigma0 > float(ms.sigma_max)
        pbar = comfy.utils.ProgressBar(len(conds) * (plan.window.grid_steps if plan.window else plan.num_steps))
        records, finals = [], []
        first_group = distributed.group_offset(len(conds))  # groups are disjoint across ranks
        for g, (pos, neg) in enumerate(conds):
            gen = rollout_generator(seed, iteration, first_group + g)
            noise = torch.randn((1, *shape), generator=gen).repeat(G, *([1] * len(shape)))
            base = torch.zeros_like(noise) if starts[g] is None else starts[g].repeat(G, *([1] * len(shape)))
            x_init = ms.noise_scaling(torch.tensor(sigma0), noise, base, max_denoise)  # as KSAMPLER.sample

            def fn(predict, x_init=x_init, gen=gen):
                pred, ref = policy_and_base(plan, predict, session.adapters)
                ode = k_solver(solver, predict, lambda: step_progress(pbar)(0, None)) if win is not None else None
                return windowed_rollout(pred, plan, sig, x_init.to(model.load_device), gen, ode=ode, predict_ref=ref,
                                        callback=step_progress(pbar))

            xf, rec = run_in_guider(model, pos, neg, cfg, (G, *shape), sig.float(), fn, seed=seed)
            records.append(rec)
            xf = ms.inverse_noise_scaling(torch.tensor(float(sig[-1])), xf)
            finals.append(model.model.process_latent_out(xf.float()).cpu())
        gid = torch.arange(len(conds)).repeat_interleave(G)
        traj = make_trajectory(records, plan, gid, gid, texts,
                               {"arch": fam.arch, "cfg": cfg, "seed": seed, "iteration": iteration,
                                "variant": rollout_variant, "eta": eta, "flow_noise_rule": flow_noise_rule,
                                "sde_window": win.to_dict() if win is not None else None,
                                "ode_sampler": solver if win is not None else None, "group_offset": first_group})
        traj = traj.pin_memory()  # stays on the CPU; each micro-batch moves to the device in the update
        batch = RolloutBatch(traj, conds, float(cfg), shape, session.run_name, iteration, uuid.uuid4().hex, fam,
                             session.token)
        return ({"samples": torch.cat(finals, 0)}, batch)


    def _sample_final(self, session, sampler, sig, shape, conds, texts, G, seed, cfg, latent, micro_batch, iteration):
        """Each group sampled by a ComfyUI SAMPLER through ``comfy.sample.sample_custom`` (as
        SamplerCustom runs it); only the final latents are recorded (in the model's latent space, the
        forward process's x0).  Unlike the SDE rollout, every sample of a group starts from its own
        initial noise: a deterministic sampler (euler, dpmpp_2m) maps one noise to one image, and a group
        of equal images has no advantage to learn from.  A stochastic sampler's step noise is seeded per
        group and iteration too (never the initial noise's draw)."""
        model, fam = session.model, session.family
        check_memory(session, len(conds), G, 1, shape, float(cfg), micro_batch)
        raw = None
        if latent is not None:
            if latent.get("noise_mask") is not None:
                raise ValueError("the Trajectory Sampler does not inpaint: remove the noise_mask from the LATENT")
            raw = comfy.sample.fix_empty_latent_channels(model, latent["samples"]).float().cpu()
            if int(raw.shape[0]) not in (1, len(conds)):
                raise ValueError(f"LATENT has {int(raw.shape[0])} images for {len(conds)} groups: give 1 image or one "
                                 f"per group ({len(conds)})")
        pbar = comfy.utils.ProgressBar(len(conds) * (sig.numel() - 1))
        first_group = distributed.group_offset(len(conds))
        records, finals = [], []
        for g, (pos, neg) in enumerate(conds):
            gen = rollout_generator(seed, iteration, first_group + g)
            noise = torch.randn((G, *shape), generator=gen)
            base = torch.zeros_like(noise) if raw is None else raw[min(g, raw.shape[0] - 1):][:1].repeat(
                G, *([1] * len(shape)))

            def cb(*_a):
                pbar.update(1)
                interrupted()
            out = comfy.sample.sample_custom(model, noise, float(cfg), sampler, sig.float(), pos, neg, base,
                                             callback=cb, disable_pbar=True, seed=step_noise_seed(gen.initial_seed()))
            out = out.float().cpu()
            finals.append(out)
            x0 = model.model.process_latent_in(out)
            records.append({"latents": x0.unsqueeze(1), "eps_old": x0.new_zeros((G, 0, *shape)),
                            "pred_old": x0.new_zeros((G, 0, *shape))})
        gid = torch.arange(len(conds)).repeat_interleave(G)
        plan = final_only_plan(fam.kind, sig)
        traj = make_trajectory(records, plan, gid, gid, texts,
                               {"arch": fam.arch, "cfg": cfg, "seed": seed, "iteration": iteration,
                                "variant": "final", "eta": 1.0, "sde_window": None, "ode_sampler": None,
                                "sampler": "comfyui", "group_offset": first_group})
        batch = RolloutBatch(traj.pin_memory(), conds, float(cfg), shape, session.run_name, iteration,
                             uuid.uuid4().hex, fam, session.token)
        return ({"samples": torch.cat(finals, 0)}, batch)

def pcpo_sample(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                variant="native", flow_noise_rule="constant"):
    """k-diffusion style sampler function: the PCPO rollout (``comfyui_pcpo.rollout``) without
    recording.  ComfyUI drew the initial noise ``x`` from the noise seed; the step noise comes
    from a seed derived from it (``step_noise_seed``), so it is a different draw."""
    extra_args = {} if extra_args is None else extra_args
    ms = model.inner_model.inner_model.model_sampling
    import comfy.model_sampling as MS
    fam = ModelFamily("flow" if isinstance(ms, MS.CONST) else "diffusion", "", "")
    plan = make_plan(fam, sigmas.detach().double().cpu(), eta, variant, flow_noise_rule)
    gen = torch.Generator().manual_seed(step_noise_seed(int(extra_args.get("seed", 0) or 0)))
    last = {}

    def pred(xx, s):
        last["x"], last["denoised"] = xx, model(xx, s, **extra_args)
        return prediction_from_denoised(plan, xx, last["denoised"], s)

    def step_cb(i, _x_next):
        if callback is not None:
            callback({"x": last["x"], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": last["denoised"]})

    return rollout(pred, plan, x, gen, record=False, callback=step_cb)[0]


class PCPOSampler:
    CATEGORY = "PCPO"
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The PCPO rollout sampler, for SamplerCustom / SamplerCustomAdvanced.",)
    DESCRIPTION = "The stochastic sampler PCPO trains with (DDIM(eta) / uw-sigma / flow SDE), as a SAMPLER."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "eta": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                              "How much fresh random noise every step adds: 1 is fully random (like DDPM or "
                              "euler_ancestral), values near 0 approach plain DDIM (the same image every time). "
                              "Flow models (SD3, FLUX): the noise level of their SDE. To see images as training "
                              "made them, use the Trajectory Sampler's eta."}),
            "rollout_variant": (["uw-sigma", "native"], {"default": "native", "tooltip":
                                "native (pick this to sample with a trained LoRA): plain DDIM(eta), like "
                                "euler_ancestral. uw-sigma: the noise PCPO trains with (SD1.x/SDXL), to see the "
                                "rollouts exactly as training sampled them. Flow models (SD3, FLUX) use their own "
                                "SDE either way."}),
            "flow_noise_rule": (list(FLOW_NOISE_RULES), {"default": "constant", "tooltip": FLOW_NOISE_TOOLTIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, eta=None):
        """The FLOAT inputs, checked when the prompt is queued (finite and in range: see nodes/validation.py)."""
        return verdict(cls, eta=eta)

    def get_sampler(self, eta, rollout_variant, flow_noise_rule):
        return (comfy.samplers.KSAMPLER(pcpo_sample, {"eta": eta, "variant": rollout_variant,
                                                      "flow_noise_rule": flow_noise_rule}),)


class PCPOSDEWindow:
    CATEGORY = "PCPO"
    FUNCTION = "window"
    RETURN_TYPES = ("PCPO_SDE_WINDOW",)
    RETURN_NAMES = ("sde_window",)
    OUTPUT_TOOLTIPS = ("Into the Trajectory Sampler's sde_window input.",)
    DESCRIPTION = ("Faster iterations (MixGRPO): only a few sampling steps add noise, are recorded and are trained; "
                   "every other step runs a fast deterministic ComfyUI sampler. The LoRA Update then trains those "
                   "few steps instead of all of them, so an iteration takes a fraction of the time. Steps count as "
                   "in KSampler; the last step is never in the window.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "window_steps": ("INT", {"default": 3, "min": 1, "max": 200, "tooltip":
                                     "How many steps are random and trained (2-4 is typical). The more, the more "
                                     "each iteration learns and the longer it takes; as many as the sampler's steps "
                                     "minus 1 means every step (the original PCPO rollout)."}),
            "schedule": (list(WINDOW_SCHEDULES), {"default": "sliding", "tooltip":
                         "Where the window sits in each iteration. sliding (MixGRPO): starts at window_start and "
                         "moves one step later every slide_every iterations, wrapping around. random: a new random "
                         "place every iteration. fixed: always at window_start."}),
            "window_start": ("INT", {"default": 0, "min": 0, "max": 199, "tooltip":
                                     "First random step of the window (0 = the first, noisiest step). fixed: where "
                                     "the window stays; sliding: where it begins; random: unused."}),
            "slide_every": ("INT", {"default": 5, "min": 1, "max": 10000, "tooltip":
                                    "sliding only: the window moves one step later every this many iterations. "
                                    "Resumed runs continue where they were (it follows the run's iteration count)."}),
            "ode_sampler": (ode_samplers(), {"default": "euler", "tooltip":
                            "The deterministic ComfyUI sampler for the steps outside the window. euler and dpmpp_2m "
                            "cost one model call per step; heun and dpm_2 two (more accurate at few steps)."}),
        }}

    def window(self, window_steps, schedule, window_start, slide_every, ode_sampler):
        place_window(window_steps, 10 ** 6, schedule, 0, 0, 0, slide_every)  # the inputs alone, checked now
        k_solver(ode_sampler, None)
        return ({"size": int(window_steps), "schedule": schedule, "start": int(window_start),
                 "slide_every": int(slide_every), "solver": ode_sampler},)


NODE_CLASS_MAPPINGS = {"PCPOTrajectorySampler": PCPOTrajectorySampler, "PCPOSampler": PCPOSampler,
                       "PCPOSDEWindow": PCPOSDEWindow}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOTrajectorySampler": "PCPO Trajectory Sampler",
                              "PCPOSampler": "PCPO SDE Sampler (for SamplerCustom)",
                              "PCPOSDEWindow": "PCPO SDE Window (faster iterations)"}
