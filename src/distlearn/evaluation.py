"""Test-set evaluation, shared by the trainer loop and the model-parallel (DNI) pipeline.

    loss, accuracy = evaluate(model, images, labels, transform, batch_size=1000)

The mean loss (cross-entropy unless ``loss_fn`` is given) and the fraction of correct arg-max predictions of
``model`` on ``(images, labels)``, in eval mode and without gradients; the model's train/eval mode is
restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1000,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(images, labels)``, in eval mode, without grads."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = transform(images[start : start + batch_size])
            y = labels[start : start + batch_size]
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    n = max(1, len(labels))
    return loss_sum.item() / n, correct.item() / n
