"""Decoupled neural interfaces in one process: K stages, each updated at once with a synthetic gradient.

One training step on a batch ``(x, y)`` of ``B`` examples (Jaderberg et al., 2016, section 3.1, every
layer decoupled), for ``k = 1 .. K`` in order, with ``h_0 = x``::

    h_k      = f_k(h_{k-1}; theta_k)                           # stage k's forward on the real input
    g_hat_k  = M_k(h_k, y) / B          (k < K)                 # synthetic gradient of its output
             = dL/dh_K                  (k = K)                 # the top stage has the true loss
    theta_k <- theta_k - eta * opt( g_hat_k^T dh_k/dtheta_k )  # update now: no waiting for k+1 .. K
    delta_{k-1} = B * g_hat_k^T dh_k/dh_{k-1}                   # what stage k sends down
    phi_{k-1} <- phi_{k-1} - eta_M * opt( d/dphi || M_{k-1}(h_{k-1}, y) - delta_{k-1} ||^2 )

so ``M_{k-1}`` is trained on the gradient stage ``k`` backpropagates from its own synthetic gradient
(bootstrapping; only ``M_{K-1}`` sees the true loss gradient). ``targets="true"`` trains every ``M_k`` on
the true ``B * dL/dh_k`` instead (computed by an extra full backward pass at the step's weights; a
diagnostic, since it needs the whole network locked). Stage ``k`` updates before the stages above it have
run, so with an :class:`~distlearn.dni.synthetic.OracleGradient` in place of every ``M_k`` the step is
exactly a backprop step: each stage's gradient is computed at the same weights backprop would use.

Forward unlocking (``synthetic_inputs=True``, the paper's section 3.3): stage ``k > 1`` takes its own update
on ``f_k(I_k(x))``, a predicted input, and ``I_k`` is fitted to the real ``h_{k-1}``; the real input still
flows up (to fit ``I_{k+1}`` and to compute ``delta_{k-1}``) and is what the network uses at test time.

The same per-stage rule runs across processes in :mod:`distlearn.dni.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from distlearn.dni.synthetic import GradientModel, SyntheticGradient, SyntheticInput
from distlearn.errors import ConfigError

__all__ = ["DNIStepResult", "LocalDNI", "OptimizerFactory", "fit_regression"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class DNIStepResult:
    """What one :meth:`LocalDNI.step` reports."""

    loss: torch.Tensor
    """Training loss of the batch on the real forward pass (detached)."""
    logits: torch.Tensor
    """The top stage's output (detached)."""
    sg_losses: list[float] = field(default_factory=list)
    """Mean squared error of each trainable synthetic-gradient model on its target, before its update."""
    input_losses: list[float] = field(default_factory=list)
    """Mean squared error of each synthetic-input model (forward unlocking), before its update."""


def fit_regression(
    model: nn.Module, optimizer: torch.optim.Optimizer, prediction_input: tuple, target: torch.Tensor
) -> float:
    """One optimizer step of ``model`` on the mean squared error to ``target``; returns the error before."""
    optimizer.zero_grad(set_to_none=True)
    prediction = model(*prediction_input)
    error = nn.functional.mse_loss(prediction, target.detach())
    error.backward()
    optimizer.step()
    return float(error.detach())


class LocalDNI(nn.Module):
    """A network cut into stages joined by decoupled neural interfaces, trained in one process.

    Args:
        stages: the K pieces, in order (e.g. from :func:`distlearn.dni.split_model`).
        example: one input batch (shapes of the interfaces are read from a forward pass of it).
        num_classes: classes of the labels (for cDNI's one-hot).
        optimizer: builds a stage's optimizer from its parameters (one optimizer per stage).
        sg_optimizer: builds a synthetic-gradient (or synthetic-input) model's optimizer.
        conditioned: cDNI (condition every ``M_k`` on the label).
        targets: ``"bootstrap"`` (the paper's feed-forward setting) or ``"true"`` (diagnostic).
        synthetic_inputs: forward unlocking (see the module docstring).
        sg_hidden: hidden widths of each ``M_k`` (default: :class:`SyntheticGradient` 's).
        gradient_models: ready ``M_k`` s (K - 1 of them), e.g. oracles, instead of new synthetic ones.
        loss_fn: the batch-mean training loss, ``loss_fn(logits, y)``.

    Example::

        stages = split_model(build_model("mlp", stages=3), 3, x[:2])
        dni = LocalDNI(stages, example=x[:2], num_classes=10,
                       optimizer=lambda p: torch.optim.Adam(p, 1e-3),
                       sg_optimizer=lambda p: torch.optim.Adam(p, 1e-4))
        for x, y in batches: result = dni.step(x, y)
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        example: torch.Tensor,
        num_classes: int,
        optimizer: OptimizerFactory,
        sg_optimizer: OptimizerFactory | None = None,
        conditioned: bool = False,
        targets: Literal["bootstrap", "true"] = "bootstrap",
        synthetic_inputs: bool = False,
        sg_hidden: Sequence[int] | None = None,
        gradient_models: Sequence[GradientModel] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    ) -> None:
        super().__init__()
        if len(stages) < 1:
            raise ConfigError("LocalDNI needs at least one stage")
        if targets not in ("bootstrap", "true"):
            raise ConfigError(f"targets must be 'bootstrap' or 'true', got {targets!r}")
        self.stages = nn.ModuleList(stages)
        self.num_classes = num_classes
        self.conditioned = conditioned
        self.targets = targets
        self.synthetic_inputs = synthetic_inputs
        self.loss_fn = loss_fn
        with torch.no_grad():
            shapes, h = [], example
            for stage in self.stages:
                h = stage(h)
                shapes.append(tuple(h.shape[1:]))
        if gradient_models is None:
            gradient_models = [
                SyntheticGradient(shape, num_classes=num_classes if conditioned else None, hidden=sg_hidden)
                for shape in shapes[:-1]
            ]
        if len(gradient_models) != len(self.stages) - 1:
            raise ConfigError(
                f"{len(self.stages)} stages need {len(self.stages) - 1} gradient models, "
                f"got {len(gradient_models)}"
            )
        self.gradient_models = nn.ModuleList(gradient_models)
        self.input_models = nn.ModuleList(
            [SyntheticInput(example.shape[1:], shape) for shape in shapes[:-1]] if synthetic_inputs else []
        )
        self.optimizers = [optimizer(stage.parameters()) for stage in self.stages]
        sg_optimizer = sg_optimizer or optimizer
        self.sg_optimizers = [
            sg_optimizer(model.parameters()) if model.trainable else None for model in self.gradient_models
        ]
        self.input_optimizers = [sg_optimizer(model.parameters()) for model in self.input_models]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The composed network (what is evaluated): the real forward pass through every stage."""
        for stage in self.stages:
            x = stage(x)
        return x

    def _true_gradients(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """``B * dL/dh_k`` for every interface at the current weights (no parameter gradients)."""
        activations, h = [], x
        for stage in self.stages[:-1]:
            h = stage(h)
            activations.append(h)
        loss = self.loss_fn(self.stages[-1](h), y)
        return [g * x.shape[0] for g in torch.autograd.grad(loss, activations)]

    def _output_gradient(
        self, k: int, out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dL/d out, loss)`` for the top stage, ``(M_k(out, y) / B, nan)`` below it."""
        if k == len(self.stages) - 1:
            leaf = out.detach().requires_grad_(True)
            loss = self.loss_fn(leaf, y)
            (gradient,) = torch.autograd.grad(loss, leaf)
            return gradient, loss.detach()
        with torch.no_grad():
            synthetic = self.gradient_models[k](out.detach(), y)
        return synthetic / out.shape[0], torch.tensor(float("nan"))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> DNIStepResult:
        """One decoupled training step on the batch ``(x, y)``; every stage and interface model is updated."""
        batch = x.shape[0]
        true_targets = self._true_gradients(x, y) if self.targets == "true" else None
        result = DNIStepResult(loss=torch.tensor(float("nan")), logits=torch.empty(0))
        h_below: torch.Tensor | None = None  # h_{k-1}, the real input of stage k
        h = x
        for k, stage in enumerate(self.stages):
            optimizer = self.optimizers[k]
            optimizer.zero_grad(set_to_none=True)
            inp = h.detach().requires_grad_(k > 0)
            if self.synthetic_inputs and k > 0:
                # Forward-unlocked update: theta_k moves on f_k(I_k(x)); I_k is fitted to the real input.
                result.input_losses.append(
                    fit_regression(self.input_models[k - 1], self.input_optimizers[k - 1], (x,), inp.detach())
                )
                with torch.no_grad():
                    synthetic_input = self.input_models[k - 1](x)
                out_synthetic = stage(synthetic_input)
                out_synthetic.backward(self._output_gradient(k, out_synthetic, y)[0])
                out = stage(inp)  # the real pass: delta for the interface below, input of the stage above
                gradient, loss = self._output_gradient(k, out, y)
                (delta,) = torch.autograd.grad(out, inp, gradient)
            else:
                out = stage(inp)
                gradient, loss = self._output_gradient(k, out, y)
                out.backward(gradient)
                delta = inp.grad if k > 0 else None
            if k > 0 and self.gradient_models[k - 1].trainable:
                assert h_below is not None and delta is not None
                target = true_targets[k - 1] if true_targets is not None else delta * batch
                sg_optimizer = self.sg_optimizers[k - 1]
                assert sg_optimizer is not None
                result.sg_losses.append(
                    fit_regression(self.gradient_models[k - 1], sg_optimizer, (h_below, y), target)
                )
            optimizer.step()
            if k == len(self.stages) - 1:
                result.loss, result.logits = loss, out.detach()
            h_below = out.detach()
            h = h_below
        return result
