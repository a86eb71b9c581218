"""The logarithmic allreduces: the binomial tree (pipelined) and Rabenseifner's halving-doubling."""

from __future__ import annotations

import functools

import torch

from distlearn.comm.reducers.base import Channel, Message, Reducer, Rounds, _Op, chunk_bounds
from distlearn.comm.reducers.ring import _Segmented

__all__ = ["RabenseifnerReducer", "TreeReducer"]


class TreeReducer(_Segmented):
    """Binomial-tree reduce to rank 0, then binomial-tree broadcast from rank 0, pipelined over segments.

    Paper: Thakur et al. (2005), sections 4.1 (broadcast) and 4.3 (reduce). Reduce: for mask = 1, 2, 4, ...,
    a rank whose bit ``mask`` is set sends its partial sum to ``rank - mask`` and is done; otherwise it
    receives from ``rank + mask`` (if that rank exists) and adds. Broadcast: the same tree backwards, each
    rank receiving from its parent and then sending to its children (all children at once). Unsegmented
    time ``2 ceil(log2 p) (alpha + n beta) + ceil(log2 p) n gamma``; every non-root rank sends n bytes in
    the reduce, every rank n bytes per child in the broadcast (``2(p-1) n`` in total).

    Segmenting (``segment_bytes``, default 4 MiB): the vector is cut into segments that flow through both
    trees one after another, as NCCL's tree does: a rank passes segment k up as soon as its children's
    parts of it are added, and passes segment k - 1 down meanwhile, so the reduce (towards lower ranks)
    and the broadcast (towards higher ranks) use the two directions of each link at once, and the
    ``2 log2 p`` full-vector hops on the critical path become about ``n beta`` plus ``2 log2 p`` segment
    hops. ``segment_bytes=None`` is the textbook, unpipelined tree. Receives are posted up front (into
    one buffer of n elements per child, and for the broadcast straight into the tensor: a parent can only
    send segment k down after it has received this rank's segment k, so the buffer is free by then).
    """

    name = "tree"

    def _rounds(self, flat: torch.Tensor, channel: Channel) -> Rounds:
        """The tree as batched rounds, both trees pipelined as a wavefront over the segments: a rank whose
        lowest set bit is ``2**j`` sends segment ``k`` up in round ``j + k`` (after its children's parts,
        which came in rounds ``i + k``, ``i < j``); rank ``c`` receives segment ``k`` from its parent in
        round ``L + popcount(c) - 1 + k`` (``L = ceil(log2 p)``), after its parent had it. Every segment is
        summed in the same order as :meth:`_reduce` (children by mask), so the results are the same bits."""
        size, rank, n = channel.size, channel.rank, flat.numel()
        lowest, parent, masks, children, segments = self._shape(flat, size, rank)
        levels = (size - 1).bit_length()  # L: the root's children are 1, 2, ..., 2**(L-1)
        incoming = self._buffer(flat.dtype, len(children) * n, flat.device)
        what = functools.partial(_what, len(segments))
        rounds: Rounds = {}
        for k, (a, b) in enumerate(segments):
            for c, (mask, child) in enumerate(zip(masks, children, strict=True)):
                into = incoming[c * n + a : c * n + b]
                add = functools.partial(flat[a:b].add_, into)
                label = what(k, "the partial sum (reduce)", mask)
                rounds.setdefault(mask.bit_length() - 1 + k, []).append(
                    Message(False, into, child, label, add)
                )
            if parent is not None:
                label = what(k, "the partial sum (reduce)", lowest)
                rounds.setdefault(lowest.bit_length() - 1 + k, []).append(
                    Message(True, flat[a:b], parent, label)
                )
                label = what(k, "the result (broadcast)", lowest)
                when = levels + rank.bit_count() - 1 + k
                rounds.setdefault(when, []).append(Message(False, flat[a:b], parent, label))
            for mask, child in zip(reversed(masks), reversed(children), strict=True):
                label = what(k, "the result (broadcast)", mask)
                when = levels + child.bit_count() - 1 + k
                rounds.setdefault(when, []).append(Message(True, flat[a:b], child, label))
        return rounds

    def _shape(
        self, flat: torch.Tensor, size: int, rank: int
    ) -> tuple[int, int | None, list[int], list[int], list[tuple[int, int]]]:
        """This rank's lowest set bit, parent, children's masks, children, and the segments of ``flat``."""
        n = flat.numel()
        lowest = rank & -rank if rank else 1 << size.bit_length()  # the root has every mask below it
        parent = rank - lowest if rank else None
        masks = [1 << k for k in range(size.bit_length()) if (1 << k) < lowest and rank + (1 << k) < size]
        children = [rank + mask for mask in masks]  # reduce order: mask 1, 2, 4, ...
        width = n if self.segment_bytes is None else max(1, self.segment_bytes // flat.element_size())
        segments = [(a, min(a + width, n)) for a in range(0, n, max(width, 1))]
        return lowest, parent, masks, children, segments

    def _reduce(self, flat: torch.Tensor, channel: Channel) -> None:
        size, rank, n = channel.size, channel.rank, flat.numel()
        lowest, parent, masks, children, segments = self._shape(flat, size, rank)
        incoming = self._buffer(flat.dtype, len(children) * n, flat.device) if children else None
        what = functools.partial(_what, len(segments))

        from_children = {
            (c, k): channel.irecv(
                incoming[c * n + a : c * n + b], child, what(k, "the partial sum (reduce)", masks[c])
            )
            for k, (a, b) in enumerate(segments)
            for c, child in enumerate(children)
        }  # fmt: skip
        from_parent = (
            [channel.irecv(flat[a:b], parent, what(k, "the result (broadcast)", lowest)) for k, (a, b) in
             enumerate(segments)]
            if parent is not None
            else []
        )  # fmt: skip
        sends: list[_Op] = []

        def pass_down(k: int) -> None:
            a, b = segments[k]
            for mask, child in zip(reversed(masks), reversed(children), strict=True):
                sends.append(channel.isend(flat[a:b], child, what(k, "the result (broadcast)", mask)))

        for k, (a, b) in enumerate(segments):
            for c in range(len(children)):
                channel.wait(from_children.pop((c, k)))
                flat[a:b].add_(incoming[c * n + a : c * n + b])
            if parent is None:
                pass_down(k)  # the root holds the full sum of segment k
                continue
            sends.append(channel.isend(flat[a:b], parent, what(k, "the partial sum (reduce)", lowest)))
            if k > 0:  # segment k - 1 comes down while segment k goes up
                channel.wait(from_parent[k - 1])
                pass_down(k - 1)
        if parent is not None and segments:
            channel.wait(from_parent[-1])
            pass_down(len(segments) - 1)
        for op in sends:
            channel.wait(op)
        assert not from_children


class RabenseifnerReducer(Reducer):
    """Recursive-halving reduce-scatter followed by recursive-doubling all-gather (Rabenseifner's algorithm).

    Papers: R. Rabenseifner, "Optimization of collective reduction operations", ICCS 2004; Thakur et al.
    (2005), section 4.4. With ``p'`` a power of two: in step j = 1..log2 p', rank r exchanges with
    ``r xor p'/2**j`` the half of its current range it gives away, and adds the half it keeps; after
    log2 p' steps it holds the sum of block r (blocks of ``n/p'`` elements, sizes differing by at most one).
    The all-gather reverses the steps, doubling the range each time, received directly into the tensor.
    Time ``2 log2 p' alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma``.

    Non-power-of-two p (``p = p' + r``, ``r < p'``): before, each of the first ``2r`` even ranks sends its
    whole vector to the next odd rank (which adds it) and waits; after, the odd rank sends it the result.
    This adds ``2 (alpha + n beta) + n gamma`` (Thakur et al.'s simple variant, not Rabenseifner & Träff's
    halves-exchanging one).
    """

    name = "rabenseifner"

    def _rounds(self, flat: torch.Tensor, channel: Channel) -> Rounds:
        """Rabenseifner's steps as batched rounds: the fold-in (round 0), each halving step, each doubling
        step, the fold-out (round ``2 log2 p' + 1``); each step's exchange is one round, summed as in
        :meth:`_reduce`."""
        size, rank, n = channel.size, channel.rank, flat.numel()
        active = 1 << (size.bit_length() - 1)
        extra = size - active
        halvings = active.bit_length() - 1
        incoming = self._buffer(flat.dtype, n, flat.device)
        rounds: Rounds = {}
        fold_in, fold_out = "the whole vector (fold-in pre-step)", "the result (fold-out post-step)"
        if rank < 2 * extra:
            if rank % 2 == 0:
                rounds[0] = [Message(True, flat, rank + 1, fold_in)]
                rounds[2 * halvings + 1] = [Message(False, flat, rank + 1, fold_out)]
                return rounds
            rounds[0] = [Message(False, incoming, rank - 1, fold_in, functools.partial(flat.add_, incoming))]
            rounds[2 * halvings + 1] = [Message(True, flat, rank - 1, fold_out)]
            virtual = rank // 2
        else:
            virtual = rank - extra
        offsets = [start for start, _ in chunk_bounds(n, active)] + [n]
        low, high, mask, index = 0, active, active >> 1, 1
        while mask:
            middle = (low + high) // 2
            keep, give = (
                ((middle, high), (low, middle)) if virtual & mask else ((low, middle), (middle, high))
            )
            partner = 2 * (virtual ^ mask) + 1 if (virtual ^ mask) < extra else (virtual ^ mask) + extra
            k0, k1, g0, g1 = offsets[keep[0]], offsets[keep[1]], offsets[give[0]], offsets[give[1]]
            into = incoming[: k1 - k0]
            label = f"(halving, distance {mask})"
            rounds[index] = [
                Message(
                    False,
                    into,
                    partner,
                    f"{_blocks(keep)} {label}",
                    functools.partial(flat[k0:k1].add_, into),
                ),
                Message(True, flat[g0:g1], partner, f"{_blocks(give)} {label}"),
            ]
            label = f"(doubling, distance {mask})"
            rounds[2 * halvings + 1 - index] = [
                Message(False, flat[g0:g1], partner, f"{_blocks(give)} {label}"),
                Message(True, flat[k0:k1], partner, f"{_blocks(keep)} {label}"),
            ]
            low, high = keep
            mask >>= 1
            index += 1
        return rounds

    def _reduce(self, flat: torch.Tensor, channel: Channel) -> None:
        size, rank = channel.size, channel.rank
        n = flat.numel()
        active = 1 << (size.bit_length() - 1)  # p', the largest power of two <= p
        extra = size - active
        if rank < 2 * extra:
            if rank % 2 == 0:
                channel.wait(channel.isend(flat, rank + 1, "the whole vector (fold-in pre-step)"))
                virtual = -1
            else:
                incoming = self._buffer(flat.dtype, n, flat.device)
                channel.wait(channel.irecv(incoming, rank - 1, "the whole vector (fold-in pre-step)"))
                flat.add_(incoming)
                virtual = rank // 2
        else:
            virtual = rank - extra

        def real(v: int) -> int:
            return 2 * v + 1 if v < extra else v + extra

        if virtual >= 0:
            offsets = [start for start, _ in chunk_bounds(n, active)] + [n]
            incoming = self._buffer(flat.dtype, offsets[active // 2], flat.device)  # the largest half
            low, high = 0, active
            steps = []
            mask = active >> 1
            while mask:  # recursive halving: distance p'/2, p'/4, ..., 1
                middle = (low + high) // 2
                lower, upper = (low, middle), (middle, high)
                keep, give = (upper, lower) if virtual & mask else (lower, upper)
                steps.append((keep, give, real(virtual ^ mask), mask))
                k0, k1 = offsets[keep[0]], offsets[keep[1]]
                g0, g1 = offsets[give[0]], offsets[give[1]]
                label = f"(halving, distance {mask})"
                receive = channel.irecv_nonempty(
                    incoming[: k1 - k0], steps[-1][2], f"{_blocks(keep)} {label}"
                )
                send = channel.isend_nonempty(flat[g0:g1], steps[-1][2], f"{_blocks(give)} {label}")
                if receive is not None:
                    channel.wait(receive)
                    flat[k0:k1].add_(incoming[: k1 - k0])
                channel.wait_all([send])
                low, high = keep
                mask >>= 1
            for keep, give, partner, mask in reversed(steps):  # recursive doubling, received in place
                label = f"(doubling, distance {mask})"
                receive = channel.irecv_nonempty(
                    flat[offsets[give[0]] : offsets[give[1]]], partner, f"{_blocks(give)} {label}"
                )
                send = channel.isend_nonempty(
                    flat[offsets[keep[0]] : offsets[keep[1]]], partner, f"{_blocks(keep)} {label}"
                )
                channel.wait_all([receive, send])
        if rank < 2 * extra:
            if rank % 2 == 1:
                channel.wait(channel.isend(flat, rank - 1, "the result (fold-out post-step)"))
            else:
                channel.wait(channel.irecv(flat, rank + 1, "the result (fold-out post-step)"))


def _blocks(span: tuple[int, int]) -> str:
    return f"block {span[0]}" if span[1] - span[0] == 1 else f"blocks {span[0]}..{span[1] - 1}"


def _what(segments: int, k: int, part: str, mask: int) -> str:
    piece = f"segment {k} of " if segments > 1 else ""
    return f"{piece}{part} (mask {mask})"
