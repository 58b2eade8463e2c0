"""Unit tests for the model registry (actors/models.py): shapes, sizes, determinism and
compatibility with ``torch.func.functional_call``."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from actors.models import MODEL_NAMES, ModelError, build_model, n_parameters
from core.spec import ModelName, ModelSpec

pytestmark = pytest.mark.unit


def test_model_names_match_spec_literal() -> None:
    assert get_args(ModelName) == MODEL_NAMES


def test_logreg_is_one_linear_layer() -> None:
    model = build_model(ModelSpec(name="logreg"), n_features=7, n_outputs=3)
    assert isinstance(model, nn.Linear)
    assert model.weight.shape == (3, 7)
    assert model.bias.shape == (3,)


def test_benchmark_mlp_has_documented_parameter_count() -> None:
    model = build_model(ModelSpec(name="mlp", hidden=[1024, 1024]), n_features=512, n_outputs=10)
    # 512*1024+1024 + 1024*1024+1024 + 1024*10+10 = 1,585,162
    assert n_parameters(model) == 1_585_162
    assert model(torch.zeros(5, 512)).shape == (5, 10)


def test_mlp_layers_follow_hidden_widths() -> None:
    model = build_model(ModelSpec(name="mlp", hidden=[16, 8]), n_features=4, n_outputs=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 16), (16, 8), (8, 2)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2


@pytest.mark.parametrize("hidden", [[4], [4, 6]])
def test_cnn_on_digits_shape(hidden: list[int]) -> None:
    model = build_model(ModelSpec(name="cnn", hidden=hidden), 64, 10, input_shape=(8, 8))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [hidden[0], hidden[-1]]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert model(torch.randn(3, 64)).shape == (3, 10)


def test_cnn_infers_square_side_without_input_shape() -> None:
    model = build_model(ModelSpec(name="cnn", hidden=[2]), n_features=36, n_outputs=4)
    assert model(torch.randn(2, 36)).shape == (2, 4)
    read_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert read_out.in_features == 2 * 3 * 3  # 6x6 pooled to 3x3, 2 channels


def test_cnn_refuses_non_square_rows_and_points_to_mlp() -> None:
    with pytest.raises(ValueError, match="mlp"):
        build_model(ModelSpec(name="cnn"), n_features=10, n_outputs=2)


@pytest.mark.parametrize("shape", [(4, 4), (2, 2, 2, 2)])
def test_cnn_refuses_input_shape_that_does_not_fit(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError):
        build_model(ModelSpec(name="cnn"), n_features=64, n_outputs=2, input_shape=shape)


def test_bad_sizes_refused() -> None:
    with pytest.raises(ModelError, match="n_outputs"):
        build_model(ModelSpec(name="mlp"), n_features=4, n_outputs=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights_other_seed_different(name: ModelName) -> None:
    def params(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model = build_model(ModelSpec(name=name, hidden=[4]), 16, 3)
        return torch.nn.utils.parameters_to_vector(model.parameters())

    assert torch.equal(params(0), params(0))
    assert not torch.equal(params(0), params(1))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_functional_call_matches_forward_and_has_no_buffers(name: ModelName) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, hidden=[4]), 16, 3)
    assert list(model.buffers()) == []
    x = torch.randn(5, 16)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))
    assert torch.allclose(out, model(x))
    # A different view of the parameters changes the output: the call really uses them.
    shifted = {k: v + 1.0 for k, v in params.items()}
    assert not torch.allclose(torch.func.functional_call(model, shifted, (x,)), out)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_gradient(name: ModelName) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, hidden=[4]), 16, 3)
    model(torch.randn(8, 16)).square().sum().backward()
    for p in model.parameters():
        assert p.grad is not None
        assert p.grad.abs().sum() > 0
