"""What every distlearn optimizer shares: validation, the step driver and the two update paths.

An optimizer here is three layers, as in ``torch.optim``:

1. a :class:`torch.optim.Optimizer` subclass holding param groups, per-parameter state and the
   validation of its hyper-parameters (:class:`distlearn.errors.ConfigError`, a ``ValueError``);
2. :meth:`FirstOrderOptimizer.step`, the driver: it evaluates the closure if one is given, collects the
   parameters that have a gradient, creates missing state, and calls one of the two paths;
3. the paths: ``_single`` -- a readable per-tensor loop that spells the update rule out -- and
   ``_foreach`` -- the same update on whole lists of tensors with ``torch._foreach_*`` kernels, which pay
   Python's per-operation overhead once per step instead of once per tensor. The tests hold the fast
   path to the readable one.

``foreach=None`` (the default) picks the batched path whenever the parameters are dense tensors, on CPU
too; ``torch.optim`` defaults to its per-tensor loop on CPU. ``foreach=False`` forces the readable path.

``flat=True`` goes one step further (the layout of DeepSpeed's and Apex's flat optimizers, and of DDP's
``gradient_as_bucket_view``): the parameters of each group, their gradients and every state buffer become
views of one contiguous buffer per group, and the batched path runs each operation once on that buffer
instead of once per list. See :class:`FlatGroup` for what that changes for the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from distlearn.errors import ConfigError

__all__ = ["FirstOrderOptimizer", "FlatGroup", "Workspace", "check_nonnegative", "check_unit_interval"]


def check_nonnegative(name: str, value: float, optimizer: str, hint: str) -> None:
    """Raise ConfigError unless ``value`` is a finite number >= 0."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (0.0 <= float(value) < float("inf"))
    ):
        raise ConfigError(f"{optimizer}: {name} must be a finite number >= 0, got {value!r}; {hint}")


def check_unit_interval(name: str, value: float, optimizer: str, hint: str) -> None:
    """Raise ConfigError unless ``0 <= value < 1``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{optimizer}: {name} must lie in [0, 1), got {value!r}; {hint}")


class FlatGroup:
    """One param group laid out flat: parameters, gradients and state buffers as views of flat buffers.

    Building it rebinds each parameter's storage (``p.data``) and gradient (``p.grad``) to slices of
    ``self.param`` and ``self.grad``, as DDP's ``gradient_as_bucket_view`` does for gradients. Autograd
    then accumulates into the slices in place, and one kernel updates the whole group. What this asks of
    the caller: every parameter takes part in every step (a parameter that got no gradient gets a zero
    one; a group where no parameter has one is skipped); parameters must share dtype and device and must
    not live in shared memory (Hogwild!'s model: rebinding would unshare it). :meth:`repair` puts back
    any parameter or gradient that was replaced (``model.to(...)``, ``model.zero_grad(set_to_none=True)``),
    at the cost of one copy.
    """

    def __init__(self, params: list[torch.Tensor], optimizer: str) -> None:
        if not params:
            raise ConfigError(f"{optimizer}(flat=True): a param group has no parameters")
        first = params[0]
        for p in params:
            if p.is_sparse or p.layout != torch.strided:
                raise ConfigError(f"{optimizer}(flat=True) needs dense parameters; use flat=False")
            if p.dtype != first.dtype or p.device != first.device:
                raise ConfigError(
                    f"{optimizer}(flat=True): a param group mixes {first.dtype} on {first.device} with "
                    f"{p.dtype} on {p.device}; put each dtype and device in its own param group"
                )
            if p.is_shared():
                raise ConfigError(
                    f"{optimizer}(flat=True) would move parameters out of shared memory (a Hogwild! model); "
                    "use flat=False for shared-memory models"
                )
        self.params = params
        self.numels = [p.numel() for p in params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        total = self.offsets[-1]
        self.param = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros(total, dtype=first.dtype, device=first.device)
        self.buffers: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self.view(self.param, i)
                view.copy_(p)
                p.data = view
                if p.grad is not None:
                    self.view(self.grad, i).copy_(p.grad)
                p.grad = self.view(self.grad, i)
        self._param_ptrs = [p.data_ptr() for p in params]
        self._grad_ptrs = [p.grad.data_ptr() for p in params]
        # The per-parameter numbers of the state (step count, scales) while every parameter steps
        # together: the optimizer keeps them here and writes them to each parameter's state on demand.
        self.live: dict[str, Any] | None = None

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s slice of ``flat``, shaped like the parameter."""
        return flat[self.offsets[i] : self.offsets[i + 1]].view(self.params[i].shape)

    def buffer(self, name: str, i: int) -> torch.Tensor:
        """Parameter ``i``'s slice of the flat state buffer ``name`` (created as zeros on first use)."""
        flat = self.buffers.get(name)
        if flat is None:
            flat = self.buffers[name] = torch.zeros_like(self.param)
        return self.view(flat, i)

    @torch.no_grad()
    def repair(self, params: bool = True) -> None:
        """Rebind any parameter or gradient that no longer is its slice (a copy for each that moved)."""
        for i, p in enumerate(self.params):
            if params and p.data_ptr() != self._param_ptrs[i]:
                if p.is_shared():
                    raise ConfigError(
                        "a flat=True optimizer's parameters were moved into shared memory (a Hogwild! "
                        "model); taking them back would unshare them: build the optimizer with flat=False"
                    )
                view = self.view(self.param, i)
                view.copy_(p)
                p.data = view
            grad = p.grad
            if grad is None:
                view = self.view(self.grad, i)
                view.zero_()
                p.grad = view
            elif grad.data_ptr() != self._grad_ptrs[i]:
                view = self.view(self.grad, i)
                view.copy_(grad)
                p.grad = view

    def adopt_state(self, state: dict[str, Any], names: tuple[str, ...], i: int) -> None:
        """Move parameter ``i``'s state buffers (e.g. just loaded from a checkpoint) into the flat ones."""
        for name in names:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                view = self.buffer(name, i)
                if value.data_ptr() != view.data_ptr():
                    view.copy_(value)
                    state[name] = view


class FirstOrderOptimizer(torch.optim.Optimizer):
    """Base class of the first-order optimizers: one update per ``step()`` from the stored gradients.

    Subclasses set ``state_names`` (the per-parameter buffers, created as zeros) and implement
    ``_single(group, param, grad, state)`` and ``_foreach(group, params, grads, states)``.
    Every group takes ``lr``, ``weight_decay`` (L2: ``g <- g + weight_decay * W`` before the update) and
    ``foreach``; the optimizer takes ``flat`` (see :class:`FlatGroup`).
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, flat: bool = False) -> None:
        name = type(self).__name__
        check_nonnegative("lr", defaults["lr"], name, "use a positive learning rate such as lr=1e-3")
        check_nonnegative("weight_decay", defaults.get("weight_decay", 0.0), name, "use e.g. 5e-4 or 0")
        self.flat = bool(flat)
        self._flat_groups: list[FlatGroup] = []  # one per param group when flat
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one param group's hyper-parameters (groups may override the defaults)."""
        name = type(self).__name__
        check_nonnegative("lr", group["lr"], name, "use a positive learning rate such as lr=1e-3")
        check_nonnegative("weight_decay", group["weight_decay"], name, "use e.g. 5e-4 or 0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "defaults") and len(self.param_groups) > 1:
            self._check_group(self.param_groups[-1])
        if self.flat:
            self._flat_groups.append(FlatGroup(self.param_groups[-1]["params"], type(self).__name__))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients; with ``flat=True`` one fill of each flat gradient (they stay views)."""
        if not self.flat:
            super().zero_grad(set_to_none)
            return
        for flat in self._flat_groups:
            flat.grad.zero_()
            flat.repair(params=False)

    def state_dict(self) -> dict[str, Any]:
        self._sync_flat_numbers()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for flat in self._flat_groups:
            flat.live = None  # the loaded per-parameter state is the truth now
        super().load_state_dict(state_dict)
        self._upgrade_state()
        self._reflatten_state()

    def _sync_flat_numbers(self, leave: bool = False) -> None:
        """Write the flat groups' shared numbers (step counts, scales) into every parameter's state."""
        for flat in self._flat_groups:
            if flat.live is not None:
                for p in flat.params:
                    self.state[p].update(flat.live)
                if leave:
                    flat.live = None

    def _upgrade_state(self) -> None:
        """Convert state saved by an older version of this optimizer (subclasses override)."""

    def _reflatten_state(self) -> None:
        """With ``flat=True``: state tensors that are not slices of the flat buffers are copied into them."""
        for group, flat in zip(self.param_groups, self._flat_groups, strict=False):
            for i, p in enumerate(group["params"]):
                if p in self.state:
                    flat.adopt_state(self.state[p], self.state_names, i)

    def _use_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(not p.is_sparse for p in params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            flat = self._flat_groups[index] if self.flat else None
            if flat is not None:
                if all(p.grad is None for p in group["params"]):
                    continue  # nothing to apply (e.g. a parameter-server worker whose server stepped)
                flat.repair()
                if flat.live is not None:
                    if group["foreach"] is not False:  # the usual step: no per-parameter work at all
                        flat.live["step"] += 1
                        self._flat_run(group, flat, flat.live)
                        continue
                    self._sync_flat_numbers(leave=True)
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            states: list[dict[str, Any]] = []
            all_state = self.state
            for i, p in enumerate(group["params"]):  # per parameter: kept lean, it runs every step
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise ConfigError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use dense embeddings (sparse=False) or torch.optim.SparseAdam"
                    )
                state = all_state[p]
                if not state:
                    state["step"] = 0
                    for buffer in self.state_names:
                        state[buffer] = (
                            flat.buffer(buffer, i)
                            if flat is not None
                            else torch.zeros_like(p, memory_format=torch.preserve_format)
                        )
                    self._initial_state(group, p, state)
                state["step"] += 1
                params.append(p)
                grads.append(grad)
                states.append(state)
            if not params:
                continue
            use_foreach = self._use_foreach(group, params)
            if flat is not None and use_foreach and self._flat_step(group, flat, states):
                continue
            if group["weight_decay"]:
                if use_foreach:
                    grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
                else:
                    grads = [
                        g.add(p, alpha=group["weight_decay"]) for g, p in zip(grads, params, strict=True)
                    ]
            if use_foreach:
                self._foreach(group, params, grads, states)
            else:
                for p, g, state in zip(params, grads, states, strict=True):
                    self._single(group, p, g, state)
        return loss

    def _flat_step(self, group: dict[str, Any], flat: FlatGroup, states: list[dict[str, Any]]) -> bool:
        """The first batched update on the group's flat buffers; False (nothing done) if they cannot be used.

        The per-parameter numbers in the state (step counts, scales) must agree across the group, as
        they do whenever every parameter has stepped together. From here on the group's numbers live in
        ``flat.live`` and later steps skip the per-parameter loop (:meth:`_sync_flat_numbers` writes them
        back for :meth:`state_dict`).
        """
        if len(states) != len(flat.params) or any(name not in flat.buffers for name in self.state_names):
            return False
        numbers = {k: v for k, v in states[0].items() if not isinstance(v, torch.Tensor)}
        for state in states[1:]:
            for key, value in numbers.items():
                if state.get(key) != value:
                    return False
        flat.live = numbers
        self._flat_run(group, flat, numbers)
        return True

    def _flat_run(self, group: dict[str, Any], flat: FlatGroup, numbers: dict[str, Any]) -> None:
        """``_foreach`` on one-element lists: the flat parameter, gradient and state buffers."""
        merged: dict[str, Any] = {**numbers, **flat.buffers}
        grads = [flat.grad]
        if group["weight_decay"]:
            grads = list(torch._foreach_add(grads, [flat.param], alpha=group["weight_decay"]))
        self._foreach(group, [flat.param], grads, [merged])
        for key in numbers:
            numbers[key] = merged[key]

    def _initial_state(self, group: dict[str, Any], param: torch.Tensor, state: dict) -> None:
        """Fill freshly created state buffers (they start as zeros)."""

    def _single(self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _foreach(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def _buffers(states: list[dict[str, Any]], name: str) -> list[torch.Tensor]:
        return [state[name] for state in states]

    def _workspace(self, group: dict[str, Any], params: list[torch.Tensor], count: int) -> Workspace:
        """The group's :class:`Workspace` for ``params``: ``count`` scratch lists, kept from step to step.

        Rebuilt when the group steps a different list of parameters. Not part of the state: never saved.
        """
        cache = self.__dict__.setdefault("_workspaces", {})  # not in __getstate__: may be missing
        first, last = params[0], params[-1]
        key = (tuple(map(id, params)), count, first.shape, first.dtype, last.shape, last.dtype, last.device)
        entry = cache.get(id(group))
        if entry is None or entry.key != key:
            live = {id(g) for g in self.param_groups}
            for stale in [k for k in cache if k not in live]:
                del cache[stale]
            entry = cache[id(group)] = Workspace(key, params, count)
        return entry

    def _flat_state(
        self, group: dict[str, Any], name: str, states: list[dict[str, Any]]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """State buffer ``name`` of ``states`` as a list, and one tensor of which they are consecutive views.

        With ``flat=True`` that tensor is the group's flat buffer (in the per-parameter fallback, the
        buffers stay where they are: slices of it). Otherwise the buffers are moved once
        into one new tensor (their values copied, the state then holding views of it), so that the
        operations that do not involve parameters or gradients run as one kernel; again after a
        ``load_state_dict``. Buffers in shared memory (a Hogwild! optimizer's) or of mixed dtypes or
        devices are left alone: the second value is then None.
        """
        tensors = [state[name] for state in states]
        if len(tensors) == 1:
            only = tensors[0]
            return tensors, only.view(-1) if only.is_contiguous() else None
        cache = self.__dict__.setdefault("_flat_states", {})  # not in __getstate__: may be missing
        ids = tuple(map(id, tensors))
        entry = cache.get((id(group), name))
        if entry is not None and entry[0] == ids:
            return tensors, entry[1]
        first = tensors[0]
        mixed = any(t.dtype != first.dtype or t.device != first.device for t in tensors)
        if self.flat or mixed or any(t.is_shared() for t in tensors):
            cache[(id(group), name)] = (ids, None)
            return tensors, None
        flat = first.new_empty(sum(t.numel() for t in tensors))
        views = list(_views_of(flat, tensors))
        for state, view, tensor in zip(states, views, tensors, strict=True):
            view.copy_(tensor)
            state[name] = view
        cache[(id(group), name)] = (tuple(map(id, views)), flat)
        return views, flat


class Workspace:
    """Scratch tensors for the batched path, kept from one step to the next, and constant tensor lists.

    ``buffers[k][i]`` is shaped like parameter ``i``: the step writes its intermediate results there
    instead of into fresh tensors. A list of fresh tensors as large as the model, freed at the end of
    every step, is memory that the C library may give back to the kernel and fault in again page by
    page at the next step: RMSProp and Adadelta made two such lists, about 1,900 page faults per step
    for a model of 1M parameters (benchmarks/optim_step.py counts them).

    When the parameters share dtype and device, each ``buffers[k]`` is a list of views of one contiguous
    tensor ``flat[k]``, so that operations among scratch buffers alone (:meth:`fill`, :meth:`add_`,
    :meth:`sqrt_`, :meth:`div_`) run as one kernel instead of one per tensor; they compute exactly what
    the list operations would.

    :meth:`constant` gives ``value`` in the form the ``torch._foreach_*`` kernels take fastest: on CPU a
    list of stride-0 views shaped like the parameters (no memory), with which ``_foreach_mul_(xs, c)``
    computes exactly what ``_foreach_mul_(xs, value)`` does in about half the time (the scalar form
    wraps the number once per tensor); elsewhere the number itself (CUDA's batched kernels take it
    directly and want dense tensors).
    """

    def __init__(self, key: tuple, params: list[torch.Tensor], count: int) -> None:
        self.key = key
        self._shapes = [(p.shape, p.dtype, p.device) for p in params]
        self._constants: dict[float, list[torch.Tensor]] = {}
        kinds = {(p.dtype, p.device) for p in params}
        self.flat: list[torch.Tensor | None] = [None] * count
        if len(kinds) == 1:
            total = sum(p.numel() for p in params)
            self.flat = [params[0].new_empty(total) for _ in range(count)]
            self.buffers = [list(_views_of(flat, params)) for flat in self.flat]
        else:
            fmt = torch.contiguous_format
            self.buffers = [[torch.empty_like(p, memory_format=fmt) for p in params] for _ in range(count)]

    def constant(self, value: float) -> list[torch.Tensor] | float:
        """``value`` as one read-only stride-0 tensor per parameter on CPU, else ``value`` itself."""
        views = self._constants.get(value)
        if views is None:
            if any(device.type != "cpu" for _, _, device in self._shapes):
                return value
            if len(self._constants) >= 8:  # values that change every step (a schedule) are not kept
                self._constants.clear()
            scalars: dict[torch.dtype, torch.Tensor] = {}
            views = []
            for shape, dtype, _ in self._shapes:
                scalar = scalars.get(dtype)
                if scalar is None:
                    scalar = scalars[dtype] = torch.tensor(value, dtype=dtype)
                views.append(scalar.expand(shape))
            self._constants[value] = views
        return views

    def fill(self, k: int, value: float) -> None:
        """Set every element of ``buffers[k]`` to ``value``."""
        flat = self.flat[k]
        if flat is not None:
            flat.fill_(value)
        else:
            torch._foreach_zero_(self.buffers[k])
            torch._foreach_add_(self.buffers[k], value)  # 0 + value is value exactly

    def add_(self, k: int, value: float) -> None:
        """``buffers[k] += value``."""
        flat = self.flat[k]
        if flat is not None:
            flat.add_(value)
        else:
            torch._foreach_add_(self.buffers[k], self.constant(value))

    def sqrt_(self, k: int) -> None:
        """``buffers[k] = sqrt(buffers[k])``."""
        flat = self.flat[k]
        if flat is not None:
            flat.sqrt_()
        else:
            torch._foreach_sqrt_(self.buffers[k])

    def div_(self, k: int, j: int) -> None:
        """``buffers[k] /= buffers[j]``."""
        flat, divisor = self.flat[k], self.flat[j]
        if flat is not None and divisor is not None:
            flat.div_(divisor)
        else:
            torch._foreach_div_(self.buffers[k], self.buffers[j])


def _views_of(flat: torch.Tensor, params: list[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Views of ``flat`` shaped like ``params``, one after the other."""
    offset = 0
    for p in params:
        yield flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
