"""The parameter-server core: one serving loop, one push/pull protocol, used by every server in distlearn.

Three methods keep state on a server rank that workers push to and pull from: the ps strategy
(:mod:`distlearn.parallel.ps`, Downpour SGD and its variants), asynchronous EASGD's centre variable
(:mod:`distlearn.parallel.easgd`, ``easgd_mode="async"``) and Gorila's parameter server
(:mod:`distlearn.rl.gorila`). They share everything but what a push *does*; this package is that shared
part, below the strategy layer (it imports only :mod:`distlearn.comm` and :mod:`distlearn.errors`), so
``parallel/`` and ``rl/`` both build on it without importing each other.

**Protocol.** Messages are the fixed header of :mod:`distlearn.comm.p2p` (``[kind, version, step, length,
lr, staleness, flag, sender]``) followed by an optional payload. Requests go worker -> server on the
``REQUEST`` tags, replies server -> worker on the ``REPLY`` tags. A worker has at most one request per
server in flight and posts the receive of its reply before sending the request (:class:`ServerLink`)::

    INIT   payload: the worker's initial state        -> PARAMS (the server's state; the first INIT sets it)
    PUSH   payload: a gradient or the worker's variable -> PARAMS (``version`` of the state answered,
           ``version``: the version it was computed on,          ``staleness`` of the push, flag bits)
           ``lr``: the worker's rate; ``step``; flags
    CHECKPOINT ``step``                                -> ACK    (the server saved its state)
    HEARTBEAT, DONE                                    (no reply)
    any request the server refuses                     -> ERROR  (``flag``: :data:`ERROR_LAYOUT`)

Flag bits are :class:`PushFlag` (``COMPRESSED`` codec bytes, ``SHARED`` payload in the shared push block,
``READ_ONLY`` do not change the state) and :class:`ReplyFlag` (``DROPPED`` late push, ``VIA_SHARED``
weights in the shared reply block, ``SHARED_ACCEPTED`` blocks mapped, ``STOP`` last reply).

**Serving loop** (:class:`ServingLoop`). One receive of a request header posted to each live worker alone
(:class:`distlearn.comm.p2p.PeerReceives`; not gloo's receive from any source, which one worker's reset
connection fails as a whole), requests handled one at a time as they arrive. HEARTBEAT refreshes the
sender's clock; DONE retires the sender; a worker whose connection fails (it died), whose payload or reply
fails, or that is not heard from for ``worker_silence_s`` is lost: dropped from the live set, its connection
never used again, the others served on (the policy hears of it, ``on_lost``, and may end the job instead);
a message of a worker no longer live is drained, not answered; when no worker at all speaks for
``silence_s`` the policy decides (``on_silence``) and the loop ends. The loop ends when no worker is live.
Each loss is recorded (:attr:`ServingLoop.lost`: rank, seconds since the loop started, UTC time, the step of
its last push, why).

**Shard plan** (:func:`shard_parameters`). Parameter tensors go to ``S`` server ranks largest first, each
to the least-loaded server (greedy LPT); each server holds its tensors as one flat vector.

**Staleness** (:class:`StalenessBook`). A push computed on version ``v_i`` applied at version ``v`` has
staleness ``tau = v - v_i``; every update records ``[v, worker, tau]`` and moves ``v`` to ``v + 1``; late
pushes that are dropped are counted per version.

**Shared memory** (:class:`SharedPair`, :class:`SharedPeers`). A worker's INIT may offer two shared-memory
blocks (a token in ``step``); a server on the same machine maps them, says ``SHARED_ACCEPTED``, and from
then on the pair moves only headers over the backend: the gradient lies in the push block, the weights in
the reply block.

**Policies** (:class:`ServerPolicy`: ``on_request``, ``after_message``, ``on_lost``, ``on_silence``) hold
the server's state and say what a request does to it:

======================================  ==================================================================
policy                                  what a PUSH does
======================================  ==================================================================
``parallel.ps_server.DownpourServer``   decode (codec), drop if late (backup workers), group ``n`` pushes
                                        (n-softsync) in worker order, scale by ``1/max(1, tau)``
                                        (staleness-aware), one optimizer step on the flat shard; S shards,
                                        heartbeats, shared memory, checkpoints, ``ps-server<rank>.json``
``parallel.easgd.ElasticCentre``        answer with ``x~``, then ``x~ <- x~ + alpha (x - x~)``
                                        (``alpha`` in ``lr``); ``READ_ONLY`` answers without moving
``rl.gorila.GorilaServer``              gather the bundle's episode returns, decay the rate linearly over
                                        the env-step budget, one Adam step, answer ``theta`` (``STOP``
                                        when solved or out of budget)
======================================  ==================================================================
"""

from __future__ import annotations

from distlearn.comm.paramserver.client import Heartbeat, PostedReply, ServerLink
from distlearn.comm.paramserver.plan import shard_numels, shard_parameters
from distlearn.comm.paramserver.protocol import ERROR_LAYOUT, PushFlag, ReplyFlag
from distlearn.comm.paramserver.server import PeerFailed, ServerPolicy, ServingLoop
from distlearn.comm.paramserver.shared import SharedPair, SharedPeers
from distlearn.comm.paramserver.staleness import StalenessBook

__all__ = [
    "ERROR_LAYOUT",
    "Heartbeat",
    "PeerFailed",
    "PostedReply",
    "PushFlag",
    "ReplyFlag",
    "ServerLink",
    "ServerPolicy",
    "ServingLoop",
    "SharedPair",
    "SharedPeers",
    "StalenessBook",
    "shard_numels",
    "shard_parameters",
]
