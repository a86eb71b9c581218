"""Test-set evaluation, shared by the trainer loop and the model-parallel (DNI) pipeline.

    loss, accuracy = evaluate(model, images, labels, transform, batch_size=1000)
    loss, _ = evaluate(model, x, y, transform, loss_fn=mse_loss, classification=False)   # accuracy None

The mean loss over the examples (cross-entropy unless ``loss_fn`` is given) and, for class-label targets,
the fraction of correct arg-max predictions of ``model`` on ``(images, labels)``, in eval mode and without
gradients; the model's train/eval mode is restored afterwards. A ``loss_fn`` returns the mean over its
batch (as torch's losses do by default); each batch's value is weighted by its number of examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distlearn.devices import to_device

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1000,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    classification: bool = True,
    device: torch.device | None = None,
) -> tuple[float, float | None]:
    """Mean loss and accuracy (None unless ``classification``) of ``model`` on ``(images, labels)``.

    ``device``: where ``model`` computes; each transformed batch is copied there (pinned, non-blocking,
    :func:`distlearn.devices.to_device`) and the sums stay there until the end (one synchronisation).
    """
    device = device if device is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = transform(images[start : start + batch_size])
            y = labels[start : start + batch_size]
            x, y = to_device((x, y), device)
            outputs = model(x)
            if loss_fn is None:
                loss_sum += nn.functional.cross_entropy(outputs, y, reduction="sum").double()
            else:
                loss_sum += loss_fn(outputs, y).detach().double() * len(y)
            if classification:
                correct += (outputs.argmax(dim=1) == y).sum()
    model.train(was_training)
    n = max(1, len(labels))
    return loss_sum.item() / n, correct.item() / n if classification else None
