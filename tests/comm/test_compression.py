"""Gradient codecs against hand computations: error bounds, unbiasedness, residuals, payload sizes, bad input.

Single-process checks of encode/decode and of PowerSGD's ``reduce`` with no process group (R = 1), on every
``device`` (tests/conftest.py: the CPU always, CUDA where visible; the same tolerances there); the
last test runs a real 2-process torchrun job (compression_worker.py) that trains with several codecs
through the sync strategy and checks every codec's exchange against a re-enactment of both ranks'
encodings.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from distlearn.comm.compression import (
    COMPRESSORS,
    QSGD,
    BucketContext,
    DGCSparsifier,
    DynamicTree8Bit,
    Exchange,
    Linear8Bit,
    PowerSGD,
    StromThreshold,
    TopK,
    applies_momentum,
    create_compressor,
    pack_bits,
    stream_seed,
    unpack_bits,
)
from distlearn.comm.compression.eightbit import dynamic_tree_codebook
from distlearn.errors import ConfigError

SHAPES = [(6, 5), (6,), (4, 3, 2, 2)]  # a bucket: a matrix, a bias, a small conv kernel
NUMEL = sum(math.prod(s) for s in SHAPES)


def gradient(seed: int = 0, numel: int = NUMEL) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def context(shapes=SHAPES, key: str = "0", *, rank: int = 0, world_size: int = 1, seed: int = 0):
    """What an adapter tells the codec about bucket ``key`` on ``rank`` of ``world_size``."""
    return BucketContext(key, shapes, world_size=world_size, seed=seed, stream_seed=stream_seed(seed, rank))


def residual(codec, key: str = "0") -> torch.Tensor:
    """The error-feedback residual of bucket ``key`` (under a momentum correction, one wrapper in)."""
    memory = codec.codec if applies_momentum(codec) else codec
    return memory.state.residuals[key]


# -- packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 33])
def test_bits_pack_densely_and_round_trip(bits, count, device):
    generator = torch.Generator().manual_seed(count)
    codes = torch.randint(0, 2**bits, (count,), generator=generator, dtype=torch.uint8)
    codes = codes.to(device)
    packed = pack_bits(codes, bits)
    assert packed.device.type == device.type
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_one_bit_packing_puts_eight_signs_in_a_byte():
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [0b10001101]


# -- casts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "relative"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_casts_round_to_their_precision_and_halve_the_bytes(name, relative, device):
    codec = create_compressor(name)
    g = (gradient() + 0.5 * torch.sign(gradient())).to(device)  # magnitudes in fp16's normal range
    payload = codec.encode(g, context())
    assert payload.nbytes == 2 * NUMEL
    decoded = codec.decode(payload, context())
    assert ((decoded - g).abs() <= relative * g.abs()).all()


# -- 8 bit -----------------------------------------------------------------------------------------


def test_linear_8bit_error_is_at_most_half_a_step_of_each_tensors_scale(device):
    codec = Linear8Bit()
    g = gradient().to(device)
    g[:30] *= 100  # the matrix has its own, larger scale
    payload = codec.encode(g, context())
    assert payload.nbytes == NUMEL + 4 * len(SHAPES)
    decoded = codec.decode(payload, context())
    start = 0
    for shape in SHAPES:
        stop = start + math.prod(shape)
        scale = g[start:stop].abs().max()
        assert (decoded[start:stop] - g[start:stop]).abs().max() <= scale / 254 * (1 + 1e-5)
        start = stop


def test_dynamic_tree_codebook_is_dettmers_layout():
    book = dynamic_tree_codebook()
    assert book.numel() == 255 and torch.equal(book, -book.flip(0)) and (book.diff() > 0).all()
    positive = book[book > 0]
    # 64 levels in (0.1, 1], 32 in (0.01, 0.1], ..., 1 at 1e-6: 127 magnitudes
    assert ((positive > 0.1) & (positive <= 1)).sum() == 64
    assert ((positive > 0.01) & (positive <= 0.1)).sum() == 32
    assert positive.min() == pytest.approx(1e-6) and positive.max() == pytest.approx(1.0)


def test_dynamic_tree_keeps_small_values_that_linear_8bit_rounds_away(device):
    g = torch.tensor([1.0, 0.5, -0.12, 3e-3, -4e-4, 2e-5], device=device)
    c = context([(6,)])
    tree = DynamicTree8Bit().decode(DynamicTree8Bit().encode(g, c), c)
    linear = Linear8Bit().decode(Linear8Bit().encode(g, c), c)
    # in (0.1, 1] the tree's step is 0.9 / 64: error <= 0.9 / 128
    assert (tree[:3] - g[:3]).abs().max() <= 0.9 / 128
    # below 1/254 the linear grid returns 0; the tree keeps the sign and is within half a step of its
    # decade: 10**-e (0.1, 1] holds 2**(6 - e) levels, a step of 0.9 * 10**-e / 2**(6 - e)
    assert (linear[3:] == 0).all()
    assert torch.equal(torch.sign(tree), torch.sign(g))
    for value, decoded in zip(g[3:].tolist(), tree[3:].tolist(), strict=True):
        decade = math.floor(-math.log10(abs(value)))  # 10**-(e + 1) < |x| <= 10**-e
        step = 0.9 * 10.0**-decade / 2 ** (6 - decade)
        assert abs(decoded - value) <= step / 2 * (1 + 1e-4), (value, decoded)


# -- threshold (Strom) -----------------------------------------------------------------------------


def test_strom_threshold_by_hand(device):
    codec = create_compressor("threshold", threshold=1.0)
    c = context([(4,)])
    first = codec.encode(torch.tensor([0.5, 1.5, -2.5, 0.2], device=device), c)
    assert first.tensors["words"].tolist() == [1 << 1, (2 << 1) | 1]  # index << 1 | negative
    assert codec.decode(first, c).tolist() == [0.0, 1.0, -1.0, 0.0]
    assert torch.allclose(residual(codec).cpu(), torch.tensor([0.5, 0.5, -1.5, 0.2]))
    second = codec.decode(codec.encode(torch.tensor([0.6, 0.0, 0.0, 0.1], device=device), c), c)
    assert second.tolist() == [1.0, 0.0, -1.0, 0.0]
    assert torch.allclose(residual(codec).cpu(), torch.tensor([0.1, 0.5, -0.5, 0.3]))


@pytest.mark.parametrize("name", ["threshold", "onebit", "topk", "randomk"])
def test_residual_carries_exactly_what_was_not_sent(name, device):
    options = {"threshold": {"threshold": 0.5}, "topk": {"density": 0.1}, "randomk": {"density": 0.1}}
    codec = create_compressor(name, **options.get(name, {}))
    total_gradient = torch.zeros(NUMEL, dtype=torch.float64, device=device)
    total_sent = torch.zeros(NUMEL, dtype=torch.float64, device=device)
    for step in range(20):
        g = gradient(step).to(device)
        payload = codec.encode(g, context())
        total_gradient += g.double()
        total_sent += codec.decode(payload, context()).double()
        waiting = residual(codec).double()
        # everything the gradients held is either sent or waiting in the residual
        assert torch.allclose(total_sent + waiting, total_gradient, atol=1e-4), f"step {step}"


# -- 1 bit -----------------------------------------------------------------------------------------


def test_onebit_by_hand_and_its_payload_is_one_bit_per_sign(device):
    codec = create_compressor("onebit")
    c = context([(4,)])
    payload = codec.encode(torch.tensor([1.0, 3.0, -2.0, -4.0], device=device), c)
    assert payload.tensors["signs"].tolist() == [0b0011]
    assert payload.tensors["levels"].tolist() == [2.0, -3.0]  # mean of positives, of negatives
    assert codec.decode(payload, c).tolist() == [2.0, 2.0, -3.0, -3.0]
    assert residual(codec).tolist() == [-1.0, 1.0, 1.0, -1.0]
    lenet = [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 256), (120,), (84, 120), (84,), (10, 84), (10,)]
    numel = sum(math.prod(s) for s in lenet)
    big = codec.encode(gradient(0, numel).to(device), context(lenet, "1"))
    assert big.nbytes == math.ceil(numel / 8) + 8 * len(lenet)
    assert 4 * numel / big.nbytes >= 30


def test_onebit_momentum_correction_by_hand_and_where_it_cannot_serve():
    codec = create_compressor("onebit", momentum=0.5)
    assert applies_momentum(codec) and not applies_momentum(create_compressor("onebit"))
    assert codec.handles_momentum and not create_compressor("onebit").handles_momentum  # the old property
    c = context([(4,)])
    codec.decode(codec.encode(torch.tensor([1.0, 3.0, -2.0, -4.0]), c), c)  # u = g
    assert residual(codec).tolist() == [-1.0, 1.0, 1.0, -1.0]  # as without momentum
    payload = codec.encode(torch.tensor([1.0, 1.0, 1.0, 1.0]), c)
    # u = 0.5 [1, 3, -2, -4] + 1 = [1.5, 2.5, 0, -1]; v = u + e = [0.5, 3.5, 1, -2]
    assert codec.state.velocities["0"].tolist() == [1.5, 2.5, 0.0, -1.0]
    assert payload.tensors["levels"].tolist() == pytest.approx([5 / 3, -2.0])
    assert codec.decode(payload, c).tolist() == pytest.approx([5 / 3, 5 / 3, 5 / 3, -2.0])
    expected_residual = [0.5 - 5 / 3, 3.5 - 5 / 3, 1 - 5 / 3, 0]
    assert residual(codec).tolist() == pytest.approx(expected_residual)
    for bad in (1.0, -0.1, True, "x"):
        with pytest.raises(ConfigError, match=r"momentum must be a number in \[0, 1\)"):
            create_compressor("onebit", momentum=bad)

    from distlearn.train import TrainConfig, validate_config

    def config(strategy: str, optimizer: str = "sgd") -> TrainConfig:
        return TrainConfig.build(
            strategy=strategy, compression="onebit", optimizer=optimizer, compression_option=("momentum=0.9",)
        )

    with pytest.raises(ConfigError, match="applies momentum itself"):  # the optimizer's momentum too
        validate_config(config("sync", "momentum"))
    validate_config(config("sync"))
    with pytest.raises(ConfigError, match="with momentum cannot serve --strategy ps"):
        validate_config(config("ps"))


# -- TernGrad and QSGD -----------------------------------------------------------------------------


def test_terngrad_is_unbiased_and_ternary(device):
    codec = create_compressor("terngrad", clip_sigma=None)
    c = context(seed=3)
    g = gradient().to(device)
    draws = 2000
    total = torch.zeros(NUMEL, dtype=torch.float64, device=device)
    for _ in range(draws):
        payload = codec.encode(g, c)
        decoded = codec.decode(payload, c)
        total += decoded.double()
    scales = payload.tensors["scales"]
    assert set(decoded[:30].abs().unique().tolist()) <= {0.0, float(scales[0])}
    spans = torch.repeat_interleave(scales.cpu(), torch.tensor([math.prod(s) for s in SHAPES])).double()
    total, g = total.cpu(), g.cpu()
    variance = spans * g.abs().double() - g.double() ** 2  # Bernoulli(|g|/s) scaled by s
    standard_error = (variance / draws).sqrt()
    assert ((total / draws - g.double()).abs() <= 5 * standard_error + 1e-6).all()
    assert payload.nbytes == math.ceil(NUMEL / 4) + 4 * len(SHAPES)


def test_terngrad_clipping_bounds_the_scale():
    g = gradient()
    g[0] = 100.0  # an outlier in the matrix
    payload = create_compressor("terngrad", clip_sigma=2.5).encode(g, context())
    assert payload.tensors["scales"][0] <= 2.5 * g[:30].std() + 1e-6


@pytest.mark.parametrize("levels", [1, 4, 16])
def test_qsgd_is_unbiased_and_within_its_bounds(levels, device):
    codec = create_compressor("qsgd", levels=levels, chunk=16)
    c = context(rank=1, world_size=2)
    g = gradient().to(device)
    draws = 1500
    total = torch.zeros(NUMEL, dtype=torch.float64, device=device)
    squared_error = 0.0
    pieces = qsgd_chunks(g, SHAPES, 16)
    norms = torch.cat([piece.norm().expand(piece.numel()) for piece in pieces])
    for _ in range(draws):
        decoded = codec.decode(codec.encode(g, c), c)
        assert ((decoded - g).abs() <= norms / levels + 1e-5).all()  # |Q(v)_i - v_i| <= ||v|| / s
        total += decoded.double()
        squared_error += float(((decoded - g) ** 2).sum())
    variance_per_element = (norms.double() / levels) ** 2 / 4  # at most a quarter of a step squared
    assert ((total / draws - g.double()).abs() <= 5 * (variance_per_element / draws).sqrt() + 1e-6).all()
    # Lemma 3.1, per chunk of n = 16: E||Q(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2
    bound = sum(min(p.numel() / levels**2, p.numel() ** 0.5 / levels) * float((p**2).sum()) for p in pieces)
    assert squared_error / draws <= bound


def qsgd_chunks(flat: torch.Tensor, shapes, chunk: int) -> list[torch.Tensor]:
    """QSGD's chunks, cut by hand: ``chunk`` elements at a time within each tensor (the last one shorter)."""
    pieces, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        pieces += [flat[a : min(a + chunk, start + n)] for a in range(start, start + n, chunk)]
        start += n
    return pieces


def test_qsgd_norms_are_per_tensor_so_small_values_beside_large_ones_survive():
    """Issue 23's case: a 3-element tensor of 100s beside a 5-element tensor of 0.01s. A norm across both
    (one chunk of 512 over the bucket) is ~173, so s = 4 levels put 0.01 at 0.0002 of a level: it decoded
    to zero. Per tensor each has its own norm, ||v|| = 0.01 sqrt(5), and each 0.01 is s / sqrt(5) = 1.79
    levels of ||v|| / s: it decodes to 1 or 2 levels (0.0056 or 0.0112), never to zero, 0.01 on average."""
    g = torch.tensor([100.0] * 3 + [0.01] * 5)
    c = context([(3,), (5,)])
    codec = create_compressor("qsgd", levels=4, chunk=512)
    payload = codec.encode(g, c)
    norms = payload.tensors["norms"]
    assert norms.shape == (2,)
    assert torch.allclose(norms, torch.tensor([100.0 * 3**0.5, 0.01 * 5**0.5]))
    draws = 400
    total = torch.zeros(8, dtype=torch.float64)
    for _ in range(draws):
        decoded = codec.decode(codec.encode(g, c), c)
        assert (decoded[3:] != 0).all()
        assert ((decoded[3:] - g[3:]).abs() <= norms[1] / 4 + 1e-7).all()
        total += decoded.double()
    assert torch.allclose(total[3:] / draws, g[3:].double(), rtol=0.1)
    assert payload.nbytes == codec.expected_nbytes(c) == math.ceil(8 * 4 / 8) + 4 * 2
    # A bucket given without shapes is one tensor: one norm over all 8 elements (the old behaviour).
    for shapes in ([(8,)], []):
        whole = codec.encode(g, BucketContext("0", shapes))
        assert torch.allclose(whole.tensors["norms"], g.norm().unsqueeze(0))


def test_qsgd_chunks_restart_at_each_tensor():
    """Chunks of 4 over tensors of 6 and 3 elements: norms of [0:4], [4:6], [6:9] -- three, not the
    bucket's ceil(9 / 4) = 3 slices [0:4], [4:8], [8:9]."""
    g = torch.arange(1.0, 10.0)
    c = context([(2, 3), (3,)])
    payload = create_compressor("qsgd", levels=2, chunk=4).encode(g, c)
    expected = torch.stack([p.norm() for p in qsgd_chunks(g, [(2, 3), (3,)], 4)])
    assert torch.equal(payload.tensors["norms"], expected)


def test_qsgd_code_width_follows_the_levels():
    assert [QSGD(levels=s).bits for s in (1, 2, 7, 8, 127)] == [2, 4, 4, 8, 8]
    payload = create_compressor("qsgd", levels=1, chunk=512).encode(gradient(), context())
    assert payload.nbytes == math.ceil(NUMEL * 2 / 8) + 4 * len(SHAPES)  # one norm per tensor here


# -- sparsification --------------------------------------------------------------------------------


def test_topk_by_hand(device):
    codec = create_compressor("topk", density=0.5)
    c = context([(4,)])
    payload = codec.encode(torch.tensor([1.0, -5.0, 3.0, 0.5], device=device), c)
    assert sorted(payload.tensors["indices"].tolist()) == [1, 2]
    assert codec.decode(payload, c).tolist() == [0.0, -5.0, 3.0, 0.0]
    assert residual(codec).tolist() == [1.0, 0.0, 0.0, 0.5]
    assert payload.nbytes == 2 * 8


def test_topk_at_a_tenth_of_a_percent_compresses_over_250x():
    numel = 61_706  # LeNet's parameters
    payload = TopK(density=0.001).encode(gradient(0, numel), context([(numel,)]))
    assert 4 * numel / payload.nbytes >= 250


def test_randomk_draws_the_same_indices_on_every_rank_and_new_ones_each_step(device):
    ranks = [create_compressor("randomk", density=0.2) for _ in range(2)]
    contexts = [context(rank=rank, world_size=2, seed=7) for rank in range(2)]
    first = [codec.encode(gradient(rank).to(device), contexts[rank]) for rank, codec in enumerate(ranks)]
    second = [codec.encode(gradient(rank).to(device), contexts[rank]) for rank, codec in enumerate(ranks)]
    decoded = ranks[0].decode(first[0], contexts[0])
    assert decoded.device.type == device.type
    assert int((decoded != 0).sum()) <= first[0].meta["indices"].numel()
    assert torch.equal(first[0].meta["indices"], first[1].meta["indices"])
    assert not torch.equal(first[0].meta["indices"], second[0].meta["indices"])
    assert first[0].nbytes == 4 * math.ceil(0.2 * NUMEL)  # values only: the indices are never sent


# -- DGC -------------------------------------------------------------------------------------------


def test_dgc_momentum_correction_and_factor_masking_by_hand(device):
    codec = create_compressor("dgc", density=0.5, momentum=0.5)
    c = context([(2,)])
    first = codec.decode(codec.encode(torch.tensor([1.0, 0.1], device=device), c), c)
    assert first.tolist() == [1.0, 0.0]  # u = v = g; send the larger; zero u and v there
    assert torch.allclose(codec.state.velocities["0"].cpu(), torch.tensor([0.0, 0.1]))
    second = codec.decode(codec.encode(torch.tensor([0.1, 0.1], device=device), c), c)
    # u = 0.5 [0, 0.1] + [0.1, 0.1] = [0.1, 0.15];  v = [0, 0.1] + u = [0.1, 0.25] -> send 0.25
    assert torch.allclose(second.cpu(), torch.tensor([0.0, 0.25]))
    assert torch.allclose(residual(codec).cpu(), torch.tensor([0.1, 0.0]))
    assert torch.allclose(codec.state.velocities["0"].cpu(), torch.tensor([0.1, 0.0]))


def test_dgc_warmup_follows_the_papers_exponential_schedule_and_clips_locally():
    codec = DGCSparsifier(density=0.001, warmup_steps=400, warmup_stages=4)
    densities = [codec.density_at(step) for step in (0, 100, 200, 300, 400, 10_000)]
    # the paper's 75%, 93.75%, 98.4375%, 99.6%, then 99.9% sparsity
    assert densities == pytest.approx([0.25, 0.0629, 0.0158, 0.00397, 0.001, 0.001], rel=0.01)
    clipped = create_compressor("dgc", density=1.0, momentum=0.0, clip_norm=2.0)
    c = context([(4,)], world_size=4)
    sent = clipped.decode(clipped.encode(torch.full((4,), 5.0), c), c)
    assert float(sent.norm()) == pytest.approx(2.0 / math.sqrt(4))


# -- PowerSGD --------------------------------------------------------------------------------------


def test_powersgd_is_exact_on_a_rank_one_matrix_and_sends_the_small_tensors_dense(device):
    codec = PowerSGD(rank=1)
    shapes = [(20, 30), (20,)]
    matrix = torch.outer(gradient(1, 20), gradient(2, 30))
    flat = torch.cat([matrix.reshape(-1), gradient(3, 20)]).to(device)
    exchange = Exchange()
    out = codec.reduce(flat.clone(), context(shapes), exchange)
    assert torch.allclose(out, flat, atol=1e-5)
    assert codec.state.residuals["0"].abs().max() < 1e-5
    assert codec.expected_nbytes(context(shapes)) == 4 * ((20 + 30) * 1 + 20)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation(device):
    codec = PowerSGD(rank=2)
    shapes = [(30, 40)]
    matrix = gradient(4, 1200).view(30, 40).to(device)
    best = torch.linalg.svdvals(matrix)[2:].square().sum().sqrt()  # Eckart-Young
    errors = []
    for _ in range(30):
        out = codec.reduce(matrix.reshape(-1).clone(), context(shapes), Exchange())
        codec.state.residuals["0"].zero_()  # isolate the power iteration from the error feedback
        errors.append(float((out.view(30, 40) - matrix).norm()))
    assert errors[-1] <= 1.02 * float(best) < errors[0]


def test_powersgd_residual_is_the_input_minus_the_approximation(device):
    codec = PowerSGD(rank=1)
    shapes = [(10, 12)]
    g = gradient(5, 120).to(device)
    out = codec.reduce(g.clone(), context(shapes), Exchange())
    assert torch.allclose(out + codec.state.residuals["0"], g, atol=1e-5)
    g2 = gradient(6, 120).to(device)
    previous = codec.state.residuals["0"].clone()
    out2 = codec.reduce(g2.clone(), context(shapes), Exchange())
    assert torch.allclose(out2 + codec.state.residuals["0"], g2 + previous, atol=1e-5)


# -- state, options, bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["onebit", "terngrad", "qsgd", "topk", "randomk", "dgc", "threshold"])
def test_state_survives_a_weights_only_checkpoint(name, device):
    def run(codec, steps):
        return [codec.encode(gradient(s).to(device), context(rank=1, world_size=2, seed=4)) for s in steps]

    codec = create_compressor(name)
    run(codec, range(3))
    buffer = io.BytesIO()
    torch.save(codec.state_dict(), buffer)
    buffer.seek(0)
    restored = create_compressor(name)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(run(codec, range(3, 6)), run(restored, range(3, 6)), strict=True):
        for key in a.tensors:
            assert torch.equal(a.tensors[key], b.tensors[key])


def test_bad_codec_input_is_a_config_error():
    for density in (0, -0.1, 1.5, float("nan")):
        for name in ("topk", "randomk", "dgc"):
            with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
                create_compressor(name, density=density)
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        PowerSGD(rank=0)
    with pytest.raises(ConfigError, match="levels"):
        QSGD(levels=128)
    with pytest.raises(ConfigError, match="threshold must be positive"):
        StromThreshold(threshold=0)
    with pytest.raises(ConfigError, match="unknown compression 'zip'"):
        create_compressor("zip")
    with pytest.raises(ConfigError, match="does not take rank"):
        create_compressor("topk", rank=2)
    with pytest.raises(ConfigError, match="compression state is for 'topk'"):
        create_compressor("onebit").load_state_dict(create_compressor("topk").state_dict())


def test_codecs_that_cannot_serve_the_configuration_say_why():
    from distlearn.parallel.sync import SyncDataParallel
    from distlearn.train import TrainConfig, validate_config

    with pytest.raises(ConfigError, match="compression is an option of --strategy sync / ps, not local-sgd"):
        validate_config(TrainConfig.build(strategy="local-sgd", compression="onebit"))
    with pytest.raises(ConfigError, match="cannot serve --strategy ps: PowerSGD"):
        validate_config(TrainConfig.build(strategy="ps", compression="powersgd"))
    validate_config(TrainConfig.build(strategy="ps", compression="onebit", workers=2))  # pushes: the codec
    with pytest.raises(ConfigError, match="only apply with --compression"):
        validate_config(TrainConfig.build(strategy="sync", density=0.01))
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        validate_config(TrainConfig.build(strategy="sync", compression="topk", density=2.0))
    with pytest.raises(ConfigError, match="replaces the allreduce algorithm"):
        SyncDataParallel(reducer="ring", compression="onebit")
    strategy = SyncDataParallel(compression="dgc", compression_options={"density": 0.01})
    from distlearn.comm.bucketing import GradientBucketer

    model = torch.nn.Linear(3, 2)
    strategy.bucketer = GradientBucketer(model.parameters(), None, world_size=1, overlap=False)
    with pytest.raises(ConfigError, match="applies momentum itself"):
        strategy._check_compression(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    strategy._check_compression(torch.optim.SGD(model.parameters(), lr=0.1))  # plain SGD is fine


def test_train_config_options_reach_the_codec_and_its_state_reaches_the_checkpoint():
    from distlearn.parallel import create_strategy
    from distlearn.parallel.sync import compression_options_of
    from distlearn.train import TrainConfig

    config = TrainConfig.build(
        strategy="sync", compression="powersgd", rank=3, compression_option=("start_iter=5",)
    )
    assert compression_options_of(config.options) == {"rank": 3, "start_iter": 5}
    strategy = create_strategy("sync", run=config)
    assert (strategy.compressor.rank_r, strategy.compressor.start_iter) == (3, 5)
    with pytest.raises(ConfigError, match="disagree"):
        compression_options_of(
            TrainConfig.build(
                strategy="sync", compression="topk", density=0.1, compression_option=("density=0.2",)
            ).options
        )

    saving = create_strategy("sync", run=TrainConfig.build(strategy="sync", compression="topk", density=0.1))
    saving.compressor.encode(gradient(), context())
    resumed = create_strategy("sync", run=TrainConfig.build(strategy="sync", compression="topk", density=0.1))
    resumed.load_state_dict(saving.state_dict())
    assert torch.equal(residual(resumed.compressor), residual(saving.compressor))
    with pytest.raises(ConfigError, match="no compression state"):
        resumed.load_state_dict({})
    with pytest.raises(ConfigError, match="resume with the same --compression"):
        create_strategy("sync").load_state_dict(saving.state_dict())


def test_every_codec_is_registered_with_a_distinct_name():
    assert len(COMPRESSORS) == 12
    assert all(create_compressor(name).name == name for name in COMPRESSORS)


# -- two processes ---------------------------------------------------------------------------------

WORKER = str(Path(__file__).resolve().parent / "compression_worker.py")


@pytest.mark.timeout(200)
def test_two_ranks_exchange_compressed_buckets_and_train_to_identical_weights(tmp_path):
    from distlearn.launch import launch_local

    code = launch_local([WORKER, str(tmp_path)], 2, module=False, timeout_s=180, threads_per_worker=1)
    assert code == 0, f"the 2-worker job failed (exit {code}); its output is above"
    lines = (tmp_path / "result.txt").read_text().splitlines()
    results = {line.split()[0]: line.split()[1:] for line in lines}
    dense_bytes = int(results["none"][1])
    assert set(results) == {"none", "ddp-hook", *COMPRESSORS}
    for name, (status, sent, exchange_error, *syncs) in results.items():
        assert status == "equal", f"{name}: the ranks ended with different weights"
        if name in COMPRESSORS:  # host synchronisations of one bucket's exchange at R = 2: threshold's
            # masked_select and the all-gathered lengths of its variable payload; none for the others
            assert syncs == [str(2 if name == "threshold" else 0)], (name, syncs)
        # exact but for the casts, whose half-precision sums round once more than the re-enactment's
        tolerance = {"fp16": 2**-10, "bf16": 2**-7}.get(name, 1e-6)
        assert float(exchange_error) < tolerance, f"{name}: the exchange differs from the re-enactment"
        assert int(sent) > 0
    assert dense_bytes / int(results["onebit"][1]) >= 25
    assert dense_bytes / int(results["topk"][1]) >= 40  # density 0.01 (8 bytes per value sent)
    assert dense_bytes / int(results["fp16"][1]) == pytest.approx(2.0, rel=0.01)


def test_int8_tree_table_lookup_equals_searchsorted_everywhere_it_matters():
    """The quantiser's 2**20-cell table must give exactly the binary search's code: on values spread over
    eight decades, on every midpoint, on the floats right next to each midpoint, and on the code values."""
    from distlearn.comm.compression.eightbit import DynamicTree8Bit

    codec = DynamicTree8Bit()
    generator = torch.Generator().manual_seed(0)
    magnitudes = 10 ** torch.empty(100_000).uniform_(-8, 0, generator=generator)
    cases = [
        (torch.randn(100_000, generator=generator) * magnitudes).clamp(-1, 1),
        codec.midpoints,
        torch.nextafter(codec.midpoints, torch.tensor(2.0)),
        torch.nextafter(codec.midpoints, torch.tensor(-2.0)),
        codec.codebook,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]),
    ]
    for x in cases:
        expected = torch.searchsorted(codec.midpoints, x.contiguous()).to(torch.uint8)
        assert torch.equal(codec._quantise(x.float()), expected)
