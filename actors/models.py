"""Model registry: the built-in task's networks, built from a :class:`ModelSpec`.

A user's task brings any module (buffers, dropout: docs/tasks.md); these are the ones a
spec without ``task`` names in its ``model`` section (actors/tasks/builtin.py).

Every model here is plain ``torch.nn`` with parameters only (no buffers, no batch norm, no
dropout), so the coordinator can hold the model of record as a flat parameter vector and a
worker can evaluate a gradient on any *view* of it with
``torch.func.functional_call(model, params, (x,))``. Construction draws its initial weights
from torch's global RNG, so the caller seeds (``torch.manual_seed``) and gets the same model
on every process.

Inputs are always flat rows ``(batch, n_features)``; the CNN reshapes them to images itself,
which keeps datasets, samplers and the wire format model-agnostic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from core.errors import ElasticSGDError
from core.spec import ModelSpec

# The 2x2 max-pool of the CNN halves each spatial side.
_POOL_SIDE = 2


class ModelError(ElasticSGDError, ValueError):
    """A model cannot be built for this data (the message says which setting to change)."""


# Every builder takes the same arguments (the registry below calls them alike); a builder
# that needs fewer ignores the rest.
def _build_logreg(
    spec: ModelSpec,  # noqa: ARG001 - the builders' common signature
    n_features: int,
    n_outputs: int,
    input_shape: tuple[int, ...] | None,  # noqa: ARG001 - the builders' common signature
) -> nn.Module:
    """One affine layer: convex with cross-entropy (classification) or MSE (least squares)."""
    return nn.Linear(n_features, n_outputs)


def _build_mlp(
    spec: ModelSpec,
    n_features: int,
    n_outputs: int,
    input_shape: tuple[int, ...] | None,  # noqa: ARG001 - the builders' common signature
) -> nn.Module:
    """Linear + ReLU per entry of ``spec.hidden``, then a linear read-out."""
    layers: list[nn.Module] = []
    width_in = n_features
    for width in spec.hidden:
        layers += [nn.Linear(width_in, width), nn.ReLU()]
        width_in = width
    layers.append(nn.Linear(width_in, n_outputs))
    return nn.Sequential(*layers)


def _image_shape(n_features: int, input_shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one flat input row.

    Raises:
        ModelError: the shape does not match ``n_features``, the rows are not a square
            image and no shape was given, or the image is too small to pool.
    """
    if input_shape is None:
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise ModelError(
                f"model.name 'cnn' needs image-like inputs: {n_features} features are not a "
                "square image and the dataset gives no input_shape; use model.name 'mlp'"
            )
        shape: tuple[int, int, int] = (1, side, side)
    elif len(input_shape) == 2:
        shape = (1, input_shape[0], input_shape[1])
    elif len(input_shape) == 3:
        shape = (input_shape[0], input_shape[1], input_shape[2])
    else:
        raise ModelError(
            f"model.name 'cnn' needs input_shape (H, W) or (C, H, W), got {input_shape}"
        )
    if math.prod(shape) != n_features:
        raise ModelError(
            f"input_shape {input_shape} holds {math.prod(shape)} values but the rows have "
            f"{n_features} features"
        )
    if min(shape[1:]) < _POOL_SIDE:
        raise ModelError(
            f"model.name 'cnn' needs images at least {_POOL_SIDE}x{_POOL_SIDE} for its "
            f"max-pool, got {shape[1]}x{shape[2]}; use model.name 'mlp'"
        )
    return shape


def _build_cnn(
    spec: ModelSpec, n_features: int, n_outputs: int, input_shape: tuple[int, ...] | None
) -> nn.Module:
    """Two 3x3 convs (padding 1) with ReLU, one 2x2 max-pool, then a linear read-out.

    Channels are ``hidden[0]`` and ``hidden[1]`` (``hidden[0]`` twice if only one is given).
    On 8x8 digits with the default ``hidden=[64]``: 64 x 4 x 4 = 1024 features reach the
    read-out.
    """
    channels_in, height, width = _image_shape(n_features, input_shape)
    c1 = spec.hidden[0]
    c2 = spec.hidden[1] if len(spec.hidden) >= 2 else spec.hidden[0]
    pooled = c2 * (height // _POOL_SIDE) * (width // _POOL_SIDE)
    return nn.Sequential(
        nn.Unflatten(1, (channels_in, height, width)),
        nn.Conv2d(channels_in, c1, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(_POOL_SIDE),
        nn.Flatten(),
        nn.Linear(pooled, n_outputs),
    )


_Builder = Callable[[ModelSpec, int, int, tuple[int, ...] | None], nn.Module]

_REGISTRY: dict[str, _Builder] = {
    "logreg": _build_logreg,
    "mlp": _build_mlp,
    "cnn": _build_cnn,
}

# Must equal the ``ModelName`` Literal in core/spec.py (a unit test checks it).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(
    spec: ModelSpec,
    n_features: int,
    n_outputs: int,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build the network named by ``spec`` for rows of ``n_features`` values.

    Args:
        spec: which network, and its hidden widths (or conv channels for ``cnn``).
        n_features: length of one flat input row.
        n_outputs: number of classes, or 1 for regression.
        input_shape: image shape of a row, ``(H, W)`` or ``(C, H, W)``; only ``cnn`` uses
            it (``None``: a square single-channel image is assumed).

    Returns:
        A float32 module mapping ``(batch, n_features)`` to ``(batch, n_outputs)``, with
        parameters only (no buffers). Its initial weights come from torch's global RNG.

    Raises:
        ModelError: unknown name, non-positive sizes, or inputs the model cannot take.
    """
    if n_features < 1 or n_outputs < 1:
        raise ModelError(
            f"a model needs n_features >= 1 and n_outputs >= 1, got {n_features}, {n_outputs}"
        )
    builder = _REGISTRY.get(spec.name)
    if builder is None:
        raise ModelError(f"model.name {spec.name!r} is unknown; choose one of {MODEL_NAMES}")
    return builder(spec, n_features, n_outputs, input_shape)


def n_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (the length of the flat parameter vector)."""
    return sum(p.numel() for p in model.parameters())
