"""PCPO Prompts: a seeded prompt source for training runs over many prompts."""
from __future__ import annotations

import os
import random
from collections import OrderedDict

import torch

import folder_paths

from .validation import verdict

NO_FILE = "(none)"
CACHE_BYTES = 256 * 2 ** 20  # prompt encodings kept per prompt source


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors inside ``obj`` (nested lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def encode_text(clip, text: str):
    """CONDITIONING for ``text`` with ComfyUI's CLIP object (scheduled API when available)."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def read_prompt_lines(text: str) -> list:
    """One prompt per non-empty line; lines starting with '#' are comments."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


class PromptSource:
    """Prompts of a run; ``draw(iteration)`` picks ``per_iteration`` of them, seeded by iteration."""

    def __init__(self, prompts: list, negative: str, clip, per_iteration: int, seed: int):
        if not prompts:
            raise ValueError("PCPO Prompts: no prompts given: write one prompt per line, or pick a .txt file "
                             "from ComfyUI's input folder")
        self.prompts = list(prompts)
        self.negative = negative
        self.clip = clip
        self.per_iteration = int(per_iteration)
        self.seed = int(seed)
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self.cache_bytes = CACHE_BYTES

    def draw(self, iteration: int) -> list:
        rng = random.Random(f"{self.seed}:{iteration}")
        if self.per_iteration <= len(self.prompts):
            return rng.sample(self.prompts, self.per_iteration)
        return [rng.choice(self.prompts) for _ in range(self.per_iteration)]

    def encode(self, text: str):
        """CONDITIONING of ``text``, from a least-recently-used cache bounded in bytes
        (``CACHE_BYTES``; text-encoder outputs range from kilobytes to megabytes per prompt)."""
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text][0]
        cond = encode_text(self.clip, text)
        self._cache[text] = (cond, tensor_bytes(cond))
        self._cache_bytes += self._cache[text][1]
        while self._cache_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (_, nbytes) = self._cache.popitem(last=False)
            self._cache_bytes -= nbytes
        return cond


def _txt_files() -> list:
    root = folder_paths.get_input_directory()
    try:
        return sorted(f for f in os.listdir(root) if f.lower().endswith(".txt") and os.path.isfile(os.path.join(root, f)))
    except OSError:
        return []


class PCPOPrompts:
    CATEGORY = "PCPO"
    FUNCTION = "build"
    RETURN_TYPES = ("PCPO_PROMPTS",)
    RETURN_NAMES = ("prompts",)
    OUTPUT_TOOLTIPS = ("Prompt source for the PCPO Trajectory Sampler.",)
    DESCRIPTION = "Training prompts: each iteration draws prompts_per_iteration of them (seeded) and encodes them with CLIP."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The text encoder of your checkpoint."}),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na watercolor painting of a lighthouse",
                                   "tooltip": "One prompt per line ('#' starts a comment). Ignored when a file is chosen."}),
            "prompt_file": ([NO_FILE] + _txt_files(), {"default": NO_FILE, "tooltip":
                            "A .txt file in ComfyUI's input folder with one prompt per line (overrides the text box)."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip":
                                "Negative prompt used for classifier-free guidance of every sample."}),
            "prompts_per_iteration": ("INT", {"default": 2, "min": 1, "max": 256, "tooltip":
                                      "Prompts drawn per iteration; each becomes one group of group_size samples "
                                      "(the reference draws 32-48; at most 256)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seeds which prompts are drawn."}),
        }}

    OPEN_LISTS = ("prompt_file",)  # listed when the page loaded; checked against the folder now

    @classmethod
    def VALIDATE_INPUTS(cls, prompt_file=None):
        """Checked when the prompt is queued (see nodes/validation.py); ComfyUI checks the others."""
        return verdict(cls, prompt_file=prompt_file)

    @classmethod
    def pcpo_checks(cls, values: dict, run_name=None) -> list:
        f = values.get("prompt_file")
        if f not in (None, NO_FILE) and f not in _txt_files():
            return [f"prompt_file {f!r} is not a .txt file in ComfyUI's input folder: put it there, or pick "
                    f"{NO_FILE!r} and type the prompts"]
        return []

    def build(self, clip, prompts, prompt_file, negative_prompt, prompts_per_iteration, seed):
        if prompt_file and prompt_file != NO_FILE:
            root = os.path.realpath(folder_paths.get_input_directory())
            path = os.path.realpath(os.path.join(root, prompt_file))
            if os.path.commonpath([root, path]) != root:
                raise ValueError(f"prompt_file {prompt_file!r} is outside ComfyUI's input folder")
            with open(path, encoding="utf-8") as f:
                lines = read_prompt_lines(f.read())
        else:
            lines = read_prompt_lines(prompts)
        return (PromptSource(lines, negative_prompt, clip, prompts_per_iteration, seed),)


NODE_CLASS_MAPPINGS = {"PCPOPrompts": PCPOPrompts}
NODE_DISPLAY_NAME_MAPPINGS = {"PCPOPrompts": "PCPO Prompts"}
