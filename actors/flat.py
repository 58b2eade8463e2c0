"""A model's parameters as one flat float32 vector, and back.

The coordinator keeps the model of record flat (one optimizer pass, one copy per view);
workers compute on views of that vector without unflattening copies: each parameter is a
reshaped slice of the flat view, made a leaf, and ``torch.func.functional_call`` runs the
module on those slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a module's parameters inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, module: nn.Module) -> ParamLayout:
        names, shapes, offsets = [], [], []
        off = 0
        for name, p in module.named_parameters():
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(off)
            off += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), off)

    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    def blocks(self) -> list[tuple[int, int]]:
        """Each parameter's ``[lo, hi)`` range in the flat vector (its *block*)."""
        return [(o, o + n) for o, n in zip(self.offsets, self.sizes(), strict=True)]

    def pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Leaf tensors sharing ``flat``'s memory, one per parameter, requiring grad."""
        return [
            flat[o : o + n].view(s).detach().requires_grad_(True)
            for o, n, s in zip(self.offsets, self.sizes(), self.shapes, strict=True)
        ]

    def params(self, pieces: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, pieces, strict=True))

    def write_grads(self, grads: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        """Copy per-parameter gradients into the flat ``out`` (one copy, no concat)."""
        for g, o, n in zip(grads, self.offsets, self.sizes(), strict=True):
            out[o : o + n].copy_(g.reshape(-1))


def flatten(module: nn.Module) -> torch.Tensor:
    """The module's parameters as a new flat float32 CPU tensor."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in module.parameters()])


def load_flat(module: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the module's parameters."""
    device = next(module.parameters()).device
    torch.nn.utils.vector_to_parameters(flat.to(device), module.parameters())
