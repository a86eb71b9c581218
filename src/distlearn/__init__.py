"""distlearn: distributed deep learning on PyTorch, every strategy behind one API.

See README.md and docs/ for the families: optimizers, synchronous and asynchronous SGD,
communication tricks, synthetic gradients, reinforcement learning and the benchmarks.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
