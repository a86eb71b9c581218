"""Shared by the EASGD test and its workers: the quadratic, its optima and the cases run."""

from __future__ import annotations

import torch

DIMENSION = 3
LR = 0.1  # eta
STEPS = 400  # enough for every case below to reach its fixed point to 1e-4


def optimum(worker: int) -> torch.Tensor:
    """``c_i``: worker ``i``'s own minimum (distinct, so the elastic force is what pulls workers together)."""
    return torch.tensor([1.0, -2.0, 0.5]) * (1 + 2 * worker)


def cases(mode: str) -> list[tuple[str, float, int, str, dict]]:
    """``(label, rho, tau, optimizer, options)``: alpha = LR * rho."""
    if mode == "async":
        return [
            ("async-rho2", 2.0, 1, "sgd", {}),
            ("async-nesterov-tau2", 2.0, 2, "nesterov", {"momentum": 0.5}),
        ]
    return [
        ("sync-rho0", 0.0, 1, "sgd", {}),
        ("sync-rho5", 5.0, 1, "sgd", {}),
        ("sync-rho2-tau3", 2.0, 3, "sgd", {}),
        ("sync-nesterov", 2.0, 2, "nesterov", {"momentum": 0.5}),
        ("sync-torch-nesterov", 2.0, 2, "torch-sgd", {"momentum": 0.5, "nesterov": True}),
    ]
