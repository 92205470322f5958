import pytest
import torch
from hypothesis import given, settings, strategies as st

from comfyui_pcpo.advantages import group_advantages


def test_closed_form_population_std_float64():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.5, 1.5])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    a = group_advantages(r, g)
    s = (2 / 3) ** 0.5
    assert a.values.dtype == torch.float64
    assert torch.allclose(a.values[:3], torch.tensor([-1 / s, 0, 1 / s], dtype=torch.float64), atol=1e-7)
    assert (a.values[3:6] == 0).all() and a.zero_std_groups == 1 and a.num_groups == 3
    assert torch.allclose(a.values[6:], torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-7)


def test_clipping():
    r = torch.tensor([100.0] + [0.0] * 99)
    a = group_advantages(r, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert a.values.max() == 5.0
    assert group_advantages(r, torch.zeros(100, dtype=torch.long), clip=0).values.max() > 9.0


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(-1e3, 1e3, allow_nan=False)), min_size=1, max_size=40),
       st.booleans())
def test_properties_zero_mean_per_group_and_zero_variance_groups(data, make_constant):
    g = torch.tensor([d[0] for d in data])
    r = torch.tensor([d[1] for d in data], dtype=torch.float64)
    if make_constant:
        r[g == g[0]] = 0.1  # one group with identical rewards
    a = group_advantages(r, g, clip=1e9)
    zero = 0
    for gid in torch.unique(g):
        m = g == gid
        vals = a.values[m]
        if bool((r[m] == r[m][0]).all()):
            assert (vals == 0).all()
            zero += 1
        else:
            assert abs(float(vals.mean())) < 1e-9
    assert a.zero_std_groups == zero
    assert torch.isfinite(a.values).all()
