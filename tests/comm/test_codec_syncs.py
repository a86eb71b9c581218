"""No host synchronisation in the codecs' hot path: every codec's encode and decode (with its memory
wrappers, and with error feedback around it) on a bucket of several tensors, counted by
:func:`distlearn.comm.syncs.count_syncs` -- on the CPU always (operations that would synchronise on a GPU),
on CUDA where there is one (PyTorch's own sync debug mode). The one allowed: threshold's variable-size
payload (``masked_select``: the device tells the host how many words were chosen), once per bucket.
"""

from __future__ import annotations

import math

import pytest
import torch

from distlearn.comm.compression import COMPRESSORS, BucketContext, ErrorFeedback, create_compressor
from distlearn.comm.compression.exchange import Exchange, reduce_bucket
from distlearn.comm.compression.memory import RandomStreamState
from distlearn.comm.syncs import count_syncs

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA])]
SHAPES = [(16, 9), (9,), (0,), (1,), (5, 3, 3), (700,), (2, 2)]
OPTIONS = {
    "threshold": {"threshold": 1.0},
    "dgc": {"clip_norm": 1.0, "density": 0.05, "warmup_steps": 4},
    "onebit": {"momentum": 0.9},
    "powersgd": {"rank": 1, "start_iter": 0},
}
SYNCS_PER_BUCKET = {"threshold": 1}  # masked_select: the payload's size comes from the values
RANDOM = {"terngrad", "qsgd"}


def bucket(device: str, step: int) -> tuple[torch.Tensor, BucketContext]:
    numel = sum(math.prod(shape) for shape in SHAPES)
    generator = torch.Generator().manual_seed(step)
    flat = (torch.randn(numel, generator=generator) * (1 + step)).to(device)
    return flat, BucketContext("b0", SHAPES, world_size=1, seed=5, stream_seed=17, step=step)


def round_trip(codec, flat: torch.Tensor, context: BucketContext) -> torch.Tensor:
    if codec.name == "powersgd":
        return codec.reduce(flat.clone(), context, Exchange())
    return codec.decode(codec.encode(flat, context), context)


def stacks(name: str) -> list:
    codec = create_compressor(name, **OPTIONS.get(name, {}))
    if name == "powersgd":
        return [codec]
    return [codec, ErrorFeedback(create_compressor(name, **OPTIONS.get(name, {})))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_every_codec_encodes_and_decodes_without_a_host_synchronisation(device, name):
    for codec in stacks(name):
        flat, context = bucket(device, 0)
        round_trip(codec, flat, context)  # first use: per-layout constants are built and cached
        for step in (1, 2):
            flat, context = bucket(device, step)
            with count_syncs(device) as syncs:
                out = round_trip(codec, flat, context)
            assert syncs.count == SYNCS_PER_BUCKET.get(name, 0), (type(codec).__name__, syncs.events)
            assert out.device == flat.device and out.shape == flat.shape and out.dtype == torch.float32
            with count_syncs(device) as syncs:  # the bucketer's path: encode, pack, unpack, decode
                reduce_bucket(codec, flat.clone(), context, Exchange())
            assert syncs.count == SYNCS_PER_BUCKET.get(name, 0), (type(codec).__name__, syncs.events)


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("name", [n for n in COMPRESSORS if n not in RANDOM])
def test_a_codec_on_cuda_gives_what_it_gives_on_the_cpu(name):
    """The same arithmetic on the device: equal up to float rounding (reductions add in another order)."""
    cpu = create_compressor(name, **OPTIONS.get(name, {}))
    cuda = create_compressor(name, **OPTIONS.get(name, {}))
    for step in range(3):
        flat, context = bucket("cpu", step)
        expected = round_trip(cpu, flat, context)
        got = round_trip(cuda, flat.cuda(), context)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_the_cpu_count_catches_every_kind_of_host_read():
    t = torch.arange(6.0)
    with count_syncs() as syncs:
        t[0].item()
        float(t[1])
        int(t[2])
        t.tolist()
        if t[3]:
            pass
        t.cpu()
        t[t > 2]
        torch.nonzero(t)
        t.masked_select(t > 1)
        torch.repeat_interleave(t, torch.tensor([1, 2, 1, 1, 1, 1]))
    assert syncs.count == 10, syncs.events
    reads = ["Tensor.item", "float(tensor)", "int(tensor)", "Tensor.tolist", "bool(tensor)", "Tensor.cpu"]
    assert syncs.events[:6] == reads
    with count_syncs() as syncs:  # device-side work only
        index = torch.repeat_interleave(torch.arange(3), torch.tensor([2, 2, 2]), output_size=6)
        maxima = torch.zeros(3).scatter_reduce_(0, index, t.abs(), "amax")
        (t * maxima[index]).sum()
        torch.where(t > 2, t, 0.0)
        t[torch.tensor([0, 4])]
    assert syncs.count == 0, syncs.events


def test_the_per_tensor_loop_the_codecs_had_is_caught_once_per_tensor():
    """int8-linear's former scales, ``float(flat[a:b].abs().max())`` per tensor: one sync per tensor."""
    flat, context = bucket("cpu", 0)
    spans, start = [], 0
    for shape in context.shapes:
        spans.append((start, start + math.prod(shape)))
        start = spans[-1][1]
    with count_syncs() as syncs:
        [float(flat[a:b].abs().max()) if b > a else 0.0 for a, b in spans]
    assert syncs.count == len([1 for a, b in spans if b > a]) == len(SHAPES) - 1


def test_a_random_stream_keeps_one_generator_per_device_and_saves_them():
    state = RandomStreamState()
    assert state.generator_for(torch.device("cpu"), 3) is state.generator
    saved = state.state_dict()
    assert saved["devices"] == {} and saved["seeded"] is False
    old_layout = {"generator": saved["generator"], "seeded": True}  # a checkpoint from before devices
    state.load_state_dict(old_layout)
    assert state.devices == {} and state.seeded
    if torch.cuda.is_available():
        first = state.generator_for(torch.device("cuda:0"), 3)
        again = RandomStreamState()
        again.load_state_dict(state.state_dict())
        assert torch.equal(
            torch.rand(4, generator=first, device="cuda:0"),
            torch.rand(4, generator=again.generator_for(torch.device("cuda:0"), 99), device="cuda:0"),
        )
