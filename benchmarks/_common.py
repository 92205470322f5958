"""Shared set-up for the benchmarks: a real ComfyUI with this pack loaded, the demo model, and a
function running one PCPO iteration through the node classes (the shipped workflow's code path).

ComfyUI is loaded the one way the repository loads it, ``tools/comfyui_host.py`` (through
``tools/run_demo.load_host``): the cached 0.3.75 or the tree ``$PCPO_COMFYUI_DIR`` names."""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import run_demo  # noqa: E402


class Host:
    def __init__(self, threads: int = 1):
        torch.set_num_threads(threads)
        self.out = pathlib.Path(tempfile.mkdtemp(prefix="pcpo-bench-"))
        self.dirs, self.pack = run_demo.load_host(self.out)  # prints "ComfyUI <version> at <path>"
        import nodes
        self.N = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("PCPO")}
        self.model, self.clip, self.vae = self.pack["demo"].load_demo()
        from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS
        self.captions = "\n".join(TRAINING_CAPTIONS)  # the demo's training captions

    def session(self, name: str, lr: float, seed: int = 0, rank: int = 8):
        self.pack["session"].SESSIONS.pop(name, None)
        return self.N["PCPOLoRA"]().create(self.model, name, rank, float(rank), "attention+mlp", lr, "AdamW", 0.0,
                                           seed, False)[1]

    def prompts(self, per_iteration: int, seed: int = 0):
        return self.N["PCPOPrompts"]().build(self.clip, self.captions, "(none)", "", per_iteration, seed)[0]

    def fixed_prompt(self, text: str):
        """A prompt source that draws ``text`` at every iteration."""
        return self.N["PCPOPrompts"]().build(self.clip, text, "(none)", "", 1, 0)[0]

    def rollout(self, sess, prompts, group_size: int, steps: int = 10, seed: int = 0, variant: str = "uw-sigma",
                scheduler: str = "simple", eta: float = 1.0, cfg: float = 4.0):
        with torch.inference_mode():
            return self.N["PCPOTrajectorySampler"]().sample(sess, steps, cfg, group_size, seed, eta, variant,
                                                            "constant", scheduler, 32, 32, 1, prompts=prompts)

    def score(self, lat, batch, reward="prompt-colour-agreement"):
        with torch.inference_mode():
            img = self.vae.decode(lat["samples"])
            return self.N["PCPORewardScorer"]().score(img, batch, reward)[0]

    def update(self, sess, batch, rewards, objective="pcpo", train_fraction=0.5, micro_batch=8, updates=2):
        """One PCPO LoRA Update (clip range 1e-4, advantage clip 5, grad clip 1); returns its stats."""
        with torch.inference_mode():
            out = self.N["PCPOLoRAUpdate"]().update(sess, batch, rewards, objective, 1e-4, 5.0, train_fraction,
                                                    micro_batch, 1.0, updates, 1, 10 ** 6)
        return json.loads(out["result"][1])

    def heldout_captions(self, count: int) -> list:
        """A fixed subset of the demo captions that are not training captions (every k-th, in the
        fixed order of ``all_specs``)."""
        from comfyui_pcpo.demo.shapes import TRAINING_CAPTIONS, all_specs, caption_text
        held = [t for t in (caption_text(s) for s in all_specs()) if t not in set(TRAINING_CAPTIONS)]
        step = max(1, len(held) // count)
        return held[::step][:count]

    def heldout(self, sess, texts, samples_per_prompt: int = 2, steps: int = 10, scheduler: str = "simple",
                eta: float = 1.0, cfg: float = 4.0, seed: int = 1234, reward="prompt-colour-agreement"):
        """Held-out reward of the session's current LoRA (the PCPO Held-out Evaluation node's code:
        fixed noise from ``seed``, native stochastic sampler); returns (mean reward, KL to base)."""
        cls = self.N["PCPOHeldOutEvaluation"]
        mod = sys.modules[cls.__module__]
        with torch.inference_mode():
            held = cls.run(sess, self.clip, self.vae, list(texts), "", samples_per_prompt, steps, cfg, eta, scheduler,
                           32, 32, seed, mod.reward_object(reward), [])
        return held.reward, held.kl_base
