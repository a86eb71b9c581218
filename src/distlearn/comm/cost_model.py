"""The alpha-beta-gamma cost model of the allreduce algorithms, fitted to measurements and projected.

Paper: R. Thakur, R. Rabenseifner and W. Gropp, "Optimization of Collective Communication Operations in
MPICH", International Journal of High Performance Computing Applications 19(1), 2005, section 2 and 4.
Sending a message of ``n`` bytes between two processes costs ``alpha + n beta`` (``alpha``: latency per
message, ``beta``: transfer time per byte = 1 / bandwidth); reducing ``n`` bytes locally costs ``n gamma``.
With ``p`` processes (``lg`` = log2):

* ring (reduce-scatter + all-gather):     ``2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma``
* binomial tree reduce + broadcast:        ``2 ceil(lg p) (alpha + n beta) + ceil(lg p) n gamma``;
  pipelined over ``s = ceil(n / m)`` segments of at most ``m`` bytes (our model, as :mod:`.reducers` runs
  it): ``L (s + 1) (alpha + n/s beta) + L n/s gamma`` with ``L = ceil(lg p)``: the root sends (and
  receives) ``L`` copies of each segment, one after another, while the reduce going up and the broadcast
  going down share no direction of a link; ``s = 1`` is the formula above.
* Rabenseifner (halving + doubling):      ``2 lg p alpha + 2(p-1)/p n beta + (p-1)/p n gamma`` for p a power
  of two; otherwise, with ``p'`` the largest power of two below p, the formula for ``p'`` plus the
  fold-in/fold-out steps ``2 (alpha + n beta) + n gamma`` (the variant :mod:`.reducers` implements).
* segmented ring, ``s = ceil(n / (p m))`` segments of at most ``m`` bytes per chunk (our model, the paper
  has none for it): ``(2(p-1) + s - 1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma / s``: the pipeline
  takes ``s - 1`` extra message latencies to fill, every link still carries ``2(p-1)/p n`` bytes, and the
  sum of a segment overlaps with the transfer of the next, so only one segment per step is summed on
  the critical path. ``s = 1`` is the ring.
* backend (gloo's allreduce on CPU is a ring): the ring's formula.
* shm (shared memory, every rank on one host; our model): no network, memory bandwidth bound, evaluated on
  a *memory* :class:`Network` (:func:`memory`: ``beta`` = 1 / the single-core memory-copy rate, ``alpha`` =
  one shared-memory flag synchronisation). Counting each byte read and written as half a copied byte, as
  :class:`distlearn.comm.reducers.ShmReducer` runs it: a rank copies the other ranks' chunks of its input
  into its staging slot (``(p-1)/p n``), sums its own chunk from its input and the ``p - 1`` slots and writes
  the sum to its slot and its tensor (``(p+2)/(2p) n``) and copies the other ``p - 1`` reduced chunks back
  (``(p-1)/p n``); each of the ``s = ceil(n / (p piece))`` pieces per chunk waits on three flags:
  ``3 s alpha + (2(p-1)/p + (p+2)/(2p)) n beta``, ``2 n beta`` at ``p = 2``. With ``zero_copy`` (the bucket
  lies in a ``shared_buffer``) the copy-in goes and the sum reads the peers' buffers in place and writes
  once: ``((p+1)/(2p) + (p-1)/p) n beta``, ``1.25 n beta`` at ``p = 2``. The sum is in the ``beta`` term
  (``c = 0``).
* hierarchical (``L`` ranks on each of ``H = p / L`` hosts, NCCL's scheme): the shm reduce-scatter and
  all-gather within each host (the shm formula at ``p = L``, on the memory network) plus ``inner`` (ring by
  default) across the ``H`` hosts on ``n / L`` bytes, on the network: :func:`coefficients` gives the network
  part, :func:`project` adds the memory part. ``L = 1`` is ``inner`` alone, ``H = 1`` is shm alone. As for
  the flat algorithms every rank is assumed to have its own link (GPU servers with one NIC per GPU); where
  the ``L`` ranks of a host share one NIC, their ``L`` cross-host allreduces share it too: pass a link of
  ``1 / L`` the speed.

:func:`fit` estimates ``alpha`` and ``beta`` by linear least squares (numpy) from measured
``(algorithm, p, bytes, seconds)`` points, with ``gamma`` given (measure it by timing ``a.add_(b)``), and by
default minimising *relative* residuals so that microsecond and second-long points weigh alike.
:func:`project` evaluates a formula for any ``p`` on a :class:`Network`; :func:`link` builds one from a
link speed in Gb/s (``beta = 8 / (Gb/s * 1e9)``) and a per-message latency.

Where the model is wrong: it ignores contention (every rank is assumed to have its own full-duplex link,
so the ring's simultaneous send and receive cost ``n beta``, not ``2 n beta``), the CPU cost of the TCP
stack (on one machine's loopback the "link" is memcpy by the same cores that compute), and stragglers.
It is a guide to how the algorithms scale with ``p``, not a prediction to three digits. The shm terms assume
the copies run at one core's copy rate and ignore caches (a bucket that fits in the cache goes faster).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from distlearn.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "Fit",
    "Measurement",
    "Network",
    "bus_bandwidth",
    "coefficients",
    "fit",
    "link",
    "memory",
    "project",
]

ALGORITHMS = ("backend", "ring", "tree", "rabenseifner", "segmented-ring", "shm", "hierarchical")
"""The algorithms the model knows (the names of :data:`distlearn.comm.reducers.REDUCERS`)."""

DEFAULT_SEGMENT_BYTES = 4 << 20
"""The segmented ring's segment size (as :class:`distlearn.comm.reducers.SegmentedRingReducer`)."""

SHM_PIECE_BYTES = 2 << 20
"""The shm reducer's piece size per chunk (as :class:`distlearn.comm.reducers.ShmReducer`; three flag waits
each)."""

DEFAULT_TREE_SEGMENT_BYTES = 4 << 20
"""The tree's segment size (as :class:`distlearn.comm.reducers.TreeReducer`); None: unsegmented."""


MEMORY_COPY_GBPS = 15.3
"""A single-core memory copy of 64 MB on the development machine, GB/s (issue 23's measurement)."""

SHM_SYNC_S = 2e-6
"""Latency of one shared-memory flag synchronisation between two cores (ASSUMED: a few cache-line
transfers and a poll; the issue's goal puts a whole 4 KB allreduce under 20 us)."""

INNER_ALGORITHMS = ("backend", "ring", "tree", "rabenseifner", "segmented-ring")
"""The algorithms the hierarchical reducer can run across hosts."""


@dataclass(frozen=True)
class Network:
    """Costs of one network: ``alpha`` seconds per message, ``beta`` seconds per byte sent, ``gamma``
    seconds per byte reduced."""

    name: str
    alpha: float
    beta: float
    gamma: float = 0.0

    @property
    def bandwidth_GBps(self) -> float:  # noqa: N802 -- the unit's spelling
        return 1.0 / self.beta / 1e9 if self.beta > 0 else math.inf


@dataclass(frozen=True)
class Measurement:
    """One measured allreduce: ``seconds`` for ``nbytes`` bytes on ``p`` processes with ``algorithm``."""

    algorithm: str
    p: int
    nbytes: float
    seconds: float


@dataclass(frozen=True)
class Fit:
    """Fitted ``alpha`` and ``beta`` (``gamma`` as given), with the fit's RMS relative error."""

    alpha: float
    beta: float
    gamma: float
    rms_relative_error: float
    points: int

    def network(self, name: str = "measured") -> Network:
        return Network(name, self.alpha, self.beta, self.gamma)


def link(gbps: float, *, alpha: float, gamma: float = 0.0, name: str | None = None) -> Network:
    """A network of ``gbps`` gigabits/s with ``alpha`` seconds per message and ``gamma`` s/byte reduced."""
    if not gbps > 0 or alpha < 0 or gamma < 0:
        raise ConfigError(f"link needs gbps > 0, alpha >= 0, gamma >= 0; got {gbps}, {alpha}, {gamma}")
    return Network(name or f"{gbps:g} Gb/s", alpha=alpha, beta=8.0 / (gbps * 1e9), gamma=gamma)


def memory(
    copy_gbps: float = MEMORY_COPY_GBPS, *, sync_s: float = SHM_SYNC_S, name: str | None = None
) -> Network:
    """The memory of one host as a :class:`Network` for the shm terms: ``beta`` = 1 / ``copy_gbps`` GB/s (one
    core's copy rate), ``alpha`` = ``sync_s`` per flag synchronisation."""
    if not copy_gbps > 0 or sync_s < 0:
        raise ConfigError(f"memory needs copy_gbps > 0 and sync_s >= 0; got {copy_gbps}, {sync_s}")
    return Network(name or f"memory {copy_gbps:g} GB/s", alpha=sync_s, beta=1.0 / (copy_gbps * 1e9))


def _shm_coefficients(p: int, n: float, zero_copy: bool, piece_bytes: int) -> tuple[float, float, float]:
    if piece_bytes <= 0:
        raise ConfigError(f"shm_piece_bytes must be positive, got {piece_bytes}")
    if p == 1 or n == 0:
        return 0.0, 0.0, 0.0
    pieces = max(1, math.ceil(n / (p * piece_bytes)))  # pieces per chunk
    if zero_copy:  # the sum reads the p chunks in place and writes one; the other chunks copied back
        traffic = (p + 1) / (2 * p) * n + (p - 1) / p * n
    else:  # the other chunks copied in; the sum writes its slot and the tensor; the other chunks copied back
        traffic = (p - 1) / p * n + (p + 2) / (2 * p) * n + (p - 1) / p * n
    return 3.0 * pieces, traffic, 0.0


def _hosts(p: int, local_size: int) -> int:
    if not isinstance(local_size, (int, np.integer)) or local_size < 1 or p % local_size:
        raise ConfigError(
            f"hierarchical: local_size (ranks per host) must be a positive divisor of p = {p}, "
            f"got {local_size!r}"
        )
    return p // local_size


def coefficients(
    algorithm: str,
    p: int,
    nbytes: float,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    tree_segment_bytes: int | None = DEFAULT_TREE_SEGMENT_BYTES,
    local_size: int = 1,
    inner: str = "ring",
    zero_copy: bool = False,
    shm_piece_bytes: int = SHM_PIECE_BYTES,
) -> tuple[float, float, float]:
    """``(a, b, c)`` with ``time = a alpha + b beta + c gamma`` for ``algorithm`` on ``p`` processes.

    ``shm``: on a memory network (:func:`memory`). ``hierarchical``: the network part only, ``inner`` on
    ``p / local_size`` hosts with ``nbytes / local_size`` bytes; its memory part is ``shm`` at
    ``p = local_size`` (:func:`project` adds both)."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")
    if not isinstance(p, (int, np.integer)) or p < 1:
        raise ConfigError(f"p must be a positive integer number of processes, got {p!r}")
    if nbytes < 0:
        raise ConfigError(f"nbytes must be >= 0, got {nbytes}")
    if algorithm == "hierarchical":
        if inner not in INNER_ALGORITHMS:
            raise ConfigError(
                f"unknown inner algorithm {inner!r}; choose one of: {', '.join(INNER_ALGORITHMS)}"
            )
        hosts = _hosts(p, local_size)
        return coefficients(
            inner,
            hosts,
            nbytes / local_size,
            segment_bytes=segment_bytes,
            tree_segment_bytes=tree_segment_bytes,
        )
    if algorithm == "shm":
        return _shm_coefficients(p, float(nbytes), zero_copy, shm_piece_bytes)
    if p == 1 or nbytes == 0:
        return 0.0, 0.0, 0.0
    n = float(nbytes)
    if algorithm in ("ring", "backend"):
        return 2.0 * (p - 1), 2.0 * (p - 1) / p * n, (p - 1) / p * n
    if algorithm == "tree":
        steps = math.ceil(math.log2(p))
        if tree_segment_bytes is not None and tree_segment_bytes <= 0:
            raise ConfigError(f"tree_segment_bytes must be positive or None, got {tree_segment_bytes}")
        segments = 1 if tree_segment_bytes is None else max(1, math.ceil(n / tree_segment_bytes))
        return steps * (segments + 1.0), steps * (segments + 1.0) / segments * n, steps * n / segments
    if algorithm == "rabenseifner":
        active = 1 << (p.bit_length() - 1)
        a, b, c = 2.0 * math.log2(active), 2.0 * (active - 1) / active * n, (active - 1) / active * n
        if active != p:  # fold-in and fold-out steps
            a, b, c = a + 2.0, b + 2.0 * n, c + n
        return a, b, c
    if segment_bytes <= 0:
        raise ConfigError(f"segment_bytes must be positive, got {segment_bytes}")
    segments = max(1, math.ceil(n / (p * segment_bytes)))
    return 2.0 * (p - 1) + segments - 1, 2.0 * (p - 1) / p * n, (p - 1) / p * n / segments


def project(
    algorithm: str,
    p: int,
    nbytes: float,
    network: Network,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    tree_segment_bytes: int | None = DEFAULT_TREE_SEGMENT_BYTES,
    memory_network: Network | None = None,
    local_size: int = 1,
    inner: str = "ring",
    zero_copy: bool = False,
    shm_piece_bytes: int = SHM_PIECE_BYTES,
) -> float:
    """Predicted seconds of one allreduce of ``nbytes`` bytes on ``p`` processes over ``network``.

    ``shm`` (all ``p`` ranks on one host) runs on ``memory_network`` (default :func:`memory`), not on
    ``network``; ``hierarchical`` adds shm at ``p = local_size`` on ``memory_network`` to ``inner`` across the
    ``p / local_size`` hosts on ``network`` (see the module docstring)."""
    mem = memory() if memory_network is None else memory_network
    shm = {"zero_copy": zero_copy, "shm_piece_bytes": shm_piece_bytes}
    if algorithm == "shm":
        a, b, c = coefficients("shm", p, nbytes, **shm)  # type: ignore[arg-type]
        return a * mem.alpha + b * mem.beta + c * mem.gamma
    options = {"segment_bytes": segment_bytes, "tree_segment_bytes": tree_segment_bytes}
    a, b, c = coefficients(algorithm, p, nbytes, local_size=local_size, inner=inner, **options)  # type: ignore[arg-type]
    seconds = a * network.alpha + b * network.beta + c * network.gamma
    if algorithm == "hierarchical":
        a, b, c = coefficients("shm", local_size, nbytes, **shm)  # type: ignore[arg-type]
        seconds += a * mem.alpha + b * mem.beta + c * mem.gamma
    return seconds


def bus_bandwidth(nbytes: float, seconds: float, p: int) -> float:
    """nccl-tests' bus bandwidth in bytes/s: ``algbw * 2(p-1)/p`` with ``algbw = nbytes / seconds``."""
    if seconds <= 0:
        raise ConfigError(f"seconds must be positive, got {seconds}")
    return nbytes / seconds * 2.0 * (p - 1) / p


def fit(
    measurements: Iterable[Measurement | Sequence],
    *,
    gamma: float = 0.0,
    relative: bool = True,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    tree_segment_bytes: int | None = DEFAULT_TREE_SEGMENT_BYTES,
) -> Fit:
    """Least-squares ``alpha``, ``beta`` (both >= 0) from measured allreduce times, ``gamma`` given.

    Each measurement is a :class:`Measurement` or a tuple ``(algorithm, p, nbytes, seconds)``; the model
    ``seconds = a alpha + b beta + c gamma`` with ``(a, b, c)`` from :func:`coefficients` is linear in
    ``alpha`` and ``beta``. ``relative=True`` divides each equation by its measured time (fits relative
    error). Needs at least two points with different sizes (or different ``p``) to separate the two.
    """
    rows, targets = [], []
    count = 0
    for item in measurements:
        m = item if isinstance(item, Measurement) else Measurement(*item)
        if m.seconds <= 0:
            raise ConfigError(f"measured seconds must be positive, got {m.seconds} for {m}")
        a, b, c = coefficients(
            m.algorithm,
            int(m.p),
            m.nbytes,
            segment_bytes=segment_bytes,
            tree_segment_bytes=tree_segment_bytes,
        )
        if a == 0 and b == 0:
            continue  # p = 1 or an empty message: no communication to learn from
        weight = 1.0 / m.seconds if relative else 1.0
        rows.append([a * weight, b * weight])
        targets.append((m.seconds - c * gamma) * weight)
        count += 1
    if count < 2:
        raise ConfigError("fit needs at least two measurements with p > 1 and nbytes > 0")
    matrix, target = np.asarray(rows, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if np.linalg.matrix_rank(matrix) < 2:
        raise ConfigError("fit cannot separate alpha from beta: measure at least two different message sizes")
    # scale the columns so that alpha (~1e-5) and beta (~1e-9) are solved with equal precision
    scale = np.abs(matrix).max(axis=0)
    solution, *_ = np.linalg.lstsq(matrix / scale, target, rcond=None)
    alpha, beta = (solution / scale).tolist()
    if alpha < 0 or beta < 0:  # the constrained optimum lies on an axis: refit the other one alone
        column = 1 if alpha < 0 else 0
        single = matrix[:, column]
        value = max(0.0, float(single @ target / (single @ single)))
        alpha, beta = (0.0, value) if column == 1 else (value, 0.0)
    predicted = matrix @ np.array([alpha, beta])
    residual = (predicted - target) if relative else (predicted - target) / np.maximum(target, 1e-300)
    return Fit(
        alpha=float(alpha),
        beta=float(beta),
        gamma=float(gamma),
        rms_relative_error=float(np.sqrt(np.mean(residual**2))),
        points=count,
    )
