"""Distributed reinforcement learning: naive parallel rollouts, A3C, Gorila and synchronous policy gradients.

One file per algorithm (``naive.py``, ``a3c.py``, ``gorila.py``, ``sync_pg.py``) on shared code, one module
per concern (``envs.py``, ``models.py``, ``rollout.py``, ``returns.py``, ``policy_gradient.py``,
``metrics.py``; all gathered in ``common.py``); ``config.py`` the typed config (common options and one
options dataclass per algorithm), ``checkpointing.py`` checkpoints and resume, ``report.py`` the summary;
``cli.py`` is ``distlearn rl``; docs/rl.md: formulas and results.
"""

from distlearn.rl.config import ALGORITHMS, OPTIONS, RLConfig, config_for

__all__ = ["ALGORITHMS", "OPTIONS", "RLConfig", "config_for"]
