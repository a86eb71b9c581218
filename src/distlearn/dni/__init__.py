"""Decoupled neural interfaces: training a network cut into stages with synthetic gradients.

Jaderberg et al. (2016), "Decoupled Neural Interfaces using Synthetic Gradients"; Czarnecki et al. (2017),
"Understanding Synthetic Gradients and Decoupled Neural Interfaces". The page docs/dni.md has the formulas,
where we differ and the measured results.

* :mod:`~distlearn.dni.synthetic`: the synthetic-gradient model ``M(h, y)`` (zero-initialised output,
  optionally conditioned on the label: cDNI), the synthetic-input model and an oracle returning the true
  gradient;
* :mod:`~distlearn.dni.stages`: cutting a network into K stages;
* :mod:`~distlearn.dni.local`: the K stages in one process, each updated at once with its synthetic gradient;
* :mod:`~distlearn.dni.pipeline`: each stage on its own rank, activations up and gradients down
  asynchronously (DNI), or plain model-parallel backprop on the same ranks for comparison: the run of one
  rank (the trainer's data, batch order and evaluation; epochs, state gathering, records, summary);
* :mod:`~distlearn.dni.worker`: one stage's step, its messages and its counters (:class:`StageWorker`);
* :mod:`~distlearn.dni.report`: the run's metrics records (the trainer's ``train``/``eval``/``summary``);
* :mod:`~distlearn.dni.config`: :class:`DNIConfig`, the settings of a run across processes;
* :mod:`~distlearn.dni.cli`: ``python -m distlearn.dni.cli`` (also ``distlearn train --strategy dni``).
"""

from distlearn.dni.config import DNIConfig
from distlearn.dni.local import DNIStepResult, LocalDNI, fit_regression
from distlearn.dni.pipeline import batch_indices, run_pipeline
from distlearn.dni.stages import build_model, cut_points, layer_costs, split_model
from distlearn.dni.synthetic import GradientModel, OracleGradient, SyntheticGradient, SyntheticInput
from distlearn.dni.worker import StageStats, StageWorker

__all__ = [
    "DNIConfig",
    "DNIStepResult",
    "GradientModel",
    "LocalDNI",
    "OracleGradient",
    "SyntheticGradient",
    "StageStats",
    "StageWorker",
    "SyntheticInput",
    "batch_indices",
    "build_model",
    "cut_points",
    "fit_regression",
    "layer_costs",
    "run_pipeline",
    "split_model",
]
