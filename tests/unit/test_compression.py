"""Unit tests for actors/compression.py: each compressor's defining property, its error
factor q, the wire size, and the error-feedback invariant (property-based)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actors.compression import (
    QSGD,
    Compressor,
    ErrorFeedback,
    Identity,
    Payload,
    RandomK,
    ScaledSign,
    TopK,
    error_factor,
    make_compressor,
)
from core.spec import CompressionSpec

pytestmark = pytest.mark.unit

Name = Literal["none", "topk", "randomk", "qsgd", "sign"]
NAMES: list[Name] = ["none", "topk", "randomk", "qsgd", "sign"]
# (spec, dim) pairs covering both QSGD regimes: sqrt(64)/16 = 0.5 < 1 (deterministic) and
# sqrt(64)/4 = 2 >= 1 (in expectation).
SPECS = [
    CompressionSpec(name="none"),
    CompressionSpec(name="topk", fraction=0.1),
    CompressionSpec(name="topk", fraction=0.5),
    CompressionSpec(name="randomk", fraction=0.1),
    CompressionSpec(name="qsgd", levels=16),
    CompressionSpec(name="qsgd", levels=4),
    CompressionSpec(name="qsgd", levels=1),
    CompressionSpec(name="sign"),
]


def _vectors(rng: np.random.Generator, dim: int) -> list[np.ndarray]:
    """Gaussian, heavy-tailed, sparse-ish and constant vectors."""
    sparse = rng.standard_normal(dim) * (rng.random(dim) < 0.1)
    sparse[0] = 1.0
    return [
        rng.standard_normal(dim).astype(np.float32),
        rng.standard_cauchy(dim).astype(np.float32),
        sparse.astype(np.float32),
        np.full(dim, 3.0, dtype=np.float32),
    ]


def test_topk_keeps_exactly_the_k_largest() -> None:
    rng = np.random.default_rng(0)
    x = rng.permutation(np.arange(1, 101, dtype=np.float32)) * rng.choice([-1, 1], 100)
    payload = TopK(10).compress(x, rng)
    assert payload.kind == "sparse" and payload.indices is not None
    assert sorted(np.abs(payload.values).tolist()) == list(range(91, 101))
    assert np.array_equal(payload.values, x[payload.indices])  # exact values
    dense = payload.decode()
    assert np.count_nonzero(dense) == 10
    assert np.array_equal(dense[payload.indices], x[payload.indices])


def test_topk_with_k_at_least_dim_is_lossless() -> None:
    x = np.random.default_rng(1).standard_normal(7).astype(np.float32)
    assert np.array_equal(TopK(50).compress(x, np.random.default_rng()).decode(), x)


def test_randomk_keeps_k_distinct_exact_coordinates_chosen_by_rng() -> None:
    x = np.random.default_rng(0).standard_normal(200).astype(np.float32)
    a = RandomK(20).compress(x, np.random.default_rng(5))
    b = RandomK(20).compress(x, np.random.default_rng(5))
    c = RandomK(20).compress(x, np.random.default_rng(6))
    assert a.indices is not None and b.indices is not None and c.indices is not None
    assert len(np.unique(a.indices)) == 20
    assert np.array_equal(a.values, x[a.indices])
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_qsgd_is_unbiased() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20).astype(np.float32)
    n_draws = 4000
    qsgd = QSGD(levels=2)
    mean = np.mean([qsgd.compress(x, rng).decode() for _ in range(n_draws)], axis=0)
    # per coordinate the error is at most ||x||/s, so the mean's std is <= ||x||/(2 s sqrt(N))
    sigma = np.linalg.norm(x) / (2 * 2 * math.sqrt(n_draws))
    assert np.abs(mean - x).max() < 5 * sigma


def test_qsgd_levels_fit_their_integer_type() -> None:
    x = np.array([1.0, -1.0, 0.0], dtype=np.float32)  # |x_j| = ||x||/sqrt(2): level s/sqrt2
    for levels, dtype in [(127, np.int8), (128, np.int16), (65535, np.int32)]:
        payload = QSGD(levels).compress(x, np.random.default_rng(0))
        assert payload.values.dtype == dtype
        assert np.allclose(payload.decode(), x, atol=math.sqrt(2) / levels)


def test_scaled_sign_value_and_zero_vector() -> None:
    x = np.array([3.0, -1.0, 0.0, -4.0], dtype=np.float32)
    payload = ScaledSign().compress(x, np.random.default_rng(0))
    assert payload.scale == pytest.approx(8.0 / 4)  # ||x||_1 / d
    assert np.array_equal(payload.decode(), np.array([2.0, -2.0, 2.0, -2.0], dtype=np.float32))
    assert payload.values.nbytes == 1  # 4 signs packed in one byte
    zero = ScaledSign().compress(np.zeros(9, np.float32), np.random.default_rng(0))
    assert np.array_equal(zero.decode(), np.zeros(9, np.float32))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.fraction}-{s.levels}")
def test_error_factor_bound_holds(spec: CompressionSpec) -> None:
    dim = 64
    q, deterministic = error_factor(spec, dim)
    compressor = make_compressor(spec, dim)
    rng = np.random.default_rng(0)
    for x in _vectors(rng, dim):
        norm = float(np.linalg.norm(x))
        draws = 1 if deterministic else 400
        errors_sq = []
        for _ in range(draws):
            err = float(np.linalg.norm(compressor.compress(x, rng).decode().astype(np.float64) - x))
            errors_sq.append(err**2)
            # every call: q when deterministic, else the trivial bound ||C(x)-x|| <= ...
            if deterministic:
                assert err <= q * norm * (1 + 1e-5) + 1e-6
        if not deterministic:  # the mean of 400 draws, with sampling slack
            assert np.mean(errors_sq) <= 1.15 * q**2 * norm**2


def test_error_factor_values() -> None:
    assert error_factor(CompressionSpec(name="none"), 100) == (0.0, True)
    assert error_factor(CompressionSpec(name="topk", fraction=0.1), 100) == (
        pytest.approx(math.sqrt(0.9)),
        True,
    )
    assert error_factor(CompressionSpec(name="randomk", fraction=0.1), 100) == (
        pytest.approx(math.sqrt(0.9)),
        False,
    )
    assert error_factor(CompressionSpec(name="qsgd", levels=16), 100) == (0.625, True)
    q, det = error_factor(CompressionSpec(name="qsgd", levels=4), 100)  # sqrt(100)/4 = 2.5
    assert (q, det) == (pytest.approx(math.sqrt(min(100 / 16, 10 / 4))), False)
    assert error_factor(CompressionSpec(name="sign"), 4) == (pytest.approx(math.sqrt(0.75)), True)


def test_randomk_expected_error_is_exactly_one_minus_k_over_d() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50).astype(np.float32)
    c = RandomK(10)
    errs = [np.sum((c.compress(x, rng).decode() - x) ** 2) for _ in range(3000)]
    assert np.mean(errs) / np.sum(x**2) == pytest.approx(1 - 10 / 50, rel=0.05)
    assert max(errs) <= np.sum(x**2) * (1 + 1e-6)  # the every-call bound q = 1


def test_make_compressor_kinds_and_k() -> None:
    kinds = {n: make_compressor(CompressionSpec(name=n), 1000) for n in NAMES}
    assert isinstance(kinds["none"], Identity)
    assert isinstance(kinds["topk"], TopK) and kinds["topk"].k == 100
    assert isinstance(kinds["randomk"], RandomK) and kinds["randomk"].k == 100
    assert isinstance(kinds["qsgd"], QSGD) and kinds["qsgd"].levels == 16
    assert isinstance(kinds["sign"], ScaledSign)
    tiny = make_compressor(CompressionSpec(name="topk", fraction=0.001), 10)
    assert isinstance(tiny, TopK) and tiny.k == 1  # never zero coordinates
    with pytest.raises(ValueError, match="dim"):
        make_compressor(CompressionSpec(name="topk"), 0)


def test_wire_sizes() -> None:
    dim = 1000
    x = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    rng = np.random.default_rng(0)
    sizes = {
        n: make_compressor(CompressionSpec(name=n, fraction=0.1), dim).compress(x, rng).nbytes
        for n in NAMES
    }
    assert sizes["none"] >= 4 * dim
    assert sizes["topk"] < sizes["none"] and sizes["randomk"] < sizes["none"]
    assert sizes["topk"] <= 100 * (4 + 4) + 16  # k float32 values + k int32 indices + header
    assert sizes["qsgd"] <= dim + 16  # 16 levels fit int8
    assert sizes["sign"] <= dim // 8 + 16  # one bit per coordinate


@pytest.mark.parametrize("name", NAMES)
def test_decode_and_add_to_agree(name: Name) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(37).astype(np.float32)
    payload = make_compressor(CompressionSpec(name=name), 37).compress(x, rng)
    base = rng.standard_normal(37).astype(np.float32)
    out = base.copy()
    payload.add_to(out, weight=-0.5)
    assert np.allclose(out, base - 0.5 * payload.decode(), atol=1e-6)
    assert payload.decode().dtype == np.float32 and payload.decode().shape == (37,)
    with pytest.raises(ValueError, match="dim"):
        payload.add_to(np.zeros(36, np.float32))


def test_malformed_payloads_refused() -> None:
    with pytest.raises(ValueError, match="indices"):
        Payload("sparse", 10, np.zeros(3, np.float32), np.arange(2))
    with pytest.raises(ValueError, match="shape"):
        Payload("sign", 10, np.zeros(1, np.uint8))  # 10 signs need 2 bytes


def test_identity_payload_does_not_alias_input() -> None:
    x = np.ones(4, np.float32)
    payload = Identity().compress(x, np.random.default_rng(0))
    x[:] = 7.0
    assert np.array_equal(payload.decode(), np.ones(4, np.float32))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(
    dim=st.integers(min_value=1, max_value=300),
    steps=st.integers(min_value=1, max_value=12),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
    fraction=st.floats(min_value=0.01, max_value=1.0),
)
def test_error_feedback_loses_nothing(
    name: Name, dim: int, steps: int, seed: int, magnitude: float, fraction: float
) -> None:
    spec = CompressionSpec(name=name, fraction=fraction, levels=4)
    ef = ErrorFeedback(make_compressor(spec, dim), dim)
    rng = np.random.default_rng(seed)
    sent = np.zeros(dim, np.float64)
    grads = np.zeros(dim, np.float64)
    largest = 0.0
    for _ in range(steps):
        g = (magnitude * rng.standard_normal(dim)).astype(np.float32)
        payload = ef.step(g, rng)
        assert payload.dim == dim
        sent += payload.decode()
        grads += g
        largest = max(largest, float(np.abs(ef.memory).max()), float(np.abs(sent).max()))
    # float32 rounding: a few ulps of the largest magnitude involved, per step
    tol = 8 * steps * np.finfo(np.float32).eps * max(largest, float(np.abs(grads).max()))
    assert np.abs(sent + ef.memory - grads).max() <= tol


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(
    grads=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 40)),
        # zeros, subnormals and wide magnitude ranges inside one vector
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True),
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_error_feedback_loses_nothing_on_adversarial_vectors(
    name: Name, grads: np.ndarray, seed: int
) -> None:
    steps, dim = grads.shape
    ef = ErrorFeedback(make_compressor(CompressionSpec(name=name, fraction=0.2), dim), dim)
    rng = np.random.default_rng(seed)
    sent = np.zeros(dim, np.float64)
    largest = float(np.abs(grads).sum(axis=0).max())
    for g in grads:
        payload = ef.step(g, rng)
        decoded = payload.decode()
        assert np.isfinite(decoded).all()
        sent += decoded
        largest = max(largest, float(np.abs(sent).max()), float(np.abs(ef.memory).max()))
    total = grads.astype(np.float64).sum(axis=0)
    tol = 8 * steps * np.finfo(np.float32).eps * largest
    assert np.abs(sent + ef.memory - total).max() <= tol


def test_error_feedback_topk_eventually_sends_every_coordinate() -> None:
    dim = 10
    ef = ErrorFeedback(TopK(1), dim)
    rng = np.random.default_rng(0)
    g = np.ones(dim, np.float32)
    touched: set[int] = set()
    for _ in range(dim):
        payload = ef.step(g, rng)
        assert payload.indices is not None
        touched.update(payload.indices.tolist())
    assert touched == set(range(dim))  # memory grows where nothing was sent


def test_error_feedback_refuses_bad_gradient_and_keeps_memory() -> None:
    ef = ErrorFeedback(TopK(1), 3)
    rng = np.random.default_rng(0)
    ef.step(np.array([1.0, 2.0, 3.0], np.float32), rng)
    before = ef.memory.copy()
    with pytest.raises(ValueError, match="non-finite"):
        ef.step(np.array([1.0, np.nan, 0.0], np.float32), rng)
    with pytest.raises(ValueError, match="dim"):
        ef.step(np.zeros(4, np.float32), rng)
    assert np.array_equal(ef.memory, before)
    assert ef.memory_norm() == pytest.approx(math.sqrt(5.0))


def test_error_feedback_state_round_trip() -> None:
    compressor: Compressor = QSGD(4)
    ef = ErrorFeedback(compressor, 16)
    ef.step(
        np.random.default_rng(0).standard_normal(16).astype(np.float32), np.random.default_rng(1)
    )
    state = ef.state_dict()
    restored = ErrorFeedback(compressor, 16)
    restored.load_state_dict({"dim": state["dim"], "memory": state["memory"].tolist()})
    assert np.array_equal(restored.memory, ef.memory)
    g = np.ones(16, np.float32)
    a, b = ef.step(g, np.random.default_rng(2)), restored.step(g, np.random.default_rng(2))
    assert np.array_equal(a.decode(), b.decode())
    state["memory"][:] = 0.0  # the state is a copy
    assert np.array_equal(ef.memory, restored.memory)
    with pytest.raises(ValueError, match="does not fit"):
        ErrorFeedback(compressor, 8).load_state_dict(state)
