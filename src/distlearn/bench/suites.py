"""The benchmark suites: the same work (model, data, global batch, budget) for every strategy.

A suite is a :class:`Suite`: the shared settings of ``distlearn train`` plus a list of :class:`Entry` s,
each one strategy with its options and worker count. Entries whose strategy (or reducer, or codec) is not
available in this installation are kept in the table as "not available", never silently dropped.
The overview's rule holds throughout: a fixed global batch ``B = R x M``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distlearn.errors import ConfigError

__all__ = ["SUITES", "Entry", "Suite", "get_suite"]


@dataclass(frozen=True)
class Entry:
    """One row of the table: a strategy run with ``workers`` processes and extra ``distlearn train`` flags."""

    label: str
    strategy: str
    workers: int = 1
    flags: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # e.g. ("reducer:ring",) or ("compression:onebit",)


@dataclass(frozen=True)
class Suite:
    name: str
    dataset: str
    model: str
    description: str
    global_batch: int = 128
    epochs: int = 1
    train_samples: int | None = None
    test_samples: int | None = None
    optimizer: str = "adam"
    lr: float = 2e-3
    target: float = 0.8
    eval_every: int = 20
    timeout_s: float = 900.0
    data_root: str | None = None
    threads: int = 1  # torch threads per process: R processes use R cores, the single process one
    entries: tuple[Entry, ...] = field(default_factory=tuple)

    def train_flags(self) -> list[str]:
        flags = [
            "--dataset",
            self.dataset,
            "--model",
            self.model,
            "--optimizer",
            self.optimizer,
            "--lr",
            str(self.lr),
            "--epochs",
            str(self.epochs),
            "--batch-size",
            str(self.global_batch),
            "--eval-every",
            str(self.eval_every),
            "--log-every",
            str(max(1, self.eval_every // 2)),
            "--seed",
            "0",
            "--threads",
            str(self.threads),
        ]
        if self.train_samples:
            flags += ["--train-samples", str(self.train_samples)]
        if self.test_samples:
            flags += ["--test-samples", str(self.test_samples)]
        if self.data_root:
            flags += ["--data-root", self.data_root]
        return flags


def _strategy_entries(workers: int, *, dni_lr: str | None = None) -> tuple[Entry, ...]:
    """Every strategy on ``workers`` processes, in the overview's order: sync, async, tricks, DNI.

    DNI trains with Adam (as the paper); ``dni_lr`` set means the suite's optimizer is another, and the DNI
    rows run Adam with that learning rate instead, which their labels say.
    """
    reducers = ("ring", "tree", "rabenseifner", "segmented-ring", "shm", "hierarchical")
    codecs = (
        "fp16", "bf16", "int8-linear", "int8-tree", "threshold", "onebit", "terngrad", "qsgd", "topk",
        "randomk", "dgc", "powersgd",
    )  # fmt: skip
    w = workers
    ps = ("--servers", "1")
    adam = ("--optimizer", "adam", "--lr", dni_lr) if dni_lr else ()
    adam_label = f" (Adam lr {dni_lr})" if dni_lr else ""
    entries = [
        Entry("single process", "single"),
        Entry(f"torch DDP, R={w}", "ddp", w),
        Entry(f"DDP with our shm comm hook, R={w}", "ddp", w, ("--comm-hook", "shm"), ("reducer:shm",)),
        Entry(f"sync, backend allreduce, R={w}", "sync", w, ("--reducer", "backend")),
        *(
            Entry(f"sync, {r} allreduce, R={w}", "sync", w, ("--reducer", r), (f"reducer:{r}",))
            for r in reducers
        ),
        Entry(
            f"sync, no overlap, per-tensor, R={w}",
            "sync",
            w,
            ("--reducer", "backend", "--no-overlap", "--bucket-mb", "0"),
        ),
        *(
            Entry(f"sync + {c}, R={w}", "sync", w, ("--compression", c), (f"compression:{c}",))
            for c in codecs
            if c != "dgc"
        ),
        Entry(  # DGC applies momentum itself (momentum correction): plain SGD outside it
            f"sync + dgc (SGD, codec momentum 0.9), R={w}",
            "sync",
            w,
            (
                "--compression",
                "dgc",
                "--optimizer",
                "sgd",
                "--lr",
                "0.1",
                "--compression-option",
                "momentum=0.9",
            ),
            ("compression:dgc",),
        ),
        Entry(f"parameter server (async), R={w}", "ps", w + 1, ps, ("strategy:ps",)),
        Entry(f"ps, staleness-aware, R={w}", "ps", w + 1, (*ps, "--staleness-aware"), ("strategy:ps",)),
        Entry(f"ps, {w}-softsync (sync), R={w}", "ps", w + 1, (*ps, "--softsync", str(w)), ("strategy:ps",)),
        Entry(
            f"ps, backup workers b=1, R={w}", "ps", w + 2, (*ps, "--backup-workers", "1"), ("strategy:ps",)
        ),
        Entry(f"ps, k=4 local steps, R={w}", "ps", w + 1, (*ps, "--local-steps", "4"), ("strategy:ps",)),
        Entry(f"hogwild, R={w}", "hogwild", w, (), ("strategy:hogwild",)),
        Entry(f"Buckwild! (8-bit hogwild), R={w}", "hogwild", w, ("--buckwild",), ("strategy:hogwild",)),
        Entry(f"local SGD k=4, R={w}", "local-sgd", w, ("--average-every", "4"), ("strategy:local-sgd",)),
        Entry(f"EASGD tau=4, R={w}", "easgd", w, ("--elastic-tau", "4"), ("strategy:easgd",)),
        Entry(f"DNI, 2 stages{adam_label}", "dni", 2, ("--stages", "2", *adam), ("strategy:dni",)),
        Entry(f"cDNI, 2 stages{adam_label}", "dni", 2, ("--stages", "2", "--cdni", *adam), ("strategy:dni",)),
    ]
    return tuple(entries)


SUITES: dict[str, Suite] = {
    "quick": Suite(
        "quick",
        "fashion-mnist",
        "mlp",
        "every strategy on 12,000 Fashion-MNIST images, one epoch of an MLP, R = 2 (a few minutes here)",
        train_samples=12_000,
        test_samples=2_000,
        target=0.8,
        eval_every=15,
        entries=_strategy_entries(2),
    ),
    "fashion-mnist": Suite(
        "fashion-mnist",
        "fashion-mnist",
        "lenet",
        "every strategy on full Fashion-MNIST, LeNet, 3 epochs, R = 2",
        epochs=3,
        target=0.88,
        eval_every=100,
        timeout_s=3600,
        entries=_strategy_entries(2),
    ),
    "mnist": Suite(
        "mnist",
        "mnist",
        "mlp",
        "every strategy on the MNIST test-set split (8,000/2,000), MLP, 5 epochs, R = 2",
        epochs=5,
        target=0.93,
        eval_every=25,
        data_root=None,
        entries=_strategy_entries(2),
    ),
    "cifar10": Suite(
        "cifar10",
        "cifar10",
        "resnet8",
        "every strategy on CIFAR-10, ResNet-8, 2 epochs, R = 2",
        optimizer="nesterov",
        lr=0.05,
        epochs=2,
        target=0.5,
        eval_every=100,
        timeout_s=7200,
        entries=_strategy_entries(2, dni_lr="1e-3"),
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        others = "toy, comm, rl"
        raise ConfigError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}, {others}")
    return SUITES[name]
