"""Tuned learning rates per (problem, optimizer): placeholder until the grid is run."""

from __future__ import annotations

__all__ = ["FALLBACK_LR", "TUNED_LR"]

FALLBACK_LR: dict[str, float] = {}
TUNED_LR: dict[str, dict[str, float]] = {}
