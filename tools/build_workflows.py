#!/usr/bin/env python
"""Generate the shipped example workflows (``workflows/``) from the Python descriptions below.

    . /work/venv/bin/activate           # or any env with the test requirements
    python tools/build_workflows.py            # (re)write workflows/*.json and workflows/api/*.json
    python tools/build_workflows.py --check    # exit 1 if a shipped file differs from the generator

The script runs a real ComfyUI in-process (``tools/comfyui_host.py``: the cached 0.3.75, fetched and
installed when missing, or ``$PCPO_COMFYUI_DIR``) and loads this repository as a custom node pack
through ComfyUI's own loader (``comfyui_host.load_pack_folder``).  Every node's widget order is
read from its live ``INPUT_TYPES`` (required then optional, widget types only: INT, FLOAT, STRING,
BOOLEAN, combo lists), so ``widgets_values`` always match what the frontend expects, including the
extra ``control_after_generate`` value the frontend stores right after an INT input named ``seed``
or ``noise_seed`` (or any input declaring ``control_after_generate``).

For every workflow two files are written:

* ``workflows/<name>.json``      the LiteGraph/UI format the ComfyUI frontend loads (drag & drop);
* ``workflows/api/<name>.json``  the API format (POST it as ``{"prompt": ...}`` to ``/prompt``).

The API file is built straight from the description; ``ui_to_api`` (used by the tests) converts the
UI file the way the frontend's "Export (API)" does, and the two must agree.

The shipped files are generated with ComfyUI ``GENERATED_WITH`` (0.3.75, what CI runs).  On another
version, ``--check`` and the tests compare them up to what that version's node metadata decides
(default titles, extra unconnected outputs of core nodes: ``host_independent``), and writing them
needs ``--any-version``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"

# the ComfyUI the shipped files are generated with (the one CI runs); on another version the files
# are compared without what depends on the host's version (see ``host_independent``)
GENERATED_WITH = "0.3.75"

# node types that exist only in the frontend (no backend class; never part of an API prompt)
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")

MODEL_URLS = {
    "v1-5-pruned-emaonly.safetensors": (
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors",
        "checkpoints"),
    "sd_xl_base_1.0.safetensors": (
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
        "checkpoints"),
    "flux1-dev.safetensors": (
        "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors", "diffusion_models"),
    "clip_l.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors", "text_encoders"),
    "t5xxl_fp16.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors", "text_encoders"),
    "ae.safetensors": (
        "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
        "vae"),
}


# =========================================================================== node definitions

@dataclass
class InputSpec:
    name: str
    type: str                 # "INT", "FLOAT", ..., "COMBO" for lists, or a socket type
    options: dict
    optional: bool
    choices: list | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def control_values(self) -> int:
        """How many extra values the frontend stores after this widget (control_after_generate)."""
        if not self.is_widget:
            return 0
        if self.type == "INT":
            return 1 if self.options.get("control_after_generate", self.name in SEED_NAMES) else 0
        if self.options.get("control_after_generate"):
            return 2 if self.type == "COMBO" else 1   # combos also get a "control_filter_list" value
        return 0

    def default(self):
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.choices[0] if self.choices else ""
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)


def parse_input_types(input_types: dict) -> list[InputSpec]:
    """INPUT_TYPES -> ordered InputSpecs (required then optional; hidden inputs dropped)."""
    out = []
    for section, optional in (("required", False), ("optional", True)):
        for name, spec in (input_types.get(section) or {}).items():
            spec = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
            t = spec[0]
            opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
            choices = None
            if isinstance(t, (list, tuple)):
                choices, t = list(t), "COMBO"
            elif t == "COMBO":
                choices = list(opts.get("options", []))
            out.append(InputSpec(name, str(t), opts, optional, choices))
    return out


@dataclass
class NodeDef:
    """What the generator and the converter need to know about one node class."""
    inputs: list[InputSpec]
    outputs: list[str]
    output_names: list[str]

    @property
    def widgets(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.is_widget]

    @property
    def sockets(self) -> list[InputSpec]:
        return [i for i in self.inputs if not i.is_widget]

    def widget_value_count(self) -> int:
        return sum(1 + w.control_values for w in self.widgets)


def comfy_node_defs() -> Callable[[str], NodeDef]:
    """A lookup class_type -> NodeDef over ComfyUI's live NODE_CLASS_MAPPINGS."""
    import nodes  # ComfyUI's nodes.py (load_comfy ran)

    cache: dict = {}

    def get(class_type: str) -> NodeDef:
        if class_type not in cache:
            cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
            if cls is None:
                raise KeyError(f"node type {class_type!r} is not registered in this ComfyUI")
            outs = [str(t) if not isinstance(t, (list, tuple)) else "COMBO" for t in cls.RETURN_TYPES]
            names = list(getattr(cls, "RETURN_NAMES", None) or outs)
            cache[class_type] = NodeDef(parse_input_types(cls.INPUT_TYPES()), outs, names)
        return cache[class_type]

    return get


# =========================================================================== descriptions

@dataclass
class N:
    """One node of a workflow description.

    ``links``: input name -> (source node id, source output slot).  ``widgets``: widget name ->
    value (unspecified widgets take their INPUT_TYPES default; ``control_after_generate`` values are
    "fixed").  Frontend-only nodes (MarkdownNote) carry ``text`` instead."""
    id: int
    type: str
    pos: tuple
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    title: str | None = None
    size: tuple | None = None
    text: str | None = None
    color: str | None = None
    bgcolor: str | None = None


@dataclass
class Workflow:
    name: str
    title: str
    summary: str
    nodes: list
    groups: list = field(default_factory=list)   # (title, [x, y, w, h], color)
    view: tuple | None = None   # ids of the nodes the opened view shows whole (None: every node)


ANIMALS = "\n".join([
    "# one prompt per line; each iteration draws prompts_per_iteration of them",
    "a photo of a cat", "a photo of a dog", "a photo of a horse", "a photo of a rabbit",
    "a photo of a fox", "a photo of an owl", "a photo of a deer", "a photo of a tiger",
    "a photo of a penguin", "a photo of a frog", "a photo of a koala", "a photo of a butterfly",
])
NEGATIVE = "blurry, low quality, watermark, text"

LOOP_NOTE = (
    "## PCPO reinforcement learning of a LoRA\n\n"
    "Press **Queue** once: every queued prompt is one iteration (sample a group of images per "
    "prompt -> decode -> score -> update the LoRA -> export), and **PCPO LoRA Update** puts the "
    "workflow back on the queue until `iterations_per_queue` iterations have run. **Cancel** "
    "(the running prompt's cancel button, or Ctrl+Alt+Enter) stops the loop; clearing the queue does "
    "not, because the next iteration is queued only when the current one has finished. Queueing again "
    "continues the same run. The Update node shows the latest stats and a running mean of the reward.\n\n"
    "* The run lives in `output/pcpo/<run_name>/` (checkpoint after every `checkpoint_every` "
    "iterations): after a restart, the same `run_name` resumes. A new `run_name` starts a new run.\n"
    "* The trained LoRA is written to `models/loras/<filename>.safetensors` by **PCPO Export LoRA**; "
    "load it with a normal **LoraLoader**.\n"
    "* Keep the seeds on `fixed`: the sampler derives fresh noise from seed + iteration itself.\n"
    "* Out of memory? Lower `micro_batch` (LoRA Update), then `group_size` or the image size.\n"
)


def _sd_workflow(name, title, summary, ckpt, run_name, size, steps, group_size, prompts_per_iteration,
                 micro_batch, learning_rate, extra_note="") -> Workflow:
    nodes = [
        N(1, "CheckpointLoaderSimple", (40, 180), {"ckpt_name": ckpt}),
        N(2, "PCPOLoRA", (420, 60), {
            "run_name": run_name, "rank": 16, "alpha": 16.0, "target_layers": "attention",
            "learning_rate": learning_rate, "optimizer": "AdamW", "weight_decay": 1e-4, "seed": 0,
            "resume": True}, {"model": (1, 0)}),
        N(3, "PCPOPrompts", (420, 480), {
            "prompts": ANIMALS, "prompt_file": "(none)", "negative_prompt": NEGATIVE,
            "prompts_per_iteration": prompts_per_iteration, "seed": 0}, {"clip": (1, 1)}, size=(400, 420)),
        N(4, "PCPOTrajectorySampler", (880, 60), {
            "steps": steps, "cfg": 5.0, "group_size": group_size, "seed": 0, "eta": 1.0,
            "rollout_variant": "uw-sigma", "flow_noise_rule": "constant", "scheduler": "ddim_uniform",
            "width": size, "height": size, "groups": prompts_per_iteration},
            {"session": (2, 1), "prompts": (3, 0)}),
        N(5, "VAEDecode", (1280, 60), {}, {"samples": (4, 0), "vae": (1, 2)}),
        N(6, "PreviewImage", (1280, 420), {}, {"images": (5, 0)}, size=(420, 420)),
        N(7, "PCPORewardScorer", (1280, 200), {"reward": "jpeg-compressibility", "prompt": ""},
          {"images": (5, 0), "trajectory": (4, 1)}),
        N(8, "PCPOLoRAUpdate", (1740, 60), {
            "objective": "pcpo", "clip_range": 1e-4, "advantage_clip": 5.0, "train_fraction": 1.0,
            "micro_batch": micro_batch, "grad_clip": 1.0, "updates_per_rollout": 2,
            "iterations_per_queue": 100, "checkpoint_every": 1},
            {"session": (2, 1), "trajectory": (4, 1), "rewards": (7, 0)}),
        N(9, "PCPOExportLoRA", (1740, 570), {
            "filename": f"pcpo/{run_name}", "dtype": "fp16", "also_diffusers": False},
            {"session": (2, 1), "stats": (8, 1)}),  # stats: export after this iteration's update
        N(10, "MarkdownNote", (40, 420), text=LOOP_NOTE + extra_note, size=(340, 520)),
    ]
    return Workflow(name, title, summary, nodes)


def sd15() -> Workflow:
    return _sd_workflow(
        "pcpo_sd15_jpeg_compressibility", "SD1.5: PCPO LoRA for JPEG compressibility",
        "Stable Diffusion 1.5 (`v1-5-pruned-emaonly.safetensors`), 512x512, 25 DDIM steps (ddim_uniform, "
        "eta 1, cfg 5), 2 prompts x 8 samples per iteration, rank-16 attention LoRA (alpha 16, lr 3e-4, "
        "AdamW), PCPO objective (clip range 1e-4, 2 updates per rollout), reward `jpeg-compressibility` "
        "(weight-free, DDPO's compressibility task), 100 iterations per Queue. Sized for a single "
        "consumer GPU (about 12 GB, an estimate; lower `micro_batch` if memory runs out).",
        "v1-5-pruned-emaonly.safetensors", "pcpo_sd15_jpeg", 512, 25, 8, 2, 4, 3e-4)


def sdxl() -> Workflow:
    return _sd_workflow(
        "pcpo_sdxl_jpeg_compressibility", "SDXL: PCPO LoRA for JPEG compressibility",
        "SDXL base 1.0 (`sd_xl_base_1.0.safetensors`), 1024x1024, 20 DDIM steps (eta 1, cfg 5), 1 prompt x "
        "4 samples per iteration, rank-16 attention LoRA (lr 1e-4), PCPO, reward `jpeg-compressibility`, "
        "micro batch 1, 100 iterations per Queue. Sized for a 24 GB GPU (an estimate); with less memory "
        "use 768x768.",
        "sd_xl_base_1.0.safetensors", "pcpo_sdxl_jpeg", 1024, 20, 4, 1, 1, 1e-4)


FLUX_NOTE = (
    "## FLUX.1-dev guidance\n\n"
    "FLUX.1-dev is guidance-distilled: the guidance strength is an input of the model, not classifier-free "
    "guidance. So the sampler runs with **cfg 1** (no negative pass; the negative prompt is unused) and the "
    "model gets the FLUX default guidance **3.5** (the same value the FluxGuidance node defaults to), "
    "because PCPO Prompts' conditioning carries no guidance value. For another guidance, or a single "
    "fixed prompt, wire CLIPTextEncode -> FluxGuidance into the sampler's `positive` input instead of "
    "`prompts` (keep cfg 1).\n\n"
    "Flow models use the reverse SDE: `eta` is its noise level (0.3, DanceGRPO's FLUX setting, with the "
    "`constant` rule). `train_fraction` 0.6 trains 60% of each trajectory's steps (reference).\n\n"
    "Memory (an estimate): the 16-bit FLUX weights alone take 24 GB, so plan for a GPU with 40 GB or more. "
    "The UNETLoader's fp8 weight_dtype and t5xxl_fp8_e4m3fn_scaled.safetensors lower that, but training "
    "on fp8 base weights is untested."
)


def flux() -> Workflow:
    run_name = "pcpo_flux_dev_jpeg"
    nodes = [
        N(1, "UNETLoader", (40, 60), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        N(2, "DualCLIPLoader", (40, 220), {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                           "type": "flux", "device": "default"}),
        N(3, "VAELoader", (40, 430), {"vae_name": "ae.safetensors"}),
        N(4, "PCPOLoRA", (420, 60), {
            "run_name": run_name, "rank": 16, "alpha": 16.0, "target_layers": "attention",
            "learning_rate": 1e-4, "optimizer": "AdamW", "weight_decay": 1e-4, "seed": 0, "resume": True},
            {"model": (1, 0)}),
        N(5, "PCPOPrompts", (420, 480), {
            "prompts": ANIMALS, "prompt_file": "(none)", "negative_prompt": "", "prompts_per_iteration": 1,
            "seed": 0}, {"clip": (2, 0)}, size=(400, 420)),
        N(6, "PCPOTrajectorySampler", (880, 60), {
            "steps": 16, "cfg": 1.0, "group_size": 4, "seed": 0, "eta": 0.3, "rollout_variant": "native",  # flow: uw-sigma = native
            "flow_noise_rule": "constant", "scheduler": "simple", "width": 512, "height": 512, "groups": 1},
            {"session": (4, 1), "prompts": (5, 0)}),
        N(7, "VAEDecode", (1280, 60), {}, {"samples": (6, 0), "vae": (3, 0)}),
        N(8, "PreviewImage", (1280, 420), {}, {"images": (7, 0)}, size=(420, 420)),
        N(9, "PCPORewardScorer", (1280, 200), {"reward": "jpeg-compressibility", "prompt": ""},
          {"images": (7, 0), "trajectory": (6, 1)}),
        N(10, "PCPOLoRAUpdate", (1740, 60), {
            "objective": "pcpo", "clip_range": 1e-4, "advantage_clip": 5.0, "train_fraction": 0.6,
            "micro_batch": 1, "grad_clip": 1.0, "updates_per_rollout": 2, "iterations_per_queue": 100,
            "checkpoint_every": 1}, {"session": (4, 1), "trajectory": (6, 1), "rewards": (9, 0)}),
        N(11, "PCPOExportLoRA", (1740, 570), {
            "filename": f"pcpo/{run_name}", "dtype": "bf16", "also_diffusers": False},
            {"session": (4, 1), "stats": (10, 1)}),
        N(12, "MarkdownNote", (40, 570), text=LOOP_NOTE, size=(340, 440)),
        N(13, "MarkdownNote", (880, 640), text=FLUX_NOTE, size=(360, 360)),
    ]
    return Workflow(
        "pcpo_flux_dev_jpeg_compressibility", "FLUX.1-dev: PCPO LoRA for JPEG compressibility",
        "FLUX.1-dev (UNETLoader `flux1-dev.safetensors`, DualCLIPLoader `clip_l` + `t5xxl_fp16` type flux, "
        "VAELoader `ae.safetensors`), 512x512, 16 steps of the flow SDE (eta 0.3, constant rule), cfg 1 "
        "(the model's built-in guidance 3.5 applies), 1 prompt x 4 samples per iteration, rank-16 attention "
        "LoRA (lr 1e-4), PCPO with train_fraction 0.6, reward `jpeg-compressibility`, bf16 export. Plan for a GPU "
        "with 40 GB or more in 16-bit (estimate).",
        nodes)


DEMO_NOTE = (
    "## The embedded demo (runs on a CPU)\n\n"
    "A tiny 32x32 pixel-space text-to-image model ships with the pack (PCPO Demo Model Loader). Its "
    "captions look like `a red circle on a blue background`; the base model gets the backgrounds right but "
    "paints the shape in the prompted colour only about half the time. The reward "
    "`prompt-colour-agreement` scores exactly that, and PCPO raises it in a few minutes on a CPU.\n\n"
    "Headless: `bash tools/demo.sh` runs this workflow in ComfyUI and writes a before/after grid, a "
    "reward curve and the LoRA."
)


def _demo_captions() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS
    return ("# captions the base model follows only sometimes (comfyui_pcpo/demo/shapes.py)\n"
            + "\n".join(TRAINING_CAPTIONS))


def demo() -> Workflow:
    run_name = "demo_tiny_pcpo"
    nodes = [
        N(1, "PCPODemoModelLoader", (40, 60), {}),
        N(2, "PCPOLoRA", (420, 60), {
            "run_name": run_name, "rank": 8, "alpha": 8.0, "target_layers": "attention+mlp",
            "learning_rate": 2e-3, "optimizer": "AdamW", "weight_decay": 0.0, "seed": 0, "resume": True},
            {"model": (1, 0)}),
        N(3, "PCPOPrompts", (420, 480), {
            "prompts": _demo_captions(), "prompt_file": "(none)", "negative_prompt": "",
            "prompts_per_iteration": 4, "seed": 0}, {"clip": (1, 1)}, size=(400, 420)),
        N(4, "PCPOTrajectorySampler", (880, 60), {
            "steps": 10, "cfg": 4.0, "group_size": 8, "seed": 0, "eta": 1.0, "rollout_variant": "uw-sigma",
            "flow_noise_rule": "constant", "scheduler": "simple", "width": 32, "height": 32, "groups": 1},
            {"session": (2, 1), "prompts": (3, 0)}),
        N(5, "VAEDecode", (1280, 60), {}, {"samples": (4, 0), "vae": (1, 2)}),
        N(6, "PCPORewardScorer", (1280, 200), {"reward": "prompt-colour-agreement", "prompt": ""},
          {"images": (5, 0), "trajectory": (4, 1)}),
        N(7, "PCPOLoRAUpdate", (1740, 60), {
            "objective": "pcpo", "clip_range": 1e-4, "advantage_clip": 5.0, "train_fraction": 0.5,
            "micro_batch": 8, "grad_clip": 1.0, "updates_per_rollout": 2, "iterations_per_queue": 30,
            "checkpoint_every": 5}, {"session": (2, 1), "trajectory": (4, 1), "rewards": (6, 0)}),
        N(8, "PCPOExportLoRA", (1740, 570), {
            "filename": f"pcpo/{run_name}", "dtype": "fp16", "also_diffusers": False},
            {"session": (2, 1), "stats": (7, 1)}),
        N(9, "PreviewImage", (1280, 420), {}, {"images": (5, 0)}, size=(420, 420)),
        N(10, "MarkdownNote", (40, 420), text=DEMO_NOTE + "\n\n" + LOOP_NOTE, size=(340, 560)),
    ]
    return Workflow(
        "demo_tiny_pcpo", "Demo: PCPO on the embedded tiny model (CPU)",
        "The embedded 1.4M-parameter 32x32 pixel-space demo model (PCPO Demo Model Loader), 10 DDIM steps "
        "(eta 1, cfg 4), 4 prompts x 8 samples per iteration, rank-8 LoRA on attention and MLP layers "
        "(lr 2e-3), PCPO on half of each trajectory's steps, reward `prompt-colour-agreement`, 30 iterations "
        "per Queue. Runs on a CPU in minutes; `bash tools/demo.sh` runs it headless.",
        nodes)


REWARD_NOTE = (
    "## Reward models\n\n"
    "The reward loader's files go into `models/pcpo_rewards/` as published (see the README's *Reward models*): "
    "the Reward Scorer scores with the `PCPO_REWARD` connected to `reward_model` (its `reward` list is then "
    "ignored). The reward model is loaded to the GPU for the scoring and given back to ComfyUI right after "
    "(`keep_loaded` off), so it does not stay next to the training run.\n"
)


def _with_reward(wf: Workflow, scorer_id: int, reward_nodes: list, reward_id: int, note_id: int,
                 note_pos: tuple = (880, 870), note_size: tuple = (360, 210)) -> Workflow:
    """``wf`` with extra reward nodes whose ``reward_id`` output feeds the scorer's ``reward_model``."""
    for node in wf.nodes:
        if node.id == scorer_id:
            node.links["reward_model"] = (reward_id, 0)
    wf.nodes += reward_nodes + [N(note_id, "MarkdownNote", note_pos, text=REWARD_NOTE, size=note_size)]
    return wf


def _variant(wf: Workflow, name: str, title: str, old_reward: str, new_reward: str) -> Workflow:
    """``wf`` renamed (workflow, run and export named ``name``) with ``old_reward`` replaced in its summary."""
    wf.name, wf.title, wf.summary = name, title, wf.summary.replace(old_reward, new_reward)
    for node in wf.nodes:
        if node.type == "PCPOLoRA":
            node.widgets["run_name"] = name
        elif node.type == "PCPOExportLoRA":
            node.widgets["filename"] = f"pcpo/{name}"
    return wf


def sd15_aesthetic() -> Workflow:
    wf = _variant(sd15(), "pcpo_sd15_aesthetic", "SD1.5: PCPO LoRA for the LAION aesthetic score",
                  "reward `jpeg-compressibility` (weight-free, DDPO's compressibility task)",
                  "reward: LAION aesthetic predictor v2 (DDPO's aesthetic task)")
    return _with_reward(wf, 7, [N(11, "PCPOAestheticReward", (880, 640), {
        "head": "sac+logos+ava1-l14-linearMSE.pth", "backbone": "pcpo_rewards/clip-vit-large-patch14",
        "precision": "auto", "batch_size": 8, "keep_loaded": False})], 11, 12)


def sdxl_pickscore() -> Workflow:
    wf = _variant(sdxl(), "pcpo_sdxl_pickscore", "SDXL: PCPO LoRA for PickScore", "reward `jpeg-compressibility`",
                  "reward PickScore v1 (logit_scale.exp() * cos)")
    return _with_reward(wf, 7, [N(11, "PCPOPickScoreReward", (880, 640), {
        "model": "pcpo_rewards/PickScore_v1", "convention": "pickscore (logit_scale.exp() * cos)",
        "precision": "auto", "batch_size": 4, "keep_loaded": False})], 11, 12)


TEXT_PROMPTS = "\n".join([
    "# the OCR reward scores the text in double quotes: every prompt needs one",
    'a wooden shop sign that says "OPEN"', 'a neon sign that reads "NIGHT CAFE"',
    'a poster with the title "SUMMER 2049"', 'a chalkboard menu that says "SOUP OF THE DAY"',
    'a street sign that says "MAIN ST"', 'a book cover with the title "THE LAST GARDEN"',
    'a coffee cup printed with "GOOD MORNING"', 'a banner that reads "WELCOME HOME"',
])


def flux_hps_ocr() -> Workflow:
    wf = _variant(flux(), "pcpo_flux_dev_hps_ocr", "FLUX.1-dev: PCPO LoRA for HPSv2.1 + OCR text accuracy",
                  "reward `jpeg-compressibility`",
                  "reward: PCPO Reward Mix of HPSv2.1 and OCR text accuracy (weights 1 and 1, each normalised "
                  "within its group), prompts with quoted text")
    for node in wf.nodes:
        if node.type == "PCPOPrompts":
            node.widgets["prompts"] = TEXT_PROMPTS
    wf = _with_reward(wf, 9, [
        N(14, "PCPOHPSReward", (880, 640), {"checkpoint": "HPS_v2.1_compressed.pt", "architecture": "ViT-H-14",
                                            "precision": "auto", "batch_size": 4, "keep_loaded": False}),
        N(15, "PCPOOCRReward", (880, 870), {"threads": 0}),
        N(16, "PCPORewardMix", (1280, 900), {"weight_1": 1.0, "weight_2": 1.0, "weight_3": 1.0, "weight_4": 1.0},
          {"reward_1": (14, 0), "reward_2": (15, 0)}),
    ], 16, 17, note_pos=(880, 1010))
    for node in wf.nodes:
        if node.id == 13:   # the FLUX note gives the space under the sampler to the reward models
            node.pos = (1740, 890)
    # the chain and the reward models open whole; the Reward Mix and the notes below are a scroll away
    wf.view = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15)
    return wf


HUMAN_NOTE = (
    "## You are the reward\n\n"
    "**PCPO Human Rating** replaces the Reward Scorer: press **Queue** and a panel opens on the page with "
    "every group of 4 samples and its prompt. Try rating for *more saturated colours*: click the most "
    "saturated image (best), shift-click or right-click the dullest (worst), Enter for the next group; "
    "keys 1-4 pick best, Shift+1-4 worst, S skips a group. A skipped group (or every group after "
    "`timeout_s`) is scored by the `saturation` reward instead (`unrated`), or skipped. After a few "
    "iterations the samples get more colourful. Ratings are appended to "
    "`output/pcpo/demo_tiny_human_rating/ratings.jsonl` with the rated images in `rated/`.\n\n"
    "Set `human_groups` to 1 to rate one group per iteration and let the model reward score the rest "
    "(mixed mode; `calibration: rank` puts both on one scale).\n"
)


def demo_human() -> Workflow:
    wf = _variant(demo(), "demo_tiny_human_rating", "Demo: you rate the tiny model's samples (CPU)",
                  "reward `prompt-colour-agreement`, 30 iterations per Queue",
                  "rewards from your ratings in the page (PCPO Human Rating), 5 iterations per Queue")
    wf.summary = wf.summary.replace("4 prompts x 8 samples", "2 prompts x 4 samples")
    for node in wf.nodes:
        if node.type == "PCPOPrompts":
            node.widgets["prompts_per_iteration"] = 2
        elif node.type == "PCPOTrajectorySampler":
            node.widgets["group_size"] = 4
        elif node.type == "PCPOLoRAUpdate":
            node.widgets.update(iterations_per_queue=5, checkpoint_every=1, micro_batch=4)
        elif node.type == "MarkdownNote":
            node.text = HUMAN_NOTE + "\n\n" + LOOP_NOTE
        elif node.type == "PreviewImage":  # below the Human Rating node, whose status text needs room
            node.pos, node.size = (1280, 630), (420, 360)
        elif node.type == "PCPORewardScorer":
            node.type = "PCPOHumanRating"
            node.widgets = {"mode": "best-worst", "human_groups": 0, "unrated": "model reward",
                            "calibration": "rank", "timeout_s": 900, "reward": "saturation", "prompt": ""}
    return wf


MONITOR_NOTE = (
    "## See the run, stop reward hacking\n\n"
    "**PCPO Held-out Evaluation** samples held-out captions (never trained on) with fixed noise every 5 "
    "iterations, scores them with the training reward and a guard reward (`saturation`) and measures the KL "
    "to the base model. **PCPO Reward Guard** keeps the best LoRA by held-out reward "
    "(`pcpo/demo_tiny_pcpo_best`) and rolls LoRA and optimizer state back to it exactly when the held-out "
    "reward or the guard reward falls by its margin (then lowers the learning rate). **PCPO Dashboard** "
    "draws every stat of `output/pcpo/demo_tiny_pcpo/metrics.jsonl` after each iteration.\n"
)


def _demo_heldout() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS, all_specs
    rest = [s.text for s in all_specs() if s.text not in set(TRAINING_CAPTIONS)]
    return "# held-out captions (not in the training list)\n" + "\n".join(rest[::len(rest) // 6][:6])


def with_monitoring(wf: Workflow, session: int, clip: tuple, vae: tuple, stats: tuple, first_id: int, pos: tuple,
                    heldout: dict, guard: dict, note: str) -> Workflow:
    """``wf`` plus held-out evaluation (after the update), reward guard and dashboard."""
    x, y = pos
    # the held-out node is sized for its widgets plus its image grid (the frontend grows a node that is
    # too small for its image over the node below)
    wf.nodes += [
        N(first_id, "PCPOHeldOutEvaluation", (x, y), heldout,
          {"session": (session, 1), "clip": clip, "vae": vae, "stats": stats}, size=(440, 880)),
        N(first_id + 1, "PCPORewardGuard", (x, y + 930), guard,
          {"session": (session, 1), "heldout": (first_id, 0)}, size=(440, 300)),
        N(first_id + 2, "PCPODashboard", (x + 480, y), {"width": 1024, "height": 768, "last_iterations": 0},
          {"session": (session, 1), "stats": (first_id + 1, 0)}, size=(640, 560)),
        N(first_id + 3, "MarkdownNote", (x + 480, y + 620), text=note, size=(640, 300)),
    ]
    return wf


def demo_monitored() -> Workflow:
    wf = with_monitoring(demo(), 2, (1, 1), (1, 2), (7, 1), 11, (2200, 60), {
        "prompts": _demo_heldout(), "negative": "", "every": 5, "samples_per_prompt": 2, "steps": 10, "cfg": 4.0,
        "eta": 1.0, "scheduler": "simple", "width": 32, "height": 32, "seed": 1234,
        "reward": "prompt-colour-agreement", "guard_reward": "saturation"}, {
        "heldout_margin": 0.15, "guard_margin": 0.1, "kl_bound": 0.0, "action": "lower_lr", "lr_factor": 0.5,
        "best_filename": "pcpo/demo_tiny_pcpo_best", "dtype": "fp16"}, MONITOR_NOTE)
    wf.summary += (" Held-out evaluation of 6 other captions every 5 iterations, a reward guard (saturation) that "
                   "keeps and restores the best LoRA, and the dashboard.")
    wf.view = tuple(range(1, 11))  # the training chain opens whole; the monitoring nodes are right of it
    return wf


IRG_NOTE = (
    "## Implicit Reward Guidance\n\n"
    "Run the demo first (it writes `models/loras/pcpo/demo_tiny_pcpo.safetensors`). **PCPO Implicit Reward "
    "Guidance** samples with `eps = eps_base + lambda (eps_lora - eps_base)`: lambda 0 is the base model, 1 the "
    "tuned one, 2 pushes further along the learned reward. Both predictions come from one batched model call "
    "per step, so any sampler works. LoRA strength (LoraLoader) scales the weights instead, which is only the "
    "first-order approximation of this. Top row: base model; bottom row: IRG with lambda 2, same seed.\n\n"
    "The demo model works in 32x32 pixels: EmptyChromaRadianceLatentImage makes its 3-channel pixel latent.\n"
)


def demo_irg() -> Workflow:
    prompt = "a red circle on a blue background"
    nodes = [
        N(1, "PCPODemoModelLoader", (40, 60), {}),
        N(2, "PCPOImplicitRewardGuidance", (420, 60), {
            "lora_name": "pcpo/demo_tiny_pcpo.safetensors", "guidance": 2.0, "lora_name_2": "None",
            "guidance_2": 1.0, "lora_name_3": "None", "guidance_3": 1.0}, {"model": (1, 0)}),
        N(3, "CLIPTextEncode", (420, 320), {"text": prompt}, {"clip": (1, 1)}),
        N(4, "CLIPTextEncode", (420, 550), {"text": ""}, {"clip": (1, 1)}),
        N(5, "EmptyChromaRadianceLatentImage", (40, 230), {"width": 32, "height": 32, "batch_size": 8}),
        N(6, "KSampler", (860, 60), {"seed": 0, "steps": 20, "cfg": 4.0, "sampler_name": "euler_ancestral",
                                     "scheduler": "simple", "denoise": 1.0},
          {"model": (1, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        N(7, "VAEDecode", (1260, 60), {}, {"samples": (6, 0), "vae": (1, 2)}),
        N(8, "PreviewImage", (1660, 60), {}, {"images": (7, 0)}, title="base model", size=(420, 300)),
        N(9, "KSampler", (860, 420), {"seed": 0, "steps": 20, "cfg": 4.0, "sampler_name": "euler_ancestral",
                                      "scheduler": "simple", "denoise": 1.0},
          {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}),
        N(10, "VAEDecode", (1260, 420), {}, {"samples": (9, 0), "vae": (1, 2)}),
        N(11, "PreviewImage", (1660, 420), {}, {"images": (10, 0)}, title="IRG lambda 2", size=(420, 300)),
        N(12, "MarkdownNote", (40, 420), text=IRG_NOTE, size=(360, 420)),
    ]
    return Workflow(
        "demo_tiny_irg", "Demo: Implicit Reward Guidance with the demo's PCPO LoRA (CPU)",
        "The embedded demo model sampled with KSampler (euler_ancestral, 20 steps, cfg 4) twice from the same "
        "seed: as it is, and through PCPO Implicit Reward Guidance with the LoRA the demo workflow trains "
        "(`pcpo/demo_tiny_pcpo.safetensors`) at lambda 2.",
        nodes)


FORWARD_NOTE = (
    "## Learning from the final images ({name})\n\n"
    "**KSamplerSelect** ({sampler}) is wired into the Trajectory Sampler's `sampler` input, so the rollout "
    "samples with that ComfyUI sampler, each image from its own noise, and records only the final images "
    "(the sampler's eta and rollout_variant are then unused). **PCPO LoRA Update** with objective `{objective}` "
    "{how} Any sampler and scheduler work here, deterministic ones included; `pcpo`, `grpo-clip` and `ddpo` "
    "need the PCPO rollout (unwire the sampler). `time_weighting` `proportionate` gives each noise level "
    "PCPO's share instead of the paper's equal one (the same on this grid; it differs on flow models).\n\n"
    "How it compares with pcpo at equal compute on this model: the README's *Learning from the final images*."
)
FORWARD_HOW = {
    "awm": "(Advantage Weighted Matching) re-noises every final image at the grid's noise levels and trains the "
           "model's own denoising loss on it, weighted by the image's advantage: images better than the rest of "
           "their group are made more likely, worse ones less.",
    "nft": "(DiffusionNFT) re-noises every final image at the grid's noise levels and contrasts two implicit "
           "models around the sampling one: the better images of a group train the one moved towards them, the "
           "worse ones the one moved away.",
}


def demo_forward(objective: str, sampler: str = "euler") -> Workflow:
    """The demo with a ComfyUI sampler's final-only rollout and a forward-process objective."""
    name = f"demo_tiny_{objective}"
    paper = {"awm": "Advantage Weighted Matching", "nft": "DiffusionNFT"}[objective]
    wf = _variant(demo(), name, f"Demo: {paper} ({objective}) on the embedded tiny model (CPU)",
                  "PCPO on half of each trajectory's steps",
                  f"objective `{objective}` ({paper}) on the final images re-noised at every grid level")
    wf.summary = wf.summary.replace("10 DDIM steps (eta 1, cfg 4)",
                                    f"10 `{sampler}` steps (KSamplerSelect into the Trajectory Sampler, cfg 4)")
    for node in wf.nodes:
        if node.type == "PCPOTrajectorySampler":
            node.links["sampler"] = (11, 0)
        elif node.type == "PCPOLoRAUpdate":
            node.widgets.update(objective=objective, train_fraction=1.0, time_weighting="paper")
        elif node.type == "MarkdownNote":
            node.text = FORWARD_NOTE.format(name=paper, sampler=sampler, objective=objective,
                                            how=FORWARD_HOW[objective]) + "\n\n" + LOOP_NOTE
    wf.nodes.append(N(11, "KSamplerSelect", (880, 640), {"sampler_name": sampler}))
    return wf


def demo_awm() -> Workflow:
    return demo_forward("awm")


def demo_nft() -> Workflow:
    return demo_forward("nft")


WORKFLOWS: list[Callable[[], Workflow]] = [sd15, sdxl, flux, demo_monitored, sd15_aesthetic, sdxl_pickscore,
                                           flux_hps_ocr, demo_human, demo_irg, demo_awm, demo_nft]


# =========================================================================== building

def _widget_values(node: N, nd: NodeDef) -> list:
    unknown = set(node.widgets) - {w.name for w in nd.widgets}
    if unknown:
        raise KeyError(f"node {node.id} ({node.type}) has no widget(s) {sorted(unknown)}")
    values = []
    for w in nd.widgets:
        v = node.widgets.get(w.name, w.default())
        if w.choices is not None and (node.type, w.name) in _CHECK_COMBOS and v not in w.choices:
            raise ValueError(f"node {node.id} ({node.type}): {v!r} is not a choice of {w.name} {w.choices}")
        values.append(v)
        if w.control_values:
            values.append("fixed")
            if w.control_values == 2:
                values.append("")
    return values


# combos checked against the live choices (file lists are not: the user's files are not here)
_CHECK_COMBOS = {("PCPOLoRA", "target_layers"), ("PCPOLoRA", "optimizer"), ("PCPOPrompts", "prompt_file"),
                 ("PCPOTrajectorySampler", "rollout_variant"), ("PCPOTrajectorySampler", "flow_noise_rule"),
                 ("PCPOTrajectorySampler", "scheduler"), ("PCPORewardScorer", "reward"),
                 ("PCPOLoRAUpdate", "objective"), ("PCPOExportLoRA", "dtype"), ("DualCLIPLoader", "type"),
                 ("DualCLIPLoader", "device"), ("UNETLoader", "weight_dtype")}


# Nodes that show a run's output on the page.  The frontend grows a node whose widgets need more height
# than it has, over whatever lies below it: the image preview needs 220 px (frontend 1.32), the text that
# web/pcpo.js puts on a node 100 px.  Their sizes include that space from the start.
IMAGE_NODES = {"PreviewImage", "SaveImage", "PCPOHeldOutEvaluation", "PCPODashboard"}
TEXT_NODES = {"PCPOLoRAUpdate", "PCPOExportLoRA", "PCPOHumanRating"}
IMAGE_RESERVE, TEXT_RESERVE = 240, 104


def _widgets_height(nd: NodeDef) -> int:
    rows = max(len(nd.sockets), len(nd.outputs)) + sum(1 + w.control_values for w in nd.widgets)
    return 34 + 24 * rows + sum(90 for w in nd.widgets if w.options.get("multiline"))


def _node_size(node: N, nd: NodeDef | None) -> list:
    if nd is None:
        return list(node.size or (340, 200))
    need = _widgets_height(nd) + (IMAGE_RESERVE if node.type in IMAGE_NODES else 0) \
        + (TEXT_RESERVE if node.type in TEXT_NODES else 0)
    if node.size is not None:
        if node.size[1] < need:
            raise ValueError(f"node {node.id} ({node.type}) is {node.size[1]} high: its widgets and output need {need}")
        return list(node.size)
    return [360, need]


def _topo_order(wf: Workflow) -> dict:
    deps = {n.id: {src for src, _ in n.links.values()} for n in wf.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise ValueError(f"workflow {wf.name} has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


# The part of a 1600x1000 browser window's page (1600x857 CSS px) where the frontend's side bar (left),
# its banner, workflow tabs and Run bar (top) and its canvas tool bar (bottom) leave the canvas visible,
# with a margin.  Frontend 1.32 opens a workflow at its stored view (extra.ds) as it is.
VIEW_LEFT, VIEW_TOP, VIEW_RIGHT, VIEW_BOTTOM = 76, 150, 1580, 790
MIN_SCALE = 0.6   # below it LiteGraph draws every node as an empty box


def stored_view(wf: Workflow, defs: Callable[[str], NodeDef]) -> dict:
    """Canvas scale and offset that show the nodes ``wf.view`` (all when None) whole in the free part of
    the page, top left (LiteGraph draws a point at (pos + offset) * scale)."""
    boxes = []
    for n in wf.nodes:
        if wf.view is not None and n.id not in wf.view:
            continue
        w, h = _node_size(n, None if n.type in FRONTEND_ONLY else defs(n.type))
        boxes.append((n.pos[0], n.pos[1] - 30, n.pos[0] + w, n.pos[1] + h))  # 30: the title bar
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = min(0.8, (VIEW_RIGHT - VIEW_LEFT) / (x1 - x0), (VIEW_BOTTOM - VIEW_TOP) / (y1 - y0))
    scale = math.floor(scale * 100) / 100
    if scale < MIN_SCALE:
        raise ValueError(f"{wf.name}: its view needs zoom {scale} (under {MIN_SCALE}): show fewer nodes "
                         f"(Workflow.view) or lay them out closer")
    return {"scale": scale, "offset": [round(VIEW_LEFT / scale - x0, 1), round(VIEW_TOP / scale - y0, 1)]}


def build_ui(wf: Workflow, defs: Callable[[str], NodeDef]) -> dict:
    """The LiteGraph workflow (what the frontend saves/loads)."""
    order = _topo_order(wf)
    by_id = {n.id: n for n in wf.nodes}
    links, link_id = [], 0
    in_links: dict = {}       # (node id, input name) -> link id
    out_links: dict = {}      # (node id, slot) -> [link ids]
    for n in sorted(wf.nodes, key=lambda n: order[n.id]):
        if n.type in FRONTEND_ONLY:
            continue
        nd = defs(n.type)
        sockets = {s.name: s for s in nd.sockets}
        for name, (src, slot) in n.links.items():
            if name not in sockets:
                raise KeyError(f"node {n.id} ({n.type}) has no socket input {name!r}")
            src_def = defs(by_id[src].type)
            typ = src_def.outputs[slot]
            if sockets[name].type not in (typ, "*"):
                raise TypeError(f"link {src}:{slot} ({typ}) -> {n.id}.{name} ({sockets[name].type})")
            link_id += 1
            target_slot = [s.name for s in nd.sockets].index(name)
            links.append([link_id, src, slot, n.id, target_slot, typ])
            in_links[(n.id, name)] = link_id
            out_links.setdefault((src, slot), []).append(link_id)
        missing = [s.name for s in nd.sockets if not s.optional and s.name not in n.links]
        if missing:
            raise ValueError(f"node {n.id} ({n.type}) leaves required inputs {missing} unconnected")

    ui_nodes = []
    for n in wf.nodes:
        entry: dict[str, Any] = {"id": n.id, "type": n.type, "pos": list(n.pos)}
        if n.type in FRONTEND_ONLY:
            entry.update(size=_node_size(n, None), flags={}, order=order[n.id], mode=0, inputs=[], outputs=[],
                         properties={}, widgets_values=[n.text or ""], color="#432", bgcolor="#653")
            ui_nodes.append(entry)
            continue
        nd = defs(n.type)
        entry.update(size=_node_size(n, nd), flags={}, order=order[n.id], mode=0)
        entry["inputs"] = [{"name": s.name, "type": s.type, "link": in_links.get((n.id, s.name))}
                           for s in nd.sockets]
        entry["outputs"] = [{"name": nd.output_names[i], "type": t, "links": out_links.get((n.id, i), []),
                             "slot_index": i} for i, t in enumerate(nd.outputs)]
        props: dict[str, Any] = {"Node name for S&R": n.type}
        models = []
        for v in n.widgets.values():
            if isinstance(v, str) and v in MODEL_URLS:
                url, directory = MODEL_URLS[v]
                models.append({"name": v, "url": url, "directory": directory})
        if models:
            props["models"] = models
        entry["properties"] = props
        entry["widgets_values"] = _widget_values(n, nd)
        if n.title:
            entry["title"] = n.title
        ui_nodes.append(entry)

    groups = [{"id": i + 1, "title": t, "bounding": list(b), "color": c, "font_size": 24, "flags": {}}
              for i, (t, b, c) in enumerate(wf.groups)]
    return {
        "last_node_id": max(n.id for n in wf.nodes),
        "last_link_id": link_id,
        "nodes": ui_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": stored_view(wf, defs), "pcpo_workflow": {"name": wf.name, "title": wf.title,
                                                                             "summary": wf.summary}},
        "version": 0.4,
    }


def _display_title(class_type: str) -> str:
    import nodes
    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type)


def build_api(wf: Workflow, defs: Callable[[str], NodeDef], title: Callable[[str], str] = _display_title) -> dict:
    """The API prompt, straight from the description (widgets first, then links, like the frontend)."""
    prompt = {}
    for n in sorted(wf.nodes, key=lambda n: n.id):
        if n.type in FRONTEND_ONLY:
            continue
        nd = defs(n.type)
        inputs: dict[str, Any] = {}
        for w in nd.widgets:
            inputs[w.name] = n.widgets.get(w.name, w.default())
        for s in nd.sockets:
            if s.name in n.links:
                src, slot = n.links[s.name]
                inputs[s.name] = [str(src), int(slot)]
        prompt[str(n.id)] = {"inputs": inputs, "class_type": n.type, "_meta": {"title": n.title or title(n.type)}}
    return prompt


def ui_to_api(workflow: dict, defs: Callable[[str], NodeDef], title: Callable[[str], str] = _display_title) -> dict:
    """Convert a UI (LiteGraph) workflow into an API prompt, as the frontend's graphToPrompt does for
    the graphs we ship: frontend-only nodes (notes) are dropped, widget values are matched to the
    node's widget inputs in INPUT_TYPES order (control_after_generate values skipped), linked inputs
    become ``[source id, source slot]``.  Muted/bypassed nodes, groups nodes and subgraphs are not
    supported (ours have none)."""
    links = {ln[0]: ln for ln in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: int(n["id"])):
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']} ({node['type']}) is muted or bypassed (mode "
                                      f"{node.get('mode')}); the converter only handles active nodes")
        nd = defs(node["type"])
        values = list(node.get("widgets_values") or [])
        if len(values) != nd.widget_value_count():
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} widget values, "
                             f"expected {nd.widget_value_count()}")
        inputs: dict[str, Any] = {}
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        it = iter(values)
        for w in nd.widgets:
            v = next(it)
            for _ in range(w.control_values):
                next(it)
            if w.name not in linked:  # a widget converted to an input takes the link instead
                inputs[w.name] = v
        for inp in node.get("inputs", []):
            lid = inp.get("link")
            if lid is None:
                continue
            ln = links[lid]
            inputs[inp["name"]] = [str(ln[1]), int(ln[2])]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or title(node["type"])}}
    return prompt


def host_version() -> str | None:
    """The version of the ComfyUI loaded in this process."""
    try:
        import comfyui_version
    except ImportError:
        return None
    return getattr(comfyui_version, "__version__", None)


def host_independent(obj: dict) -> dict:
    """A copy of a UI or API workflow without what the ComfyUI version that wrote it decides:

    * API ``_meta.title`` when it is a default title (the class name or this host's display name;
      display names come and go between versions, e.g. DualCLIPLoader got "Load CLIP (Dual)");
    * trailing output sockets of a UI node that no link uses (a version may add outputs to a core
      node, e.g. SaveImage/PreviewImage pass their images through in 0.33; a workflow saved with
      fewer still loads).
    Explicit titles, links, slot indices of linked outputs and every widget value are kept."""
    import copy
    out = copy.deepcopy(obj)
    if isinstance(out.get("nodes"), list):  # UI format
        for n in out["nodes"]:
            outs = n.get("outputs") or []
            while outs and not outs[-1].get("links"):
                outs.pop()
            n["outputs"] = outs
        return out
    for node in out.values():  # API format
        meta = node.get("_meta") if isinstance(node, dict) else None
        if isinstance(meta, dict) and meta.get("title") in (node.get("class_type"),
                                                              _display_title(node.get("class_type"))):
            del meta["title"]
    return out


def same_workflow(a: dict, b: dict) -> bool:
    """Equal, or equal up to :func:`host_independent` when this ComfyUI is not ``GENERATED_WITH``."""
    if a == b:
        return True
    return host_version() != GENERATED_WITH and host_independent(a) == host_independent(b)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def render_all(defs: Callable[[str], NodeDef] | None = None) -> dict:
    """{relative path: file text} for every generated file."""
    defs = defs or comfy_node_defs()
    files = {}
    for make in WORKFLOWS:
        wf = make()
        files[f"workflows/{wf.name}.json"] = dumps(build_ui(wf, defs))
        files[f"workflows/api/{wf.name}.json"] = dumps(build_api(wf, defs))
    return files


# =========================================================================== template thumbnails

# ComfyUI's template browser (Workflow -> Browse Templates, the category named after the pack's
# folder) lists every top-level .json of workflows/ under its file name and shows workflows/<name>.jpg
# as its card; the cards carry the readable title.  The demo cards show a real render of the demo
# model, before and after PCPO (tools/demo_before_after.png, cut from tools/run_demo.py's grid).
THUMB_SIZE = (512, 512)
DEMO_RENDER = REPO_ROOT / "tools" / "demo_before_after.png"
ICON_PATH = "docs/icon.png"
FAMILY_COLOURS = {"SD1.5": (52, 94, 160), "SDXL": (120, 60, 150), "FLUX.1-dev": (30, 120, 110), "Demo": (170, 95, 30)}


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        cand = (line + " " + word).strip()
        if draw.textlength(cand, font=font) <= width or not line:
            line = cand
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def files_needed(wf: Workflow) -> list:
    """The model files a workflow's widgets name (what a user downloads before the first Run)."""
    out = []
    for n in wf.nodes:
        loader = n.type.startswith("PCPO") and n.type.endswith("Reward")  # reward files and HF folders
        for k, v in n.widgets.items():
            if not isinstance(v, str) or v in out or v.startswith("("):
                continue
            if v.endswith((".safetensors", ".pth", ".pt")) or (loader and k in ("model", "head", "backbone",
                                                                                  "checkpoint")):
                out.append(v)
    return out


def thumbnail(wf: Workflow):
    """The template card of ``wf``: family band, title, what it trains for, what it needs."""
    from PIL import Image, ImageDraw
    family, _, rest = wf.title.partition(": ")
    colour = FAMILY_COLOURS.get(family, (80, 80, 80))
    img = Image.new("RGB", THUMB_SIZE, (245, 245, 242))
    d = ImageDraw.Draw(img)
    w, h = THUMB_SIZE
    top = 0
    # the render is the pcpo demo run's: on the demo cards that train with pcpo or use its LoRA
    pcpo_run = all(n.widgets.get("objective", "pcpo") == "pcpo" for n in wf.nodes if n.type == "PCPOLoRAUpdate")
    if family == "Demo" and pcpo_run and DEMO_RENDER.exists():
        render = Image.open(DEMO_RENDER).convert("RGB")
        render = render.resize((w, round(render.height * w / render.width)), Image.LANCZOS)
        img.paste(render.crop((0, 0, w, min(render.height, 250))), (0, 0))
        top = min(render.height, 250)
    d.rectangle((0, top, w, top + 64), fill=colour)
    d.text((20, top + 12), "PCPO · " + family, font=_font(34), fill=(255, 255, 255))
    y = top + 80
    for ln in _wrap(d, rest, _font(30), w - 40)[:3]:
        d.text((20, y), ln, font=_font(30), fill=(20, 20, 20))
        y += 38
    files = files_needed(wf)
    need = ("needs: " + ", ".join(files)) if files else "needs: nothing to download"
    y += 8
    for ln in _wrap(d, need, _font(20), w - 40)[: max(1, (h - y - 96) // 26)]:
        d.text((20, y), ln, font=_font(20), fill=(70, 70, 70))
        y += 26
    # the loop every workflow runs, at the bottom of the card
    steps = ("sample", "score", "update", "LoRA")
    bw, gap, by = (w - 40 - 3 * 22) // 4, 22, h - 70
    for i, label in enumerate(steps):
        x = 20 + i * (bw + gap)
        d.rounded_rectangle((x, by, x + bw, by + 48), radius=10, fill=colour if i < 3 else (40, 40, 40))
        d.text((x + bw // 2, by + 24), label, font=_font(22), fill=(255, 255, 255), anchor="mm")
        if i < 3:
            d.text((x + bw + gap // 2, by + 24), "›", font=_font(30), fill=(90, 90, 90), anchor="mm")
    return img


def icon():
    """The registry icon (square): a reward curve rising over a grid."""
    from PIL import Image, ImageDraw
    n = 256
    img = Image.new("RGB", (n, n), (34, 40, 49))
    d = ImageDraw.Draw(img)
    for i in range(1, 4):
        d.line((i * n // 4, 24, i * n // 4, n - 24), fill=(60, 68, 80), width=2)
        d.line((24, i * n // 4, n - 24, i * n // 4), fill=(60, 68, 80), width=2)
    pts = [(24 + k * (n - 48) / 15, n - 40 - (n - 90) * (1 - math.exp(-k / 5)) / (1 - math.exp(-3))) for k in range(16)]
    d.line(pts, fill=(255, 170, 40), width=10, joint="curve")
    d.text((n // 2, n - 34), "PCPO", font=_font(40), fill=(240, 240, 240), anchor="ms")
    return img


def render_images() -> dict:
    """{relative path: PIL image} for every generated picture."""
    images = {f"workflows/{wf.name}.jpg": thumbnail(wf) for wf in (make() for make in WORKFLOWS)}
    images[ICON_PATH] = icon()
    return images


def image_bytes(rel: str, img) -> bytes:
    import io
    buf = io.BytesIO()
    if rel.endswith(".jpg"):
        img.save(buf, "JPEG", quality=88, optimize=True)
    else:
        img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def same_image(path: pathlib.Path, img, tolerance: float = 3.0) -> bool:
    """The file on disk shows ``img`` (mean absolute pixel difference below ``tolerance``: another
    Pillow may encode the same picture into other bytes)."""
    import io
    from PIL import Image, ImageChops, ImageStat
    try:
        old = Image.open(path).convert("RGB")
    except OSError:
        return False
    img = Image.open(io.BytesIO(image_bytes(str(path), img)))  # as encoded: JPEG is lossy
    if old.size != img.size:
        return False
    return sum(ImageStat.Stat(ImageChops.difference(old, img.convert("RGB"))).mean) / 3 < tolerance


def _host():
    """``tools/comfyui_host.py`` (this script's folder is on sys.path when run, not when imported)."""
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import comfyui_host
    return comfyui_host


def load_host() -> None:
    """ComfyUI in-process + this repository loaded as a custom node pack."""
    host = _host()
    host.load()
    # an empty input folder: PCPO Prompts' file list (and nothing is written into ComfyUI's tree)
    base = pathlib.Path(tempfile.mkdtemp(prefix="pcpo-build-workflows-"))
    host.set_base_dirs(base)
    pack = host.load_pack_folder(REPO_ROOT, base / "custom_nodes", "comfyui-pcpo")
    if not pack.ok:
        raise RuntimeError("the comfyui-pcpo pack failed to load into ComfyUI (see the log above)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate workflows/*.json and workflows/api/*.json")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing "
                    "(on a ComfyUI other than GENERATED_WITH: up to host-version metadata)")
    ap.add_argument("--any-version", action="store_true", help=f"write even on a ComfyUI other than {GENERATED_WITH}")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    load_host()
    version = host_version()
    if version != GENERATED_WITH and not a.check and not a.any_version:
        print(f"the shipped files are generated with ComfyUI {GENERATED_WITH}; this is {version} "
              "(use --check, or --any-version to write them anyway)", file=sys.stderr)
        return 2
    files = render_all()
    stale = []
    for rel, text in files.items():
        path = REPO_ROOT / rel
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == text or (a.check and old is not None and same_workflow(json.loads(old), json.loads(text))):
            continue
        stale.append(rel)
        if not a.check:
            sys.path.insert(0, str(REPO_ROOT))
            from comfyui_pcpo.atomic import atomic_write_text
            atomic_write_text(str(path), text)
    images = render_images()
    for rel, img in images.items():
        path = REPO_ROOT / rel
        if path.exists() and same_image(path, img):
            continue
        stale.append(rel)
        if not a.check:
            sys.path.insert(0, str(REPO_ROOT))
            from comfyui_pcpo.atomic import atomic_write
            data = image_bytes(rel, img)
            atomic_write(str(path), lambda tmp, data=data: pathlib.Path(tmp).write_bytes(data))
    if a.check:
        for rel in stale:
            print(f"stale: {rel}", file=sys.stderr)
        return 1 if stale else 0
    for rel in [*files, *images]:
        print(("wrote " if rel in stale else "unchanged ") + rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
