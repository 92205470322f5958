"""LoRA export: the kohya file loads back with zero missed keys and the training output in
ComfyUI (every tiny family) and in diffusers (SD1.5, SD2-v, SDXL UNets), the optional PEFT file
loads in diffusers at the right strength, output paths stay inside the loras folder, writes are
atomic, and the PCPOExportLoRA node lands its file where ComfyUI's LoraLoader finds it."""
from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_pcpo import export as E
from comfyui_pcpo.lora import kohya_name

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = "pcpo_nodes_under_test_export"  # our nodes/ folder, imported under a name that can't clash
FAMILIES = ("sd15", "sdxl", "sd2v", "sd3", "flux")
PRESETS = ("attention", "all-linear+conv")
# (dtype, tolerance on |out_loaded - out_trained| / |out_trained - out_base|)
DTYPE_TOL = (("fp32", 1e-5), ("fp16", 5e-3), ("bf16", 4e-2))


# ----------------------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="module")
def pack(comfy):
    """nodes/model_hooks.py and nodes/export.py as submodules of a synthetic package (its __init__ is
    not run, so other node modules cannot interfere)."""
    if PKG not in sys.modules:
        pkg = types.ModuleType(PKG)
        pkg.__path__ = [str(REPO / "nodes")]
        sys.modules[PKG] = pkg
    return types.SimpleNamespace(hooks=importlib.import_module(f"{PKG}.model_hooks"),
                                 export=importlib.import_module(f"{PKG}.export"))


@pytest.fixture(scope="module")
def build(tiny):
    """tiny_models.build, with uninitialised float buffers zeroed before init_weights' finiteness
    check (SD3's pos_embed is torch.empty until sd3() fills it, so garbage NaNs made that check
    fail at random)."""
    orig = tiny.init_weights

    def init_weights(module, seed=0):
        with torch.no_grad():
            for b in module.buffers():
                if b.is_floating_point():
                    b.nan_to_num_(0.0, 0.0, 0.0)
        return orig(module, seed)

    mp = pytest.MonkeyPatch()
    mp.setattr(tiny, "init_weights", init_weights)
    yield tiny.build
    mp.undo()


def _randomize_up(adapters, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in adapters.values():
            ad.up.copy_(torch.randn(ad.up.shape, generator=g) * std)


def _predict(hooks, model, tm, x, sigma):
    """ComfyUI's denoised prediction at (x, sigma): conds processed and the model loaded exactly
    as sampling does (load_models_gpu inside the guider, so weight wrappers/patches apply)."""
    with torch.no_grad():
        return hooks.run_in_guider(model, tm.cond(1, seed=1), tm.uncond(1), 1.0, x.shape,
                                  torch.tensor([sigma, 0.0]), lambda f: f(x, torch.tensor([sigma])))


def _load_in_comfyui(base_model, lora_sd, caplog):
    """comfy.sd.load_lora_for_models on the unpatched model; returns (patched clone, warnings)."""
    import comfy.sd
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        new, _ = comfy.sd.load_lora_for_models(base_model, None, lora_sd, 1.0, 0)
    bad = [r.getMessage() for r in caplog.records
           if "not loaded" in r.getMessage().lower() or "lora" in r.getMessage().lower()]
    return new, bad


class _LogCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@dataclass
class _Session:
    """The attributes PCPOExportLoRA reads from a PCPO session."""
    adapters: dict
    model: object
    family: object
    md: dict = field(default_factory=dict)

    def metadata(self):
        return dict(self.md)


# ----------------------------------------------------------------------------- ComfyUI round trip

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_roundtrip_comfyui(pack, build, family, preset, tmp_path, caplog):
    import comfy.lora
    hooks = pack.hooks
    tm = build(family)
    x = torch.randn(1, tm.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = float(tm.sigmas(4)[1])
    base_out = _predict(hooks, tm.model, tm, x, sigma)

    mp, adapters = hooks.attach_lora(tm.model, rank=4, alpha=8.0, preset=preset)
    has_conv = any(len(s) == 4 for _, s in hooks.denoiser_weights(tm.model))
    if preset == "all-linear+conv" and has_conv:
        assert any(len(a.shape) == 4 for a in adapters.values())
    _randomize_up(adapters)
    trained = _predict(hooks, mp, tm, x, sigma)
    effect = (trained - base_out).norm()
    assert effect > 1e-2 * base_out.norm(), "the LoRA must change the output for this test to mean anything"

    kohya_map, _ = pack.export.lora_name_maps(tm.model)
    if family in ("sd15", "sd2v"):  # diffusers names for SD1.x/SD2.x UNets
        assert kohya_map and all(not k.startswith("lora_unet_input_blocks")
                                 for k in E.kohya_state_dict(adapters, torch.float32, kohya_map))
    else:
        assert kohya_map == {}
    key_map = comfy.lora.model_lora_keys_unet(tm.model.model, {})
    md = E.lora_metadata(arch=pack.hooks.model_family(tm.model).arch, rank=4, alpha=8.0)

    for dtype, tol in DTYPE_TOL:
        sd = E.kohya_state_dict(adapters, dtype, kohya_map)
        assert len(sd) == 3 * len(adapters)
        r_file, a_file = E.network_dim_alpha(adapters)
        for module, ad in adapters.items():
            stem = kohya_name(kohya_map.get(module, module))
            assert key_map.get(stem) == f"diffusion_model.{module}.weight", stem
            down, up, alpha = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"], sd[f"{stem}.alpha"]
            assert down.dtype == up.dtype == E.DTYPES[dtype] and alpha.dtype == torch.float32
            assert down.ndim == up.ndim == len(ad.shape) and alpha.ndim == 0 and float(alpha) == a_file
            if len(ad.shape) == 4:
                assert tuple(down.shape) == (r_file, *ad.shape[1:]) and tuple(up.shape) == (ad.shape[0], r_file, 1, 1)

        path = str(tmp_path / f"{family}_{dtype}.safetensors")
        E.write_lora(path, sd, md)
        lora_sd = load_file(path)
        new, warnings = _load_in_comfyui(tm.model, lora_sd, caplog)
        assert not warnings, warnings[:5]
        assert set(new.patches) == {f"diffusion_model.{m}.weight" for m in adapters}
        out = _predict(hooks, new, tm, x, sigma)
        err = float((out - trained).norm() / effect)
        assert err <= tol, f"{family}/{preset}/{dtype}: loaded LoRA output differs from training by {err:.2e} of the LoRA effect"


# ----------------------------------------------------------------------------- diffusers

def _diffusers_unet(tm):
    """A diffusers UNet2DConditionModel computing the same function as the tiny ComfyUI UNet
    (same block layout; weights copied through comfy.utils.unet_to_diffusers)."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    uc = tm.model.model.model_config.unet_config
    ch, mult, nrb = uc["model_channels"], list(uc["channel_mult"]), list(uc["num_res_blocks"])
    attn = [uc["transformer_depth"][i * nrb[i]] > 0 for i in range(len(mult))]
    heads = tuple(uc["num_heads"] if uc.get("num_heads", -1) > 0 else ch * m // uc["num_head_channels"] for m in mult)
    kw = dict(sample_size=16, in_channels=uc["in_channels"], out_channels=uc["out_channels"],
              layers_per_block=nrb[0], block_out_channels=tuple(ch * m for m in mult),
              down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
              up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
              cross_attention_dim=uc["context_dim"], attention_head_dim=heads, norm_num_groups=32,
              use_linear_projection=bool(uc["use_linear_in_transformer"]))
    if tm.family == "sdxl":
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=uc["adm_in_channels"])
    unet = UNet2DConditionModel(**kw)
    d2l = comfy.utils.unet_to_diffusers(uc)
    ldm = tm.model.model.diffusion_model.state_dict()
    unet.load_state_dict({k: ldm[d2l[k]] for k in unet.state_dict()}, strict=True)
    return unet.eval()


def _unet_inputs(tm):
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx, pooled = tm.embed([1])
    ts = torch.tensor([500])
    comfy_kw, diff_kw = {"context": ctx}, {"encoder_hidden_states": ctx}
    if tm.family == "sdxl":  # ComfyUI's adm vector = pooled + Timestep(256) of the 6 size numbers
        time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
        comfy_kw["y"] = torch.cat([pooled, oai.Timestep(256)(time_ids.flatten()).reshape(1, -1)], dim=1)
        diff_kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return x, ts, comfy_kw, diff_kw


def _lora_layers(unet, adapter_name):
    return sum(1 for _, m in unet.named_modules()
               if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter_name in m.lora_A)


@pytest.mark.parametrize("family,rank", [("sd15", 4), ("sd2v", 4), ("sdxl", 4), ("sd15", 40)])
def test_kohya_and_peft_load_in_diffusers(pack, build, family, rank, tmp_path, caplog):
    """rank 40 on 32/64-wide layers: ranks capped per layer (32 or 40), alpha scaled with them."""
    import comfy.model_management
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    Pipe = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    tm = build(family)
    x, ts, ckw, dkw = _unet_inputs(tm)
    dm = tm.model.model.diffusion_model
    with torch.no_grad():
        c_base = dm(x, timesteps=ts, **ckw)
        d_unet = _diffusers_unet(tm)
        d2 = _diffusers_unet(tm)  # built now: loading a LoRA in ComfyUI patches tm's weights in place
        d_base = d_unet(x, ts, **dkw).sample
    assert float((c_base - d_base).norm() / c_base.norm()) < 1e-5, "diffusers twin of the tiny UNet differs"

    mp, adapters = pack.hooks.attach_lora(tm.model, rank=rank, alpha=2.0 * rank, preset="all-linear+conv")
    _randomize_up(adapters, std=0.1 / rank ** 0.5)
    if rank == 40:
        assert len({a.rank for a in adapters.values()}) > 1
    comfy.model_management.load_models_gpu([mp])
    with torch.no_grad():
        c_lora = mp.model.diffusion_model(x, timesteps=ts, **ckw)
    c_delta = c_lora - c_base
    assert c_delta.norm() > 1e-2 * c_base.norm()
    kohya_map, diffusers_map = pack.export.lora_name_maps(tm.model)

    catcher = _LogCatcher()
    dlog = logging.getLogger("diffusers")
    dlog.addHandler(catcher)
    try:
        # the kohya file (the same one ComfyUI loads)
        kpath = str(tmp_path / "kohya.safetensors")
        E.write_lora(kpath, E.kohya_state_dict(adapters, "fp32", kohya_map), {})
        loaded, warnings = _load_in_comfyui(tm.model, load_file(kpath), caplog)
        assert not warnings, warnings[:5]
        comfy.model_management.load_models_gpu([loaded])
        with torch.no_grad():
            l_delta = loaded.model.diffusion_model(x, timesteps=ts, **ckw) - c_base
        assert float((l_delta - c_delta).norm() / c_delta.norm()) < 1e-5
        kwargs = {"unet_config": d_unet.config} if family == "sdxl" else {}
        state, alphas = Pipe.lora_state_dict(kpath, **kwargs)
        Pipe.load_lora_into_unet(state, alphas, d_unet, adapter_name="pcpo")
        assert _lora_layers(d_unet, "pcpo") == len(adapters)
        with torch.no_grad():
            d_delta = d_unet(x, ts, **dkw).sample - d_base
        err = float((d_delta - c_delta).norm() / c_delta.norm())
        assert err < 1e-4, f"diffusers (kohya file) LoRA delta differs from ComfyUI's by {err:.2e}"

        # the optional diffusers/PEFT file (alpha/rank folded into lora_B, adapter config in metadata)
        ppath = E.diffusers_output_path(str(tmp_path / "out"), "pcpo/run")
        assert ppath == str(tmp_path / "out" / "pcpo" / "run_diffusers" / "pytorch_lora_weights.safetensors")
        E.write_lora(ppath, E.peft_state_dict(adapters, diffusers_map, "fp32"),
                     E.peft_metadata(adapters, diffusers_map))
        state, alphas, meta = Pipe.lora_state_dict(os.path.dirname(ppath), return_lora_metadata=True)
        assert alphas is None and meta["unet.r"] == meta["unet.lora_alpha"] == max(a.rank for a in adapters.values())
        Pipe.load_lora_into_unet(state, alphas, d2, adapter_name="pcpo", metadata=meta)
        assert _lora_layers(d2, "pcpo") == len(adapters)
        with torch.no_grad():
            p_delta = d2(x, ts, **dkw).sample - d_base
        err = float((p_delta - c_delta).norm() / c_delta.norm())
        assert err < 1e-4, f"diffusers (PEFT file) LoRA delta differs from ComfyUI's by {err:.2e}"
    finally:
        dlog.removeHandler(catcher)
    noisy = [m for m in catcher.messages if "unexpected" in m or "missing" in m or "not" in m.lower()]
    assert not noisy, noisy[:3]


def test_ldm_names_do_not_load_in_diffusers_sd15(pack, build, tmp_path):
    """Why SD1.x exports use diffusers names: diffusers' SD1.x loader cannot place ldm-named keys
    (and the log catcher used above does see its complaint)."""
    from diffusers import StableDiffusionPipeline
    tm = build("sd15")
    _, adapters = pack.hooks.attach_lora(tm.model, rank=4, alpha=8.0, preset="attention")
    path = str(tmp_path / "ldm.safetensors")
    E.write_lora(path, E.kohya_state_dict(adapters, "fp32"), {})
    unet = _diffusers_unet(tm)
    state, alphas = StableDiffusionPipeline.lora_state_dict(path)
    catcher = _LogCatcher()
    dlog = logging.getLogger("diffusers")
    dlog.addHandler(catcher)
    try:
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="ldm")
        layers = _lora_layers(unet, "ldm")
    except Exception:  # a future diffusers may raise instead
        return
    finally:
        dlog.removeHandler(catcher)
    assert layers < len(adapters)
    assert any("unexpected" in m for m in catcher.messages)


def test_comfyui_reports_unloaded_keys(pack, build, caplog):
    """The zero-missed-keys check is live: a key ComfyUI cannot map is reported."""
    tm = build("sd15")
    bogus = {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(1, 4),
             "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 1)}
    _, warnings = _load_in_comfyui(tm.model, bogus, caplog)
    assert warnings


# ----------------------------------------------------------------------------- paths, files, metadata

@pytest.mark.parametrize("bad", ["../x", "/abs/x", "a/../../b", "", "   ", "a/..", "..\\x", "C:/x",
                                 "pcpo/", ".safetensors"])
def test_safe_output_path_rejects(tmp_path, bad):
    with pytest.raises(ValueError) as ei:
        E.safe_output_path(str(tmp_path), bad)
    assert repr(bad) in str(ei.value) and "relative name" in str(ei.value)


def test_safe_output_path_accepts_and_blocks_symlink_escape(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    assert E.safe_output_path(str(root), "pcpo/run1") == str(root / "pcpo" / "run1.safetensors")
    assert E.safe_output_path(str(root), "run2.safetensors") == str(root / "run2.safetensors")
    assert E.safe_output_path(str(root), "./a//b") == str(root / "a" / "b.safetensors")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ValueError, match="outside"):
        E.safe_output_path(str(root), "link/x")


def _tmp_files(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_write_lora_atomic(tmp_path, monkeypatch):
    import safetensors.torch
    path = str(tmp_path / "sub" / "l.safetensors")
    first = {"a.lora_down.weight": torch.ones(2, 3)}
    E.write_lora(path, first, {"k": "v"})
    assert _tmp_files(tmp_path / "sub") == []
    assert torch.equal(load_file(path)["a.lora_down.weight"], first["a.lora_down.weight"])
    with safe_open(path, "pt") as f:
        assert f.metadata()["k"] == "v"

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        E.write_lora(path, {"a.lora_down.weight": torch.zeros(2, 3)}, {"k": "new"})
    monkeypatch.undo()
    assert _tmp_files(tmp_path / "sub") == []
    assert torch.equal(load_file(path)["a.lora_down.weight"], first["a.lora_down.weight"])
    with pytest.raises(TypeError):
        E.write_lora(path, first, {"steps": 3})
    # a temp file left by a killed writer is hidden, never has a model extension, and the next
    # successful write of the same file removes it
    stale = tmp_path / "sub" / ".l.safetensors.abc123.partial"
    stale.write_bytes(b"killed mid-write")
    E.write_lora(path, first, {"k": "v"})
    assert _tmp_files(tmp_path / "sub") == [] and os.listdir(tmp_path / "sub") == ["l.safetensors"]


def test_lora_metadata_keys():
    md = E.lora_metadata(arch="SDXL", rank=8, alpha=4.0, prediction="eps", reward="aesthetic",
                         objective="pcpo", steps=120, settings={"lr": 1e-4, "group": 4},
                         extra={"pcpo_reward": "ignored", "pcpo_seed": 7})
    assert md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("8", "4")
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["pcpo_base_model"] == "SDXL" and md["pcpo_reward"] == "aesthetic"
    assert md["pcpo_objective"] == "pcpo" and md["pcpo_steps"] == "120" and md["pcpo_seed"] == "7"
    assert json.loads(md["pcpo_settings"]) == {"group": 4, "lr": 1e-4}
    assert md["pcpo_version"] and all(isinstance(v, str) for v in md.values())
    assert E.lora_metadata(arch="SD15", rank=4, alpha=4)["ss_base_model_version"] == "sd_v1"
    assert E.lora_metadata(arch="Flux", rank=4, alpha=4)["ss_base_model_version"] == "flux1"


# ----------------------------------------------------------------------------- the node

def test_export_node(pack, build, comfy_dirs, caplog):
    import folder_paths
    comfy_nodes = sys.modules["nodes"]  # ComfyUI's nodes.py (ours is imported as PKG)
    assert os.path.dirname(os.path.abspath(comfy_nodes.__file__)) != str(REPO)
    Node = pack.export.PCPOExportLoRA
    assert pack.export.NODE_CLASS_MAPPINGS == {"PCPOExportLoRA": Node}
    assert pack.export.NODE_DISPLAY_NAME_MAPPINGS["PCPOExportLoRA"] == "PCPO Export LoRA"
    req = Node.INPUT_TYPES()["required"]
    assert set(req) == {"session", "filename", "dtype", "also_diffusers"}
    assert all(opts.get("tooltip") for _, opts in req.values())
    assert Node.OUTPUT_NODE and Node.CATEGORY == "PCPO" and Node.RETURN_TYPES == ("STRING",)

    tm = build("sd15")
    mp, adapters = pack.hooks.attach_lora(tm.model, rank=4, alpha=8.0, preset="attention")
    _randomize_up(adapters)
    session = _Session(adapters, mp, pack.hooks.model_family(tm.model),
                       {"pcpo_reward": "colour", "pcpo_objective": "pcpo", "pcpo_steps": "12",
                        "pcpo_settings": json.dumps({"lr": 0.001}), "pcpo_run": "abc"})
    loras = folder_paths.get_folder_paths("loras")[0]
    assert folder_paths.get_filename_list("loras") == []  # primes ComfyUI's file list cache

    res = Node().export(session, "pcpo/run1", "fp16", True)
    path = res["result"][0]
    assert path == os.path.join(loras, "pcpo", "run1.safetensors") and os.path.isfile(path)
    assert res["ui"]["text"] and "pcpo/run1" in res["ui"]["text"][0]
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "8" and md["ss_base_model_version"] == "sd_v1"
    assert md["pcpo_reward"] == "colour" and md["pcpo_steps"] == "12" and md["pcpo_run"] == "abc"
    assert json.loads(md["pcpo_settings"]) == {"lr": 0.001}
    dpath = E.diffusers_output_path(folder_paths.get_output_directory(), "pcpo/run1")
    assert os.path.isfile(dpath) and any(dpath in t for t in res["ui"]["text"])
    assert _tmp_files(os.path.dirname(path)) == []

    # ComfyUI's own LoraLoader finds and applies it with every key loaded
    assert "pcpo/run1.safetensors" in folder_paths.get_filename_list("loras")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (loaded, _clip) = comfy_nodes.LoraLoader().load_lora(tm.model, None, "pcpo/run1.safetensors", 1.0, 0.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert set(loaded.patches) == {f"diffusion_model.{m}.weight" for m in adapters}

    with pytest.raises(ValueError, match="'../evil'"):
        Node().export(session, "../evil", "fp16", False)
    assert not os.path.exists(os.path.join(os.path.dirname(loras), "evil.safetensors"))

    # a DiT: the kohya file is written, the diffusers copy is skipped with a warning
    tf = build("flux")
    mpf, adf = pack.hooks.attach_lora(tf.model, rank=4, alpha=4.0, preset="attention")
    res = Node().export(_Session(adf, mpf, pack.hooks.model_family(tf.model)), "flux_run", "bf16", True)
    assert os.path.isfile(res["result"][0]) and "skipped" in " ".join(res["ui"]["text"])
    assert not os.path.exists(E.diffusers_output_path(folder_paths.get_output_directory(), "flux_run"))


def test_pack_registers_export_node(pcpo):
    """Loaded the way ComfyUI loads custom nodes, the pack exposes the export node.  (The ``pcpo``
    fixture loads it once for the session: loading the repository a second time under another
    folder name would replace every PCPO class in ComfyUI's registry with a second copy holding a
    registry of runs of its own.)"""
    assert pcpo.ok is True
    comfy_nodes = sys.modules["nodes"]
    cls = comfy_nodes.NODE_CLASS_MAPPINGS.get("PCPOExportLoRA")
    assert cls is not None and cls.__name__ == "PCPOExportLoRA"
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.get("PCPOExportLoRA") == "PCPO Export LoRA"


def test_export_node_in_a_prompt(comfy, pcpo, comfy_dirs, caplog):
    """Through ComfyUI's executor (inference mode, caching): demo model -> PCPO LoRA -> export, then
    ComfyUI's LoraLoader applies the file with every key loaded."""
    assert pcpo.ok is True
    prompt = {
        "1": {"class_type": "PCPODemoModelLoader", "inputs": {}},
        "2": {"class_type": "PCPOLoRA", "inputs": {
            "model": ["1", 0], "run_name": "export_e2e", "rank": 4, "alpha": 4.0,
            "target_layers": "all-linear+conv", "learning_rate": 3e-4, "optimizer": "AdamW",
            "weight_decay": 0.0, "seed": 0, "resume": False}},
        "3": {"class_type": "PCPOExportLoRA", "inputs": {
            "session": ["2", 1], "filename": "pcpo/e2e", "dtype": "fp16", "also_diffusers": False}},
    }
    res = comfy.execute_prompt(prompt)
    path = res.outputs["3"][0]
    assert path == os.path.join(str(comfy_dirs["loras"]), "pcpo", "e2e.safetensors") and os.path.isfile(path)
    assert res.ui["3"]["text"]
    session = res.outputs["2"][1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded, _ = sys.modules["nodes"].LoraLoader().load_lora(res.outputs["1"][0], None, "pcpo/e2e.safetensors", 1.0, 0.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert set(loaded.patches) == {f"diffusion_model.{m}.weight" for m in session.adapters}
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["pcpo_run"] == "export_e2e" and json.loads(md["pcpo_settings"])["rank"] == 4
