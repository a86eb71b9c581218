"""The codec contract (pure encode/decode), the memory wrappers against hand computations, and one codec
object through the three adapters (the bucketer's reducer, the parameter-server push, a DDP comm hook).

The pure codec and the memory wrappers run on every ``device`` (tests/conftest.py: the CPU always, CUDA
where visible), with the CPU's exact assertions: the hand computations are exact in float32 anywhere."""

from __future__ import annotations

import io
import math

import pytest
import torch

from distlearn.comm.compression import (
    COMPRESSORS,
    BucketContext,
    CollectiveCodec,
    CompressedReducer,
    ErrorFeedback,
    Exchange,
    FP16Cast,
    MomentumCorrection,
    TopK,
    applies_momentum,
    check_optimizer,
    create_compressor,
    stream_seed,
)
from distlearn.comm.compression.memory import CodecWrapper
from distlearn.comm.compression.push import create_push_codec, decode_push, encode_push
from distlearn.errors import ConfigError

SHAPES = [(6, 5), (6,), (4, 3, 2, 2)]
NUMEL = sum(math.prod(s) for s in SHAPES)


def gradient(seed: int, numel: int = NUMEL) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def context(shapes=SHAPES, key: str = "0") -> BucketContext:
    return BucketContext(key, shapes, world_size=2, seed=1, stream_seed=stream_seed(1, 0))


def innermost(codec):
    while isinstance(codec, CodecWrapper):
        codec = codec.codec
    return codec


# -- the pure codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in COMPRESSORS if n != "powersgd"])
def test_decoding_changes_no_state_and_the_inner_codec_is_pure(name, device):
    """decode leaves the stack's state as it was (any holder can decode); the inner codec's encode changes
    neither its input nor anything else: twice the same input, twice the same payload (given the same
    random stream)."""
    stack = create_compressor(name)
    g = gradient(0).to(device)
    payload = stack.encode(g.clone(), context())
    before = io.BytesIO()
    torch.save(stack.state_dict(), before)
    first, second = stack.decode(payload, context()), stack.decode(payload, context())
    after = io.BytesIO()
    torch.save(stack.state_dict(), after)
    assert torch.equal(first, second) and before.getvalue() == after.getvalue()
    assert first.device.type == device.type
    assert all(t.device.type == device.type for t in payload.tensors.values())

    codec = innermost(stack)
    assert not isinstance(codec, CodecWrapper)
    original = g.clone()
    a = codec.encode(g, BucketContext("0", SHAPES, generator=torch.Generator().manual_seed(5)))
    b = codec.encode(g, BucketContext("0", SHAPES, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(g, original)
    assert a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


def test_only_two_kinds_of_exchange_and_one_collective_codec():
    summable = {name for name in COMPRESSORS if create_compressor(name).summable}
    assert summable == {"fp16", "bf16", "randomk", "powersgd"}
    collective = {name for name in COMPRESSORS if isinstance(create_compressor(name), CollectiveCodec)}
    assert collective == {"powersgd"}


# -- error feedback -------------------------------------------------------------------------------------


def test_error_feedback_keeps_input_plus_old_residual_minus_what_was_sent_by_hand(device):
    codec = ErrorFeedback(TopK(density=0.5))
    c = context([(4,)])
    sent = codec.decode(codec.encode(torch.tensor([1.0, -5.0, 3.0, 0.5], device=device), c), c)
    # v = g (no residual yet) = [1, -5, 3, 0.5]; top 2 of |v|: -5, 3; e' = v - sent = [1, 0, 0, 0.5]
    assert sent.tolist() == [0.0, -5.0, 3.0, 0.0]
    assert codec.state.residuals["0"].tolist() == [1.0, 0.0, 0.0, 0.5]
    sent = codec.decode(codec.encode(torch.tensor([0.25, 1.0, -4.0, 0.25], device=device), c), c)
    # v = g + e = [1.25, 1, -4, 0.75]; top 2: -4, 1.25; e' = [0, 1, 0, 0.75]
    assert sent.tolist() == [1.25, 0.0, -4.0, 0.0]
    assert codec.state.residuals["0"].tolist() == [0.0, 1.0, 0.0, 0.75]
    assert codec.state.steps == {"0": 2}


def test_error_feedback_is_the_same_formula_around_any_codec(device):
    """e' = (g + e) - decode(encode(g + e)) for a codec that keeps no memory itself (fp16 here)."""
    codec = ErrorFeedback(FP16Cast())
    c = context()
    previous = torch.zeros(NUMEL, device=device)
    for step in range(3):
        g = gradient(step).to(device) * 1e-3
        v = g + previous
        expected_residual = v - FP16Cast().decode(FP16Cast().encode(v, c), c)
        codec.encode(g, c)
        assert torch.equal(codec.state.residuals["0"], expected_residual)
        previous = expected_residual


# -- momentum correction and the optimizer check ---------------------------------------------------------


def test_momentum_correction_encodes_the_velocity_by_hand_and_masks_what_was_sent(device):
    codec = MomentumCorrection(TopK(density=0.5), 0.5, mask_sent=True)
    c = context([(4,)])
    codec.encode(torch.tensor([4.0, 1.0, 0.0, -2.0], device=device), c)
    # u = g = [4, 1, 0, -2]; sent: 4, -2; masking zeroes u there
    assert codec.state.velocities["0"].tolist() == [0.0, 1.0, 0.0, 0.0]
    payload = codec.encode(torch.tensor([1.0, 1.0, 1.0, 1.0], device=device), c)
    # u = 0.5 [0, 1, 0, 0] + 1 = [1, 1.5, 1, 1]: sends 1.5 and one of the 1s
    assert codec.decode(payload, c).tolist().count(1.5) == 1
    with pytest.raises(ConfigError, match="needs a sparse codec whose payload holds 'indices'"):
        MomentumCorrection(FP16Cast(), 0.9, mask_sent=True)


def test_check_optimizer_is_the_one_momentum_rule():
    parameters = [torch.zeros(2, requires_grad=True)]
    with_momentum = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(parameters, lr=0.1)
    for name, options in (("dgc", {}), ("onebit", {"momentum": 0.9})):
        codec = create_compressor(name, **options)
        assert applies_momentum(codec)
        with pytest.raises(ConfigError, match="applies momentum itself"):
            check_optimizer(codec, with_momentum)
        with pytest.raises(ConfigError, match="applies momentum itself"):
            check_optimizer(codec, torch.optim.Adam(parameters))
        check_optimizer(codec, plain)
    for name in ("topk", "onebit", "powersgd"):
        check_optimizer(create_compressor(name), with_momentum)  # no momentum of its own: nothing to say


# -- one codec object, three adapters ---------------------------------------------------------------------


def top_quarter(values: torch.Tensor) -> torch.Tensor:
    """``values`` on its ceil(n / 4) largest magnitudes, zero elsewhere (the reference for top-k 0.25)."""
    k = math.ceil(values.numel() / 4)
    keep = values.abs().argsort(descending=True)[:k]
    out = torch.zeros_like(values)
    out[keep] = values[keep]
    return out


@pytest.mark.timeout(120)
def test_one_codec_object_serves_the_bucketer_the_push_and_a_ddp_hook(tmp_path):
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from distlearn.comm.ddp_hooks import compression_ddp_comm_hook

    codec = create_compressor("topk", density=0.25)

    # the bucketer's adapter (outside a job: a group of one)
    reducer = CompressedReducer(codec, seed=3)
    bucket = gradient(1)
    reducer.register(bucket, "bucket0", SHAPES)
    original = bucket.clone()
    reducer.reduce_bucket(bucket, Exchange())
    assert torch.equal(bucket, top_quarter(original))
    assert torch.equal(codec.state.residuals["bucket0"], original - top_quarter(original))

    # the push's adapter: the worker encodes, and the same object decodes (decoding is pure)
    push = gradient(2, 40)
    wire = encode_push(codec, "server0", push, [30, 10])
    assert wire.dtype == torch.uint8
    assert torch.equal(decode_push(codec, wire, [30, 10]), top_quarter(push))
    assert torch.equal(codec.state.residuals["server0"], push - top_quarter(push))

    # DDP's adapter, in a group of one: the hook's averaged gradient is the top quarter of the plain one
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Linear(5, 3)
        hooked = DistributedDataParallel(nn.Linear(5, 3))
        hooked.module.load_state_dict(plain.state_dict())
        hook = compression_ddp_comm_hook(codec, seed=3)
        hooked.register_comm_hook(state=None, hook=hook)
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(4))
        plain(x).square().sum().backward()
        hooked(x).square().sum().backward()
    finally:
        dist.destroy_process_group()
    reference = torch.cat([p.grad.reshape(-1) for p in reversed(list(plain.parameters()))])
    received = torch.cat([p.grad.reshape(-1) for p in reversed(list(hooked.module.parameters()))])
    assert hook.codec is codec
    ddp_keys = [key for key in codec.state.residuals if key not in ("bucket0", "server0")]
    assert len(ddp_keys) == 1
    assert torch.equal(received.sort().values, top_quarter(reference).sort().values)

    # one checkpoint holds the memory of all three, weights_only
    buffer = io.BytesIO()
    torch.save(codec.state_dict(), buffer)
    buffer.seek(0)
    restored = create_compressor("topk", density=0.25)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state.residuals.keys() == codec.state.residuals.keys()
    assert all(torch.equal(restored.state.residuals[k], v) for k, v in codec.state.residuals.items())


def test_push_codecs_that_need_every_rank_or_apply_momentum_are_refused():
    for name in ("powersgd", "randomk", "dgc"):
        with pytest.raises(ConfigError, match=f"--compression {name} cannot serve --strategy ps"):
            create_push_codec(name, {})
    with pytest.raises(ConfigError, match="with momentum cannot serve --strategy ps"):
        create_push_codec("onebit", {"momentum": 0.9})
    assert create_push_codec("onebit", {}).name == "onebit"


def test_a_checkpoint_written_before_the_memory_wrappers_still_resumes():
    """The former layout (one "state" entry: tensors[key][name], counters) is converted on loading."""
    residual, velocity = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 0.0])
    old = {
        "name": "dgc",
        "state": {"tensors": {"0": {"residual": residual, "momentum": velocity}}, "counters": {"0": 7}},
    }
    codec = create_compressor("dgc", density=0.5)
    codec.load_state_dict(old)
    assert torch.equal(codec.codec.state.residuals["0"], residual) and codec.codec.state.steps == {"0": 7}
    assert torch.equal(codec.state.velocities["0"], velocity)
    with pytest.raises(ConfigError, match="compression state is for 'dgc'"):
        create_compressor("topk").load_state_dict(old)
