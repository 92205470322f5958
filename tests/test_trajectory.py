import os

import pytest
import torch

from comfyui_pcpo import schedules, step_plan as plan
from comfyui_pcpo.trajectory import Trajectory


def _traj(B=4, S=3):
    p = plan.flow_plan(schedules.flow_grid(S, 3.0), "constant", 0.3)
    g = torch.Generator().manual_seed(0)
    return Trajectory(torch.randn(B, S + 1, 16, 4, 4, generator=g), torch.randn(B, S, 16, 4, 4, generator=g),
                      torch.randn(B, S, 16, 4, 4, generator=g), torch.tensor([0, 0, 1, 1]),
                      torch.tensor([0, 0, 1, 1]), p, ["a red circle", "a blue square"], {"family": "flux"})


def test_roundtrip_and_no_temp_left(tmp_path):
    t = _traj()
    path = tmp_path / "sub" / "traj.safetensors"
    t.save(str(path))
    assert [f for f in os.listdir(path.parent) if f.startswith(".tmp")] == []
    u = Trajectory.load(str(path))
    for k in ("latents", "eps_old", "pred_old", "group_ids", "prompt_index"):
        assert torch.equal(getattr(t, k), getattr(u, k))
    assert torch.equal(u.plan.w_loss, t.plan.w_loss) and u.plan.family == "flow"
    assert u.sample_prompts() == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert u.meta == {"family": "flux"}
    assert torch.equal(u.x_prev(1), t.latents[:, 2])


def test_to_dtype_and_layout_errors():
    t = _traj()
    h = t.to(dtype=torch.float16)
    assert h.latents.dtype == torch.float16 and h.group_ids.dtype == torch.int64
    with pytest.raises(ValueError, match="layout"):
        Trajectory(t.latents, t.eps_old[:, :2], t.pred_old, t.group_ids, t.prompt_index, t.plan)
    with pytest.raises(ValueError, match="plan"):
        Trajectory(t.latents[:, :3], t.eps_old[:, :2], t.pred_old[:, :2], t.group_ids, t.prompt_index, t.plan)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a PCPO trajectory"):
        Trajectory.load(str(tmp_path / "x.safetensors"))
