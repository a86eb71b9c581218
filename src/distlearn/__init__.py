"""distlearn: distributed deep learning on PyTorch, every strategy behind one API.

See README.md and docs/ for the families: optimizers, synchronous and asynchronous SGD,
communication tricks, synthetic gradients, reinforcement learning and the benchmarks.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["TrainConfig", "__version__", "parallelize", "train"]


def parallelize(model: Any, optimizer: Any, strategy: str = "sync", **options: Any) -> Any:
    """``model, optimizer = distlearn.parallelize(model, optimizer, strategy="sync", ...)``.

    See :func:`distlearn.parallel.api.parallelize`; imported lazily so ``import distlearn`` stays light.
    """
    from distlearn.parallel.api import parallelize as _parallelize

    return _parallelize(model, optimizer, strategy, **options)



def __getattr__(name: str) -> Any:
    """``distlearn.train(config)`` and ``distlearn.TrainConfig``, imported on first use (PEP 562)."""
    if name in ("train", "TrainConfig"):
        import importlib

        package = importlib.import_module("distlearn.train")
        return package if name == "train" else package.TrainConfig
    raise AttributeError(f"module 'distlearn' has no attribute {name!r}")
