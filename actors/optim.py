"""The job's ``torch.optim`` optimizer, applied to the flat model of record.

The coordinator keeps the model of record as ONE flat float32 vector ``x`` (modes,
transports and the B̂ monitor rely on it). :class:`RecordOptimizer` hands ``torch.optim``
(SGD, Adam or AdamW, as the spec says) one ``nn.Parameter`` per model parameter that is a
*view* of ``x``'s storage, and one ``.grad`` per parameter that is a view of a flat gradient
buffer: ``optimizer.step()`` writes through into ``x``, and a flat gradient is copied into
the buffer once. Nothing of the update rule is written here: momentum, Adam's moments,
weight decay, the lr schedule (``torch.optim.lr_scheduler``: ``LambdaLR`` for linear
warm-up + cosine, ``StepLR``) and clipping by global norm
(``torch.nn.utils.clip_grad_norm_``) are torch's.

What the modes need on top of ``step``:

* :meth:`RecordOptimizer.step_many`: one update with the mean of several gradients;
* :meth:`RecordOptimizer.step_block`: one parameter's share of an update (per-block elastic:
  ``.grad`` is set for that parameter only, torch skips the others), with the lr of the step
  it belongs to; :meth:`RecordOptimizer.end_step` counts the schedule once per full step;
* :meth:`RecordOptimizer.peek`: a *functional* step (provisional views): the state after one
  or more updates, computed on a scratch optimizer over copies (state copied in, allocated
  once and reused), without touching the record;
* :attr:`RecordOptimizer.lr`: the base lr of the step about to be applied (B̂ is measured in
  units of it, docs/consistency.md); ``state_dict`` / ``load_state_dict`` (optimizer and
  scheduler, exact).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from actors.flat import ParamLayout
from actors.schedules import make_scheduler, schedule_factor
from core.errors import TrainingFailed
from core.spec import OptimizerSpec


def group_settings(spec: OptimizerSpec, layout: ParamLayout) -> list[tuple[float, float]]:
    """``(weight_decay, lr_scale)`` of each parameter of ``layout``, in order.

    The optimizer's own values; with ``no_decay_bias_and_norm`` no weight decay on biases
    and 1-D parameters (norm weights); then the first of ``param_groups`` whose ``match``
    finds the parameter's name overrides the fields it sets.
    """
    out = []
    patterns = [(re.compile(g.match), g) for g in spec.param_groups]
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        wd, scale = spec.weight_decay, 1.0
        if spec.no_decay_bias_and_norm and (len(shape) <= 1 or name.endswith("bias")):
            wd = 0.0
        for pat, g in patterns:
            if pat.search(name):
                wd = wd if g.weight_decay is None else g.weight_decay
                scale = scale if g.lr_scale is None else g.lr_scale
                break
        out.append((wd, scale))
    return out


def torch_param_groups(
    spec: OptimizerSpec, layout: ParamLayout, params: Sequence[torch.Tensor]
) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups: one per distinct ``(weight_decay, lr_scale)``, in
    order of first appearance (the same for a plain module's ``parameters()``)."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for p, (wd, scale) in zip(params, group_settings(spec, layout), strict=True):
        g = groups.setdefault(
            (wd, scale), {"params": [], "weight_decay": wd, "lr": spec.lr * scale}
        )
        g["params"].append(p)
    return list(groups.values())


def make_optimizer(spec: OptimizerSpec, groups: list[dict[str, Any]]) -> Optimizer:
    """The ``torch.optim`` optimizer the spec names, over ``groups``.

    Its fused implementation where torch has one for the parameters' device (CPU and CUDA):
    one pass over a parameter per step instead of one per operation of the update rule
    (SGD with momentum on 1.6M parameters, one thread here: 1.0 ms against 1.7 ms), the
    same update up to rounding.
    """
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params
    )
    if spec.name == "sgd":
        return SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, fused=fused)
    kind = Adam if spec.name == "adam" else AdamW
    return kind(groups, lr=spec.lr, betas=spec.adam_betas, eps=spec.adam_eps, fused=fused)


# devices whose parameters torch.optim's fused SGD, Adam and AdamW take
FUSED_DEVICES = ("cpu", "cuda")


@dataclass
class Snapshot:
    """The record's state at one moment (copies): ``x``, per-parameter optimizer state, and
    the steps taken."""

    x: torch.Tensor
    state: list[dict[str, Any]]
    steps: int


def _copy_state(src: dict[str, Any], dst: dict[str, Any]) -> None:
    """Make ``dst`` (one parameter's optimizer state) equal ``src``, reusing its tensors."""
    for k in [k for k in dst if k not in src]:
        del dst[k]
    for k, v in src.items():
        have = dst.get(k)
        if isinstance(v, torch.Tensor):
            if isinstance(have, torch.Tensor) and have.shape == v.shape:
                have.copy_(v)
            else:
                dst[k] = v.clone()
        else:
            dst[k] = v


class RecordOptimizer:
    """``torch.optim`` over the flat model of record ``x`` (see the module docstring).

    Args:
        spec: the optimizer, schedule, clipping and parameter groups.
        x: the flat model of record (updated in place).
        layout: names, shapes and offsets of the parameters in ``x`` (``None``: ``x`` is
            one parameter named ``x``).
        total_steps: the run's steps (the cosine schedule ends there).
        scheduled: build the lr scheduler (a scratch copy sets its lrs itself).
    """

    def __init__(
        self,
        spec: OptimizerSpec,
        x: torch.Tensor,
        layout: ParamLayout | None = None,
        total_steps: int = 1,
        scheduled: bool = True,
    ) -> None:
        self.spec = spec
        n = x.numel()
        self.layout = layout or ParamLayout(("x",), ((n,),), (0,), n)
        self.blocks = self.layout.blocks()
        self.total_steps = max(total_steps, 1)
        self.scheduled = scheduled
        self.grad = torch.zeros_like(x)
        self.grad_views = [self.grad[lo:hi].view(s) for (lo, hi), s in self._slices()]
        self.steps = 0  # full steps applied (the schedule's count)
        self._scratch: RecordOptimizer | None = None
        self._bind(x)

    def _slices(self) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
        return list(zip(self.blocks, self.layout.shapes, strict=True))

    def _bind(self, x: torch.Tensor) -> None:
        self.x = x
        # nn.Parameter(view) aliases the view's storage: torch's in-place update writes x
        self.params = [nn.Parameter(x[lo:hi].view(s)) for (lo, hi), s in self._slices()]
        self.opt = make_optimizer(
            self.spec, torch_param_groups(self.spec, self.layout, self.params)
        )
        self.base_lrs = [float(g["lr"]) for g in self.opt.param_groups]
        self.sched = (
            make_scheduler(self.spec, self.opt, self.total_steps) if self.scheduled else None
        )
        self.fused = bool(self.opt.defaults.get("fused"))
        # the group each parameter sits in (per-block steps set that group's lr)
        where = {id(p): i for i, g in enumerate(self.opt.param_groups) for p in g["params"]}
        self.group_of = [where[id(p)] for p in self.params]

    def rebind(self, x: torch.Tensor) -> None:
        """Follow the model of record into new memory (``x`` holds its values already)."""
        state = self.state_dict()
        self._bind(x)
        self.load_state_dict(state)

    # -- the learning rate -----------------------------------------------------------------
    def factor_at(self, t: int) -> float:
        """The schedule's factor at step ``t`` (the last step's after the run's end)."""
        return schedule_factor(self.spec, min(t, self.total_steps - 1), self.total_steps)

    @property
    def lr(self) -> float:
        """The base lr (``optimizer.lr`` times the schedule) of the next step to apply: B̂'s
        unit (docs/consistency.md)."""
        return self.spec.lr * self.factor_at(self.steps)

    @property
    def applied_lr(self) -> float:
        """The base lr of the last step applied (that of step 0 before any)."""
        return self.spec.lr * self.factor_at(max(self.steps - 1, 0))

    def _set_lrs(self, t: int) -> None:
        """Give each group the lr of step ``t`` (the scheduler's own value at the current
        step, else the closed form)."""
        if t == self.steps and self.sched is not None:
            return
        f = self.factor_at(t)
        for g, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    # -- full steps ------------------------------------------------------------------------
    def _apply(self) -> None:
        """One ``optimizer.step()`` with the gradient in ``self.grad`` (clipped if asked)."""
        for p, g in zip(self.params, self.grad_views, strict=True):
            p.grad = g
        if self.spec.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.clip_grad_norm)
        self.opt.step()

    def end_step(self) -> None:
        """A full step is applied: count it and advance the schedule."""
        self.steps += 1
        if self.sched is not None:
            self.sched.step()

    def step(self, grad: torch.Tensor, scale: float = 1.0, count: bool = True) -> None:
        """One update with the gradient ``scale * grad`` (``grad`` is not changed).

        Args:
            count: count the step (:meth:`end_step`); ``False`` when the caller counts.
        """
        torch.mul(grad, scale, out=self.grad)
        self._apply()
        if count:
            self.end_step()

    def step_many(self, grads: Sequence[torch.Tensor], scale: float) -> None:
        """One update with the gradient ``scale * sum(grads)``: summed first, then scaled
        (by the fused kernel as it reads the sum, when there is one and no clipping), in
        as few passes over the parameters as that order allows."""
        if not grads:
            return
        if len(grads) == 1:
            torch.mul(grads[0], scale, out=self.grad)
            self._apply()
        else:
            torch.add(grads[0], grads[1], out=self.grad)
            for g in grads[2:]:
                self.grad.add_(g)
            if scale == 1.0:
                self._apply()
            elif self.fused and self.spec.clip_grad_norm is None:
                # the fused kernel divides by grad_scale as it reads the gradient: one pass
                # fewer than scaling the sum first (clipping must see the scaled sum)
                self.opt.grad_scale = torch.tensor(1.0 / scale, device=self.x.device)  # type: ignore[attr-defined]
                try:
                    self._apply()
                finally:
                    self.opt.grad_scale = None  # type: ignore[attr-defined]
            else:
                self.grad.mul_(scale)
                self._apply()
        self.end_step()

    def step_measured(self, grad: torch.Tensor, scale: float = 1.0) -> float:
        """:meth:`step`, returning the update's norm in units of its base lr."""
        lr, before = self.lr, self.x.clone()
        self.step(grad, scale)
        return float(before.sub_(self.x).norm()) / lr

    # -- per-block steps -------------------------------------------------------------------
    def step_block(
        self, b: int, grad: torch.Tensor, scale: float, step_index: int, measure: bool = True
    ) -> float | None:
        """Apply parameter ``b``'s share of step ``step_index``'s update, with that block's
        gradient ``scale * grad``, at the lr of ``step_index`` (only ``b``'s ``.grad`` is
        set, so torch leaves the others and their state alone). Not counted: the caller
        calls :meth:`end_step` once every block of the step is applied. Refused when
        clipping is on (the global norm needs the whole gradient: apply whole steps).

        Returns:
            The norm of the block's update in units of the step's base lr (``None``
            unless ``measure``: measuring copies the block).
        """
        if self.spec.clip_grad_norm is not None:
            raise TrainingFailed(
                "step_block with optimizer.clip_grad_norm: clipping needs the whole "
                "gradient; apply whole steps"
            )
        lo, hi = self.blocks[b]
        torch.mul(grad, scale, out=self.grad[lo:hi])
        before = self.x[lo:hi].clone() if measure else None
        group = self.opt.param_groups[self.group_of[b]]
        saved = group["lr"]
        if step_index != self.steps or self.sched is None:
            group["lr"] = self.base_lrs[self.group_of[b]] * self.factor_at(step_index)
        for i, p in enumerate(self.params):
            p.grad = self.grad_views[i] if i == b else None
        self.opt.step()
        group["lr"] = saved
        if before is None:
            return None
        lr = self.spec.lr * self.factor_at(step_index)
        return float(before.sub_(self.x[lo:hi]).norm()) / lr

    # -- Adam's preconditioner ---------------------------------------------------------------
    def precondition(self, grad: torch.Tensor) -> torch.Tensor | None:
        """``P g``: ``grad`` divided per coordinate by Adam's denominator ``sqrt(v_hat) + eps``
        of the next step, had ``grad`` been that step's gradient (``v`` updated with
        ``grad^2``, bias-corrected at the step count after it); ``None`` for SGD.

        It is a gradient's size in *update units*, the units of B̂ for adaptive optimizers:
        with ``beta1 = 0`` and no weight decay Adam's next update is exactly ``-lr P g``. The
        warm-up measures it for the missing-gradient terms of the bound (docs/consistency.md,
        "Adaptive optimizers"). Nothing changes in the optimizer.
        """
        if not self.spec.adaptive:
            return None
        out = torch.empty_like(grad)
        for p, (lo, hi), gi in zip(self.params, self.blocks, self.group_of, strict=True):
            group = self.opt.param_groups[gi]
            beta2, eps = float(group["betas"][1]), float(group["eps"])
            g = grad[lo:hi]
            st = self.opt.state.get(p)
            t = int(st["step"]) if st else 0
            v = g * g * (1.0 - beta2)
            if st:
                v.add_(st["exp_avg_sq"].reshape(-1), alpha=beta2)
            v.div_(1.0 - beta2 ** (t + 1))
            torch.div(g, v.sqrt_().add_(eps), out=out[lo:hi])
        return out

    # -- functional steps ------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A copy of the record's state now (for :meth:`peek` from it later)."""
        return Snapshot(
            self.x.clone(),
            [copy.deepcopy(self.opt.state.get(p, {})) for p in self.params],
            self.steps,
        )

    def peek(
        self, steps: Sequence[tuple[torch.Tensor, float]], start: Snapshot | None = None
    ) -> torch.Tensor:
        """``x`` after the updates ``scale * grad`` of ``steps``, in order, from the record's
        state now (or from ``start``): computed on a scratch optimizer (reused between
        calls), the record untouched. Step ``i`` uses the lr of step ``steps0 + i``.

        Returns:
            A new tensor (the provisional view).
        """
        s = self._scratch
        if s is None:
            s = RecordOptimizer(self.spec, self.x.clone(), self.layout, self.total_steps, False)
            self._scratch = s
        if start is None:
            s.x.copy_(self.x)
            states = [self.opt.state.get(p, {}) for p in self.params]
            t0 = self.steps
        else:
            s.x.copy_(start.x)
            states, t0 = start.state, start.steps
        for p, st in zip(s.params, states, strict=True):
            if st:
                _copy_state(st, s.opt.state[p])
            else:
                s.opt.state.pop(p, None)
        for i, (g, scale) in enumerate(steps):
            s.steps = t0 + i
            s._set_lrs(t0 + i)
            torch.mul(g, scale, out=s.grad)
            s._apply()
        return s.x.clone()

    def clone(self) -> RecordOptimizer:
        """An independent copy (its own ``x`` and state) that steps on its own."""
        out = RecordOptimizer(self.spec, self.x.clone(), self.layout, self.total_steps)
        out.load_state_dict(self.state_dict())
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and step count (copies: later steps do not change it)."""
        return {
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "scheduler": None if self.sched is None else copy.deepcopy(self.sched.state_dict()),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (exactly: the next step is the same).

        Raises:
            TrainingFailed: ``state`` is not this optimizer's (a checkpoint written by the
                former flat SGD, or by another optimizer kind).
        """
        if "optimizer" not in state:
            raise TrainingFailed(
                "the checkpoint's optimizer state predates torch.optim (keys "
                f"{sorted(state)}); start the job again without resuming"
            )
        self.opt.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])
