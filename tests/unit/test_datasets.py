"""Unit tests for actors/datasets.py: splits, standardisation, the least-squares optimum,
the npz refusals, losses and evaluation, and that the data is actually learnable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actors.datasets import Dataset, DatasetError, evaluate, load_dataset, loss_fn
from actors.models import build_model
from core.spec import DatasetSpec, ModelSpec

pytestmark = pytest.mark.unit


def _train_sgd(model: nn.Module, ds: Dataset, steps: int, lr: float, batch: int) -> None:
    """Plain single-process minibatch SGD, the baseline the service is measured against."""
    loss = loss_fn(ds.task)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, ds.n_train, batch))
        opt.zero_grad()
        loss(model(x[idx]), y[idx]).backward()
        opt.step()


def test_digits_shapes_dtypes_and_stratified_split() -> None:
    ds = load_dataset(DatasetSpec(name="digits", test_fraction=0.2), seed=0)
    assert ds.task == "classification"
    assert (ds.n_train, ds.n_test) == (1437, 360)  # 1,797 images, 20 % held out
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert (ds.n_features, ds.n_outputs, ds.input_shape) == (64, 10, (8, 8))
    assert ds.optimum is None
    # stratified: every class holds its share of the test set (about 36 of 360)
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_standardised_with_train_statistics() -> None:
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    mean, std = ds.x_train.mean(axis=0), ds.x_train.std(axis=0)
    assert np.allclose(mean, 0.0, atol=1e-5)
    # digits has always-blank pixels: those stay constant 0 instead of dividing by 0
    assert np.all(np.isclose(std, 1.0, atol=1e-4) | np.isclose(std, 0.0))
    assert np.isfinite(ds.x_test).all()
    assert not np.allclose(ds.x_test.mean(axis=0), 0.0, atol=1e-5)  # test stats not used


def test_split_is_fixed_by_seed() -> None:
    spec = DatasetSpec(name="digits")
    a, b, c = load_dataset(spec, 3), load_dataset(spec, 3), load_dataset(spec, 4)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_digits_learnable_by_mlp_with_plain_sgd() -> None:
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", hidden=[64]), ds.n_features, ds.n_outputs)
    _train_sgd(model, ds, steps=400, lr=0.1, batch=64)
    assert evaluate(model, ds)["test_accuracy"] >= 0.95


def test_synthetic_classification_seeded_and_learnable_by_logreg() -> None:
    spec = DatasetSpec(name="synthetic_classification", n_samples=2048, n_features=16, n_classes=4)
    ds = load_dataset(spec, seed=1)
    assert (ds.n_features, ds.n_outputs, ds.n_train + ds.n_test) == (16, 4, 2048)
    assert set(np.unique(ds.y_train)) == {0, 1, 2, 3}
    assert np.array_equal(ds.x_train, load_dataset(spec, seed=1).x_train)
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="logreg"), ds.n_features, ds.n_outputs)
    _train_sgd(model, ds, steps=300, lr=0.1, batch=64)
    assert evaluate(model, ds)["test_accuracy"] >= 0.9


def test_synthetic_refuses_too_few_features_for_classes() -> None:
    spec = DatasetSpec(name="synthetic_classification", n_features=2, n_classes=10)
    with pytest.raises(DatasetError, match="n_features"):
        load_dataset(spec, seed=0)


def _linear_at(ds: Dataset, flat: np.ndarray) -> nn.Linear:
    model = nn.Linear(ds.n_features, 1)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(flat), model.parameters())
    return model


def _train_loss(model: nn.Module, ds: Dataset) -> torch.Tensor:
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    return loss_fn(ds.task)(model(x), y)


def test_least_squares_optimum_is_the_minimiser() -> None:
    spec = DatasetSpec(name="least_squares", n_samples=512, n_features=8, noise=0.1)
    ds = load_dataset(spec, seed=0)
    assert ds.task == "regression" and ds.n_outputs == 1 and ds.y_train.dtype == np.float32
    assert ds.optimum is not None and ds.optimum.shape == (9,) and ds.optimum.dtype == np.float32

    at_opt = _linear_at(ds, ds.optimum)
    loss_opt = _train_loss(at_opt, ds)
    loss_opt.backward()
    grad = torch.cat([p.grad.flatten() for p in at_opt.parameters() if p.grad is not None])

    torch.manual_seed(0)
    random_model = nn.Linear(ds.n_features, 1)
    loss_rand = _train_loss(random_model, ds)
    loss_rand.backward()
    grad_rand = torch.cat(
        [p.grad.flatten() for p in random_model.parameters() if p.grad is not None]
    )

    assert loss_opt.item() <= loss_rand.item()
    # residual noise 0.1: the best mean 0.5*r^2 is about 0.5 * 0.1^2 = 0.005
    assert loss_opt.item() == pytest.approx(0.005, rel=0.25)
    assert grad.norm().item() <= 1e-4 * max(1.0, grad_rand.norm().item())
    # any nearby point is worse
    nudged = _linear_at(ds, ds.optimum + np.float32(0.01))
    assert _train_loss(nudged, ds).item() > loss_opt.item()


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


def test_npz_classification_and_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    _write_npz(tmp_path / "cls.npz", x=x, y=np.arange(40) % 2)
    _write_npz(tmp_path / "reg.npz", x=x, y=x[:, 0].astype(np.float64))
    cls = load_dataset(DatasetSpec(name="npz", path="cls.npz"), seed=0, data_dir=tmp_path)
    reg = load_dataset(DatasetSpec(name="npz", path="reg.npz"), seed=0, data_dir=tmp_path)
    assert (cls.task, cls.n_outputs, cls.y_train.dtype) == ("classification", 2, np.int64)
    assert (reg.task, reg.n_outputs, reg.y_train.dtype) == ("regression", 1, np.float32)
    assert cls.n_train + cls.n_test == 40 and cls.x_train.dtype == np.float32
    assert reg.optimum is None


def test_npz_images_keep_their_shape(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 4, 4))
    _write_npz(tmp_path / "img.npz", x=x, y=np.arange(20) % 2)
    ds = load_dataset(DatasetSpec(name="npz", path="img.npz"), seed=0, data_dir=tmp_path)
    assert ds.input_shape == (4, 4) and ds.n_features == 16


def test_npz_refuses_without_data_dir() -> None:
    with pytest.raises(DatasetError, match=r"dataset\.path"):
        load_dataset(DatasetSpec(name="npz", path="a.npz"), seed=0, data_dir=None)


def test_npz_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.path.*no such file"):
        load_dataset(DatasetSpec(name="npz", path="absent.npz"), seed=0, data_dir=tmp_path)


def test_npz_refuses_symlink_escaping_data_dir(tmp_path: Path) -> None:
    outside = tmp_path / "outside.npz"
    _write_npz(outside, x=np.zeros((10, 2)), y=np.arange(10) % 2)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "link.npz").symlink_to(outside)
    with pytest.raises(DatasetError, match="outside the data directory"):
        load_dataset(DatasetSpec(name="npz", path="link.npz"), seed=0, data_dir=data_dir)


def test_npz_refuses_dotdot_even_if_spec_validation_was_bypassed(tmp_path: Path) -> None:
    _write_npz(tmp_path / "secret.npz", x=np.zeros((10, 2)), y=np.arange(10) % 2)
    (tmp_path / "data").mkdir()
    spec = DatasetSpec.model_construct(name="npz", path="../secret.npz", test_fraction=0.2)
    with pytest.raises(DatasetError, match="outside the data directory"):
        load_dataset(spec, seed=0, data_dir=tmp_path / "data")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((10, 2))}, "lacks"),
        ({"x": np.zeros((10, 2)), "y": np.zeros(9)}, "shape"),
        ({"x": np.zeros(10), "y": np.zeros(10)}, "shape"),
        ({"x": np.full((10, 2), np.nan), "y": np.zeros(10)}, "finite"),
        ({"x": np.zeros((10, 2)), "y": np.array(["a"] * 10)}, "int class ids"),
        ({"x": np.zeros((10, 2)), "y": np.array([object()] * 10)}, "cannot be read"),
    ],
)
def test_npz_refuses_bad_arrays(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset(DatasetSpec(name="npz", path="bad.npz"), seed=0, data_dir=tmp_path)


def test_npz_refuses_a_file_that_is_not_npz(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_dataset(DatasetSpec(name="npz", path="junk.npz"), seed=0, data_dir=tmp_path)


def test_loss_functions() -> None:
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(
        loss_fn("classification")(logits, labels), F.cross_entropy(logits, labels)
    )
    pred, target = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 0.0, 0.0])
    # 0.5 * mean(0, 4, 16) = 10/3
    assert loss_fn("regression")(pred, target).item() == pytest.approx(10 / 3)
    with pytest.raises(ValueError, match="unknown task"):
        loss_fn("ranking")


def test_evaluate_classification_matches_hand_count() -> None:
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="logreg"), ds.n_features, ds.n_outputs)
    metrics = evaluate(model, ds)
    with torch.no_grad():
        out = model(torch.from_numpy(ds.x_test))
    expected_acc = (out.argmax(1).numpy() == ds.y_test).mean()
    assert metrics["test_accuracy"] == pytest.approx(expected_acc)
    assert metrics["test_loss"] == pytest.approx(
        F.cross_entropy(out, torch.from_numpy(ds.y_test)).item(), rel=1e-5
    )


def test_evaluate_regression_reports_mse_and_nan_accuracy() -> None:
    ds = load_dataset(DatasetSpec(name="least_squares", n_samples=256, n_features=4), seed=0)
    assert ds.optimum is not None
    metrics = evaluate(_linear_at(ds, ds.optimum), ds)
    assert math.isnan(metrics["test_accuracy"])
    assert metrics["test_mse"] == pytest.approx(2 * metrics["test_loss"])
    assert metrics["test_mse"] < 1e-3  # noise 0.01: mse about 1e-4 at the optimum
