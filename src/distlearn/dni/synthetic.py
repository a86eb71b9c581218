"""Synthetic-gradient and synthetic-input models: what a decoupled neural interface predicts.

Jaderberg et al. (2016), "Decoupled Neural Interfaces using Synthetic Gradients", section 2: a layer with
output activation ``h_k`` is updated with a *synthetic gradient*

    g_hat_k = M_k(h_k, c)  ~  dL/dh_k,          theta_k <- theta_k - eta * g_hat_k^T dh_k/dtheta_k

where ``M_k`` is a small network with parameters ``phi_k`` and ``c`` optional context: the label one-hot
for the conditioned variant (cDNI). ``M_k`` is trained by regression,
``L_SG = || g_hat_k - delta_k ||^2``, on a target ``delta_k`` that is either the true gradient
``dL/dh_k`` or the gradient the layer above backpropagates from *its own* synthetic gradient,
``delta_k = g_hat_{k+1}^T dh_{k+1}/dh_k`` (bootstrapping, the paper's default for feed-forward nets). The
last layer of ``M_k`` is initialised to zero (the paper: "the final layer ... initialised to zero"), so at
the start every synthetic gradient is 0 and the layers below are not pushed anywhere until ``M_k`` has
learnt something. Czarnecki et al. (2017), "Understanding Synthetic Gradients and Decoupled Neural
Interfaces", show that with a linear ``M_k`` the critical points of the original loss are kept, and that
the zero initialisation matters. This class's default ``M_k`` is deeper (like the paper's), ``hidden=()``
gives the linear one they analyse; the pipeline and ``distlearn train --strategy dni`` pass
``DNIConfig.sg_hidden``, whose default ``()`` is that linear model (docs/dni.md, detail 1).

*Forward unlocking* (the paper's section 3.3, "synthetic inputs"): ``I_k(x) ~ h_{k-1}`` predicts a
stage's input from the data, so the stage can be trained before the stage below has produced anything;
``I_k`` is trained by regression on the real ``h_{k-1}`` when it arrives (:class:`SyntheticInput`).

Where we differ from the paper:

* **Scale.** ``M_k`` predicts ``B * dL/dh_k`` for the batch-mean loss ``L`` over ``B`` examples, i.e. the
  gradient of *each example's own* loss, which does not shrink with the batch size; the stage divides it
  by ``B`` before using it. The paper's losses are sums over the batch, where the two coincide.
* **No batch normalisation** in ``M_k`` (the paper's FCN synthetic-gradient models have it): on CPU with
  small batches it only added cost; the zero-initialised output layer is kept.
* The conditioned ``M_k`` adds a linear function of the one-hot label to its first layer, which is the
  paper's "concatenate the label" written without building the concatenated tensor (for images the
  one-hot is broadcast as extra input channels, i.e. concatenated).

:class:`OracleGradient` is a stand-in that returns the *true* gradient by running the stages above: with
it a DNI step is exactly a backprop step (the test of the mechanics in tests/dni/).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from distlearn.errors import ConfigError

__all__ = ["GradientModel", "OracleGradient", "SyntheticGradient", "SyntheticInput"]


class GradientModel(nn.Module):
    """What a stage asks for the gradient of its output: ``model(h, y) -> B * dL/dh`` (same shape as h).

    ``trainable`` says whether the stage should fit it to the targets it receives (:meth:`fit`).
    """

    trainable: bool = True

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return nn.functional.one_hot(y, num_classes).to(torch.float32)


class SyntheticGradient(GradientModel):
    """``M(h, c)``: predicts ``B * dL/dh`` from the activation ``h`` (and the label for cDNI).

    Args:
        shape: the activation's shape without the batch dimension: ``(features,)`` for fully connected
            stages, ``(channels, height, width)`` for convolutional ones.
        num_classes: condition on the label one-hot (cDNI) when given; ``None`` for plain DNI.
        hidden: width of each hidden layer (fully connected) or channels of each hidden convolution;
            ``()`` gives a linear model (Czarnecki et al.'s analysis). Default: two layers of 1024 units,
            the paper's MNIST setting; convolutional activations use ``(128, 128)``-channel 5x5 convs.
        kernel_size: of the convolutions, for image activations (padding keeps the spatial size).

    The output layer starts at zero, so the first synthetic gradients are exactly 0.

    Tuning: the synthetic-gradient optimizer's rate is as important as the model's; the paper uses Adam
    for both. A linear model learns fastest but underfits deep stacks; conditioning on the label (cDNI)
    makes the top interface's job nearly linear (``dL/dlogits = softmax - onehot``) and helps most.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        num_classes: int | None = None,
        hidden: Sequence[int] | None = None,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (1, 3) or min(self.shape) < 1:
            raise ConfigError(
                f"a synthetic-gradient model needs an activation of shape (features,) or (C, H, W), "
                f"got {self.shape}; cut the model after a fully connected or convolutional block"
            )
        self.num_classes = num_classes
        self.convolutional = len(self.shape) == 3
        if hidden is None:
            hidden = (128, 128) if self.convolutional else (1024, 1024)
        self.hidden = tuple(hidden)
        self.layers = nn.ModuleList()
        self.label_layer: nn.Module | None = None
        if self.convolutional:
            channels = self.shape[0] + (num_classes or 0)
            for width in self.hidden:
                self.layers.append(nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2))
                channels = width
            self.layers.append(nn.Conv2d(channels, self.shape[0], kernel_size, padding=kernel_size // 2))
        else:
            width_in = self.shape[0]
            for width in self.hidden:
                self.layers.append(nn.Linear(width_in, width))
                width_in = width
            self.layers.append(nn.Linear(width_in, self.shape[0]))
            if num_classes is not None:  # the label enters the first layer: a concatenation, as a sum
                first_out = self.hidden[0] if self.hidden else self.shape[0]
                self.label_layer = nn.Linear(num_classes, first_out, bias=False)
        # Jaderberg et al.: zero-initialised output, so g_hat = 0 until M has been trained.
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        if self.label_layer is not None and not self.hidden:
            nn.init.zeros_(self.label_layer.weight)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(h.shape[1:]) != self.shape:
            raise ValueError(f"expected activations of shape (N, {self.shape}), got {tuple(h.shape)}")
        if self.num_classes is not None and y is None:
            raise ValueError("this synthetic-gradient model is conditioned on the label (cDNI); pass y")
        out = h
        if self.convolutional:
            if self.num_classes is not None:
                assert y is not None
                labels = _one_hot(y, self.num_classes)[:, :, None, None]  # (N, classes, 1, 1)
                out = torch.cat([h, labels.expand(-1, -1, h.shape[2], h.shape[3])], dim=1)
            for index, layer in enumerate(self.layers):
                out = layer(out)
                if index < len(self.layers) - 1:
                    out = torch.relu(out)
            return out
        for index, layer in enumerate(self.layers):
            z = layer(out)
            if index == 0 and self.label_layer is not None:
                assert y is not None
                z = z + self.label_layer(_one_hot(y, self.label_layer.in_features))
            out = torch.relu(z) if index < len(self.layers) - 1 else z
        return out

    def extra_repr(self) -> str:
        kind = "cDNI" if self.num_classes is not None else "DNI"
        return f"{kind}, activation {self.shape}, hidden {self.hidden}"


class OracleGradient(GradientModel):
    """Returns the true ``B * dL/dh``: the stages above are run from ``h`` and differentiated.

    Args:
        upper: the stages above this interface, composed (``upper(h)`` gives the logits).
        loss_fn: ``loss_fn(logits, y)``, the batch-mean training loss.

    Not trainable, no parameters of its own; the stages above see no gradient from it (only ``h``'s
    gradient is taken). With dropout above the interface its masks differ from the real forward pass.
    """

    trainable = False

    def __init__(self, upper: Callable[[torch.Tensor], torch.Tensor], loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.upper = upper
        self.loss_fn = loss_fn

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("the oracle needs the labels to compute the loss")
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            loss = self.loss_fn(self.upper(h), y)
            (gradient,) = torch.autograd.grad(loss, h)
        return gradient * h.shape[0]


class SyntheticInput(nn.Module):
    """``I(x) ~ h``: predicts a stage's input activation from the data (forward unlocking).

    Args:
        input_shape: the data's shape without the batch dimension, e.g. ``(1, 28, 28)``.
        target_shape: the activation's shape without the batch dimension.
        hidden: hidden widths of the fully connected predictor (input flattened, output reshaped).
    """

    def __init__(
        self, input_shape: Sequence[int], target_shape: Sequence[int], *, hidden: Sequence[int] = (1024,)
    ) -> None:
        super().__init__()
        self.target_shape = tuple(int(s) for s in target_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers.append(nn.Linear(width, math.prod(self.target_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], *self.target_shape)
