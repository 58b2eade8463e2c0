"""Gradient compressors with error feedback, on a worker's whole flat float32 gradient.

A worker compresses its gradient ``g`` into a :class:`Payload` (what travels to the
coordinator); the coordinator adds the decoded payloads into its update without
materialising sparse ones. Compressors (``C``) and the error factor ``q`` they guarantee,
``||C(x) - x|| <= q ||x||``:

=============  ==============================================  ===========================
name           payload                                         q
=============  ==============================================  ===========================
``none``       dense float32                                   0
``topk``       k largest ``|x_j|``, exact values                sqrt(1 - k/d), every call
``randomk``    k uniform coordinates, exact values (biased)     sqrt(1 - k/d) in expectation
``qsgd``       ``||x||/s * sign(x_j) * xi_j``, unbiased         sqrt(d)/s every call, or
                                                                sqrt(min(d/s^2, sqrt(d)/s))
                                                                in expectation
``sign``       ``(||x||_1/d) * sign(x)``, bit-packed            sqrt(1 - 1/d), every call
=============  ==============================================  ===========================

With :class:`ErrorFeedback` each worker keeps a memory ``e`` of what compression has not
sent yet: it sends ``C(e + g)`` and keeps ``e + g - C(e + g)``. Nothing is lost: the sum of
everything sent plus the memory equals the sum of all gradients. The memories are exactly
the gap between the model of record and the consistent model (``x - lr * mean(e_i)``), which
is why they are exposed for measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from core.spec import CompressionSpec

PayloadKind = Literal["dense", "sparse", "qsgd", "sign"]

# Fixed part of every payload on the wire: dim as int64 + scale as float64.
_HEADER_BYTES = 16
# Largest dimension whose indices fit int32 (2**31 - 1).
_INT32_MAX = np.iinfo(np.int32).max


def _as_vector(vec: np.ndarray) -> np.ndarray:
    """``vec`` as a 1-D float32 array (no copy when it already is one)."""
    out = np.asarray(vec, dtype=np.float32)
    if out.ndim != 1:
        raise ValueError(f"compressors take a flat 1-D gradient, got shape {out.shape}")
    return out


def _index_dtype(dim: int) -> type[np.signedinteger[Any]]:
    return np.int32 if dim <= _INT32_MAX else np.int64


@dataclass
class Payload:
    """A compressed gradient as it travels from a worker to the coordinator.

    Attributes:
        kind: ``dense`` | ``sparse`` | ``qsgd`` | ``sign``.
        dim: length of the dense vector it stands for.
        values: dense: float32 ``(dim,)``; sparse: float32 ``(k,)``; qsgd: signed integer
            levels ``(dim,)``; sign: bit-packed signs, uint8 ``(ceil(dim/8),)``, bit 1 = +1.
        indices: sparse only: distinct coordinates ``(k,)``, int32 (int64 past 2**31).
        scale: qsgd: ``||x||_2 / levels``; sign: ``||x||_1 / dim``; otherwise 1.0.
    """

    kind: PayloadKind
    dim: int
    values: np.ndarray
    indices: np.ndarray | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        """Cheap shape checks, so a malformed payload fails where it is made or received."""
        expected = {"dense": self.dim, "qsgd": self.dim, "sign": (self.dim + 7) // 8}
        if self.kind == "sparse":
            if self.indices is None or self.indices.shape != self.values.shape:
                raise ValueError("a sparse payload needs indices with the shape of its values")
        elif self.values.shape != (expected[self.kind],):
            raise ValueError(
                f"a {self.kind} payload of dim {self.dim} needs values of shape "
                f"({expected[self.kind]},), got {self.values.shape}"
            )

    def add_to(self, out: np.ndarray, weight: float = 1.0) -> None:
        """``out += weight * decode()``, in place, without densifying sparse payloads.

        Raises:
            ValueError: ``out`` is not a ``(dim,)`` array.
        """
        if out.shape != (self.dim,):
            raise ValueError(f"payload of dim {self.dim} cannot be added to shape {out.shape}")
        if self.kind == "dense":
            out += np.float32(weight) * self.values
        elif self.kind == "sparse":
            assert self.indices is not None  # checked in __post_init__
            out[self.indices] += np.float32(weight) * self.values  # indices are distinct
        elif self.kind == "qsgd":
            out += np.float32(weight * self.scale) * self.values.astype(np.float32)
        else:  # sign: bit 1 -> +1, bit 0 -> -1
            bits = np.unpackbits(self.values, count=self.dim).astype(np.float32)
            out += np.float32(weight * self.scale) * (2.0 * bits - 1.0)

    def decode(self) -> np.ndarray:
        """The dense float32 ``(dim,)`` vector this payload stands for."""
        out = np.zeros(self.dim, dtype=np.float32)
        self.add_to(out)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: values, indices and the fixed header."""
        index_bytes = 0 if self.indices is None else self.indices.nbytes
        return int(self.values.nbytes + index_bytes + _HEADER_BYTES)


class Compressor(Protocol):
    """Maps a flat float32 gradient to a :class:`Payload`; may draw from ``rng``."""

    def compress(self, vec: np.ndarray, rng: np.random.Generator) -> Payload: ...


class Identity:
    """No compression: a dense copy (q = 0)."""

    name = "none"

    # rng: the Compressor protocol's argument; a deterministic compressor draws nothing
    def compress(self, vec: np.ndarray, rng: np.random.Generator) -> Payload:  # noqa: ARG002
        v = _as_vector(vec)
        return Payload("dense", v.size, v.copy())


class TopK:
    """Keep the ``k`` largest-magnitude coordinates, exactly (q = sqrt(1 - k/d), always)."""

    name = "topk"

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"TopK needs k >= 1, got {k}")
        self.k = k

    # rng: the Compressor protocol's argument; a deterministic compressor draws nothing
    def compress(self, vec: np.ndarray, rng: np.random.Generator) -> Payload:  # noqa: ARG002
        v = _as_vector(vec)
        dim, k = v.size, min(self.k, v.size)
        # O(d) selection: after argpartition the k largest |v_j| sit past position dim - k.
        top = np.argpartition(np.abs(v), dim - k)[dim - k :] if k < dim else np.arange(dim)
        idx = np.sort(top)
        return Payload("sparse", dim, v[idx], idx.astype(_index_dtype(dim)))


class RandomK:
    """Keep ``k`` uniformly random coordinates, exact and unscaled (biased; use with EF).

    ``E||C(x) - x||^2 = (1 - k/d) ||x||^2``; every call only ``||C(x) - x|| <= ||x||``.
    """

    name = "randomk"

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"RandomK needs k >= 1, got {k}")
        self.k = k

    def compress(self, vec: np.ndarray, rng: np.random.Generator) -> Payload:
        v = _as_vector(vec)
        dim, k = v.size, min(self.k, v.size)
        idx = np.sort(rng.choice(dim, size=k, replace=False))
        return Payload("sparse", dim, v[idx], idx.astype(_index_dtype(dim)))


class QSGD:
    """Unbiased stochastic quantisation to ``levels`` levels (Alistarh et al. 2017).

    ``Q(x)_j = ||x|| sign(x_j) xi_j / s`` where ``xi_j`` is ``s |x_j| / ||x||`` rounded down
    or up at random so that ``E[Q(x)] = x``.
    """

    name = "qsgd"

    def __init__(self, levels: int) -> None:
        if levels < 1:
            raise ValueError(f"QSGD needs levels >= 1, got {levels}")
        self.levels = levels
        # Smallest signed integer type holding +-levels.
        self.dtype = next(t for t in (np.int8, np.int16, np.int32) if levels <= np.iinfo(t).max)

    def compress(self, vec: np.ndarray, rng: np.random.Generator) -> Payload:
        v = _as_vector(vec)
        norm = float(np.linalg.norm(v.astype(np.float64)))
        if norm == 0.0:
            return Payload("qsgd", v.size, np.zeros(v.size, self.dtype), scale=0.0)
        ratio = np.abs(v.astype(np.float64)) * (self.levels / norm)  # in [0, s]
        lower = np.floor(ratio)
        xi = lower + (rng.random(v.size) < ratio - lower)
        # |x_j| <= ||x|| bounds xi by s; the clip only absorbs float rounding.
        xi = np.minimum(xi, self.levels)
        levels = (np.sign(v) * xi).astype(self.dtype)
        return Payload("qsgd", v.size, levels, scale=norm / self.levels)


class ScaledSign:
    """``(||x||_1 / d) sign(x)``, bit-packed (EF-SignSGD, Karimireddy et al. 2019).

    ``||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d <= (1 - 1/d) ||x||^2`` on every call (zeros
    are sent as +1; the identity still holds since ``|0| = 0``).
    """

    name = "sign"

    # rng: the Compressor protocol's argument; a deterministic compressor draws nothing
    def compress(self, vec: np.ndarray, rng: np.random.Generator) -> Payload:  # noqa: ARG002
        v = _as_vector(vec)
        scale = float(np.abs(v).sum(dtype=np.float64)) / max(v.size, 1)
        return Payload("sign", v.size, np.packbits(v >= 0), scale=scale)


class ErrorFeedback:
    """Per-worker memory e: send C(e + g), keep e <- e + g - decode(C(e + g)).

    Invariant: sum of decoded payloads + memory == sum of gradients (up to float32
    rounding), so compression delays parts of the gradient but never loses them.

    Args:
        compressor: the compressor to wrap.
        dim: length of the flat gradient.
    """

    def __init__(self, compressor: Compressor, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"ErrorFeedback needs dim >= 1, got {dim}")
        self.compressor = compressor
        self.dim = dim
        self.memory = np.zeros(dim, dtype=np.float32)

    def step(self, grad: np.ndarray, rng: np.random.Generator) -> Payload:
        """Compress ``memory + grad`` and keep what was not sent.

        Raises:
            ValueError: ``grad`` has the wrong shape or non-finite values (the memory is
                left untouched, so the step can be skipped safely).
        """
        g = _as_vector(grad)
        if g.shape != (self.dim,):
            raise ValueError(f"gradient of shape {g.shape} does not match dim {self.dim}")
        if not np.isfinite(g).all():
            raise ValueError("gradient has non-finite values; error-feedback memory unchanged")
        acc = self.memory + g
        payload = self.compressor.compress(acc, rng)
        payload.add_to(acc, weight=-1.0)
        self.memory = acc
        return payload

    def memory_norm(self) -> float:
        """``||e||_2``: how much gradient this worker still owes the model."""
        return float(np.linalg.norm(self.memory.astype(np.float64)))

    def state_dict(self) -> dict[str, Any]:
        """``{"dim": int, "memory": float32 array}`` (a copy)."""
        return {"dim": self.dim, "memory": self.memory.copy()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore the memory saved by :meth:`state_dict` (arrays or lists).

        Raises:
            ValueError: the saved dim or memory shape does not match this instance.
        """
        memory = np.array(d["memory"], dtype=np.float32)
        if int(d["dim"]) != self.dim or memory.shape != (self.dim,):
            raise ValueError(
                f"error-feedback state of dim {d['dim']} (memory {memory.shape}) "
                f"does not fit dim {self.dim}"
            )
        self.memory = memory


def _k(spec: CompressionSpec, dim: int) -> int:
    """Coordinates kept by topk/randomk: ``round(fraction * dim)``, within ``[1, dim]``."""
    return min(dim, max(1, round(spec.fraction * dim)))


def make_compressor(spec: CompressionSpec, dim: int) -> Compressor:
    """The compressor named by ``spec`` for gradients of length ``dim``.

    Raises:
        ValueError: ``dim < 1`` or an unknown name.
    """
    if dim < 1:
        raise ValueError(f"compression needs dim >= 1, got {dim}")
    if spec.name == "none":
        return Identity()
    if spec.name == "topk":
        return TopK(_k(spec, dim))
    if spec.name == "randomk":
        return RandomK(_k(spec, dim))
    if spec.name == "qsgd":
        return QSGD(spec.levels)
    if spec.name == "sign":
        return ScaledSign()
    raise ValueError(f"compression.name {spec.name!r} is unknown")


def error_factor(spec: CompressionSpec, dim: int) -> tuple[float, bool]:
    """q with ||C(x) - x|| <= q||x||; True if q holds on every call, False if only in
    expectation (then q = sqrt(E||C(x) - x||^2 / ||x||^2)).

    QSGD reports its deterministic bound ``sqrt(d)/s`` when that is below 1 (a contraction
    on every call), else the expected one ``sqrt(min(d/s^2, sqrt(d)/s))`` (Alistarh et al.
    2017, Lemma 3.1). RandomK's every-call bound is only 1, so its expected one is given.
    """
    if dim < 1:
        raise ValueError(f"compression needs dim >= 1, got {dim}")
    if spec.name == "none":
        return 0.0, True
    if spec.name in ("topk", "randomk"):
        return math.sqrt(1.0 - _k(spec, dim) / dim), spec.name == "topk"
    if spec.name == "qsgd":
        s = spec.levels
        q_det = math.sqrt(dim) / s
        if q_det < 1.0:
            return q_det, True
        return math.sqrt(min(dim / s**2, math.sqrt(dim) / s)), False
    if spec.name == "sign":
        return math.sqrt(1.0 - 1.0 / dim), True
    raise ValueError(f"compression.name {spec.name!r} is unknown")
