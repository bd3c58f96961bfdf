from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sluice.kernels import int4_avx2_cpu, int4_cpu
from sluice.layers.quant import (
    Int4Avx2Weight,
    Int4PackedWeight,
    Int4TiledWeight,
    QuantizedWeight,
    from_gguf_blocks,
    quantize,
)
from sluice.loaders.weights import GGUFQuantTensor, concat_rows

QType = gguf.GGMLQuantizationType

# bf16 unit roundoff: scales, zeros, activations and outputs are all rounded to bf16.
BF16_EPS = 2.0**-8
# gguf.quants can quantize these itself; K-quant blocks are made from random bytes instead.
LEGACY_TYPES = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0]
K_TYPES = [QType.Q4_K, QType.Q5_K]
# Formats whose weights are exactly bf16(d) * integer: no zero point to round.
ZERO_FREE_TYPES = [QType.Q4_0, QType.Q5_0, QType.Q8_0]

# 72 rows is not a multiple of 16, so the row padding (and an odd last tile) is exercised too.
OUT, IN = 72, 512
LAYOUT_CLASSES = {"tiled": Int4TiledWeight, "avx2": Int4Avx2Weight, "int4pack": Int4PackedWeight}
# Whether each of sluice's kernels runs here (and a C++ compiler built it).
NATIVE = {"tiled": int4_cpu.available, "avx2": int4_avx2_cpu.available}


@pytest.fixture(params=list(LAYOUT_CLASSES))
def layout(request: pytest.FixtureRequest) -> str:
    """Each test runs on every kernel: sluice's need AVX512-VNNI ("tiled") or AVX2 ("avx2")."""
    skip_unless_runs(request.param)
    return request.param


def skip_unless_runs(layout: str) -> None:
    if layout in NATIVE and not NATIVE[layout]():
        pytest.skip(reason=f"sluice's {layout} int4 kernel does not run on this machine")


def random_weight(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_k_blocks(qtype: QType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid Q4_K / Q5_K rows: sane float16 d and dmin, random 6-bit scales and codes."""
    rng = np.random.default_rng(seed)
    n_blocks = rows * cols // 256
    d = rng.uniform(1e-3, 1e-2, (n_blocks, 2)).astype(np.float16).view(np.uint8)
    rest_bytes = gguf.GGML_QUANT_SIZES[qtype][1] - 4
    rest = rng.integers(0, 256, (n_blocks, rest_bytes), dtype=np.uint8)
    return np.concatenate([d, rest], axis=1).reshape(rows, -1)


def make_blocks(qtype: QType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    if qtype in K_TYPES:
        return random_k_blocks(qtype, rows, cols, seed)
    return gguf.quants.quantize(random_weight((rows, cols), seed), qtype)


def reference(blocks: np.ndarray, qtype: QType) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype))


def assert_close_to_reference(deq: torch.Tensor, ref: torch.Tensor) -> None:
    """Rounding a group's scale and zero to bf16 moves each weight by at most BF16_EPS times
    (largest |weight| + spread of the group)."""
    groups = ref.view(ref.shape[0], -1, 32)
    spread = groups.amax(-1) - groups.amin(-1)
    tol = BF16_EPS * (groups.abs().amax(-1) + spread)
    err = (deq.view_as(groups) - groups).abs().amax(-1)
    assert (err <= tol).all(), f"worst error/tolerance {(err / tol).max():.3f}"


def assert_matmul_matches(qw: QuantizedWeight, deq: torch.Tensor, ref: torch.Tensor) -> None:
    x = torch.randn(2, 3, qw.in_features, generator=torch.Generator().manual_seed(1))
    y = qw.matmul(x)
    assert y.shape == (2, 3, qw.out_features) and y.dtype == torch.float32
    # Against full precision: bf16 activations, scales and outputs, nothing worse.
    exact = x @ ref.T
    assert (y - exact).norm() / exact.norm() < 1e-2
    assert_product_of_seen_weights(qw, x, y, deq)


def assert_product_of_seen_weights(
    qw: QuantizedWeight, x: torch.Tensor, y: torch.Tensor, deq: torch.Tensor
) -> None:
    """Against the weights the kernel sees. sluice's VNNI kernel quantizes activations per group
    to int8 in two passes for fp32 (an error of at most 1/256 of the group's step, max |x| / 127)
    and in one for bf16 and for a weight that only ranks (half a step), then sums exactly; its
    AVX2 kernel computes in fp32 (outputs rounded to the activations' dtype); int4pack rounds
    activations and outputs to bf16."""
    tiled = isinstance(qw, Int4TiledWeight)
    full_activations = isinstance(qw, Int4TiledWeight | Int4Avx2Weight)
    seen = (x if full_activations else x.bfloat16()).double() @ deq.double().T
    slack = 1e-5 * (x.abs().double() @ deq.abs().double().T)
    if tiled:
        two_passes = x.dtype == torch.float32 and not qw.ranking_only
        step = x.abs().unflatten(-1, (-1, qw.group_size)).amax(-1, keepdim=True) / 127
        error = (step / (256 if two_passes else 2)).expand(*x.shape[:-1], -1, qw.group_size)
        slack += error.flatten(-2).double() @ deq.abs().double().T
    rounding = 0 if full_activations and x.dtype == torch.float32 else BF16_EPS
    assert ((y.double() - seen).abs() <= rounding * seen.abs() + slack).all()


@pytest.mark.parametrize("qtype", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_gguf_blocks_match_gguf_dequantize(qtype: QType, layout: str) -> None:
    blocks = make_blocks(qtype, OUT, IN)
    ref = reference(blocks, qtype)
    qw = from_gguf_blocks(qtype, blocks, (OUT, IN), torch.device("cpu"), layout)
    assert isinstance(qw, LAYOUT_CLASSES[layout])
    assert (qw.out_features, qw.in_features) == (OUT, IN)
    deq = qw.dequantize()
    assert deq.shape == (OUT, IN) and deq.dtype == torch.float32
    assert_close_to_reference(deq, ref)
    assert_matmul_matches(qw, deq, ref)


@pytest.mark.parametrize("qtype", ZERO_FREE_TYPES, ids=lambda t: t.name)
def test_zero_free_types_are_exact_up_to_bf16_scale(qtype: QType, layout: str) -> None:
    blocks = make_blocks(qtype, OUT, IN)
    ref = reference(blocks, qtype)
    deq = from_gguf_blocks(qtype, blocks, (OUT, IN), "cpu", layout).dequantize()
    assert ((deq - ref).abs() <= BF16_EPS * ref.abs()).all()


def with_bf16_exact_headers(blocks: np.ndarray, qtype: QType) -> np.ndarray:
    """The same codes under scales and zeros that bf16 holds exactly (d with a 2-bit mantissa,
    zero a small multiple of d), so the kernel's weights must equal gguf's bit for bit."""
    rows = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]).copy()
    rng = np.random.default_rng(4)
    d = 2.0 ** rng.integers(-10, -4, (len(rows), 1)) * rng.choice([1, 1.5], (len(rows), 1))
    if qtype in (QType.Q4_1, QType.Q5_1):
        # min such that the kernel's zero, min + 8 d, is j * d
        rows[:, 2:4] = ((rng.integers(-4, 5, d.shape) - 8) * d).astype(np.float16).view(np.uint8)
    if qtype in K_TYPES:
        # dmin = 8 d makes the zero 8 d (scale - min), 6-bit integers times d
        rows[:, 2:4] = (8 * d).astype(np.float16).view(np.uint8)
    rows[:, 0:2] = d.astype(np.float16).view(np.uint8)
    return rows.reshape(blocks.shape)


@pytest.mark.parametrize("qtype", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_bf16_exact_scales_give_bit_exact_weights(qtype: QType, layout: str) -> None:
    blocks = with_bf16_exact_headers(make_blocks(qtype, OUT, IN), qtype)
    deq = from_gguf_blocks(qtype, blocks, (OUT, IN), "cpu", layout).dequantize()
    assert torch.equal(deq, reference(blocks, qtype))


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0, QType.Q4_K], ids=lambda t: t.name)
def test_concatenated_rows_are_the_stacked_weight(qtype: QType, layout: str) -> None:
    parts = [make_blocks(qtype, rows, IN, seed) for seed, rows in enumerate([64, 16, 24])]
    stacked = concat_rows([GGUFQuantTensor(qtype, p, (p.shape[0], IN)) for p in parts])
    assert stacked.shape == (104, IN)
    fused = from_gguf_blocks(qtype, stacked.blocks, stacked.shape, "cpu", layout)
    alone = [
        from_gguf_blocks(qtype, p, (p.shape[0], IN), "cpu", layout).dequantize() for p in parts
    ]
    deq = fused.dequantize()
    assert torch.equal(deq, torch.cat(alone))
    ref = torch.cat([reference(p, qtype) for p in parts])
    assert_close_to_reference(deq, ref)
    assert_matmul_matches(fused, deq, ref)


def test_no_kernel_returns_none() -> None:
    q6 = np.zeros((16, gguf.GGML_QUANT_SIZES[QType.Q6_K][1]), dtype=np.uint8)
    assert from_gguf_blocks(QType.Q6_K, q6, (16, 256), "cpu") is None
    assert from_gguf_blocks(QType.F16, np.zeros((16, 64), np.uint8), (16, 32), "cpu") is None
    q4 = make_blocks(QType.Q4_0, 16, 64)
    # a device with no int4 kernel (CUDA has one: tests/cuda)
    assert from_gguf_blocks(QType.Q4_0, q4, (16, 64), torch.device("meta")) is None


def test_wrong_block_shape_is_rejected() -> None:
    blocks = make_blocks(QType.Q4_0, 16, 64)
    with pytest.raises(ValueError, match="blocks of shape"):
        from_gguf_blocks(QType.Q4_0, blocks, (16, 96), "cpu")


def test_matmul_keeps_activation_dtype_and_survives_module_casts(layout: str) -> None:
    blocks = make_blocks(QType.Q4_1, OUT, IN)
    qw = from_gguf_blocks(QType.Q4_1, blocks, (OUT, IN), "cpu", layout)
    x = torch.randn(5, IN)
    expected = qw.matmul(x)
    qw.to(torch.float32)  # e.g. model.to(dtype): must not cast the kernel's scales
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = qw.matmul(x.to(dtype))
        assert y.dtype == dtype
        assert (y.float() - expected).norm() / expected.norm() < 1e-2
    assert torch.equal(qw.matmul(x[0]), expected[0])
    assert qw.matmul(torch.empty(0, IN)).shape == (0, OUT)


@pytest.mark.parametrize(
    ("qtype", "bytes_per_weight"), [(QType.Q4_1, 0.625), (QType.Q8_0, 1.25), (QType.Q5_K, 1.25)]
)
def test_weights_stay_compact(qtype: QType, bytes_per_weight: float, layout: str) -> None:
    qw = from_gguf_blocks(qtype, make_blocks(qtype, 64, IN), (64, IN), "cpu", layout)
    assert qw.nbytes() == 64 * IN * bytes_per_weight


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"), [(16, 64, 32), (48, 128, 64), (112, 256, 256)]
)
def test_tiled_kernel_for_any_number_of_rows(
    out_features: int, in_features: int, group_size: int
) -> None:
    """Row blocks of 1-4 and tile pairs with an odd tile left over all compute x W^T to the
    accuracy of their activations' passes, a ranking-only weight in one pass."""
    if not int4_cpu.available():
        pytest.skip(reason="sluice's int4 kernel does not run on this machine")
    weight = torch.from_numpy(random_weight((out_features, in_features), seed=5))
    qw = quantize(weight, "int4", group_size, "tiled")
    deq = qw.dequantize()
    for rows in (1, 2, 3, 4, 5, 9):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        assert_product_of_seen_weights(qw, x, qw.matmul(x), deq)
        y = qw.matmul(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert_product_of_seen_weights(qw, x.bfloat16(), y.float(), deq)
        # A row's result does not depend on the rows beside it.
        assert torch.equal(qw.matmul(x[-1:]), qw.matmul(x)[-1:])
    two_passes = qw.matmul(x)
    qw.ranking_only = True
    one_pass = qw.matmul(x)
    assert_product_of_seen_weights(qw, x, one_pass, deq)
    assert not torch.equal(one_pass, two_passes)


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"), [(16, 64, 32), (80, 128, 64), (112, 256, 256)]
)
def test_avx2_kernel_for_any_number_of_rows(
    out_features: int, in_features: int, group_size: int
) -> None:
    """Blocks of 1-4 rows, alone and after full blocks of 4, each over as many tiles at a time
    as it takes (4, 2, 1) with tiles left over, and wide M (a prefill chunk): x W^T of the
    dequantized weight to fp32 accuracy, each row's result the same whatever rows are beside
    it; and it agrees with int4pack to int4pack's bf16 rounding."""
    skip_unless_runs("avx2")
    weight = torch.from_numpy(random_weight((out_features, in_features), seed=5))
    qw = quantize(weight, "int4", group_size, "avx2")
    packed = quantize(weight, "int4", group_size, "int4pack")
    deq = qw.dequantize()
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 33, 130):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        y = qw.matmul(x)
        assert_product_of_seen_weights(qw, x, y, deq)
        assert torch.equal(qw.matmul(x[-1:]), y[-1:])
        assert torch.equal(qw.matmul(x[:1]), y[:1])
        assert (y - packed.matmul(x)).norm() / y.norm() < 1e-2


def test_avx2_kernel_names_bad_operands() -> None:
    skip_unless_runs("avx2")
    qw = quantize(torch.randn(32, 64), "int4", layout="avx2")
    assert isinstance(qw, Int4Avx2Weight)
    with pytest.raises(RuntimeError, match="96 inputs do not fit"):
        int4_avx2_cpu.linear(torch.randn(2, 96), qw.codes, qw.scale_offset, 32)
    with pytest.raises(RuntimeError, match="x must be contiguous float32"):
        int4_avx2_cpu.linear(torch.randn(2, 64).bfloat16(), qw.codes, qw.scale_offset, 32)
    with pytest.raises(RuntimeError, match="scale_offset must be"):
        int4_avx2_cpu.linear(torch.randn(2, 64), qw.codes, qw.scale_offset.float(), 32)


@pytest.mark.parametrize("layout_name", ["tiled", "avx2"])
def test_native_kernel_in_a_compiled_graph(layout_name: str) -> None:
    """The operators have shape functions, so torch.compile traces them into a full graph."""
    skip_unless_runs(layout_name)
    qw = quantize(torch.from_numpy(random_weight((OUT, IN), seed=6)), "int4", layout=layout_name)
    compiled = torch.compile(lambda x: torch.relu(qw.matmul(x)), fullgraph=True, dynamic=True)
    for rows in (3, 7):
        x = torch.randn(rows, IN)
        assert torch.equal(compiled(x), torch.relu(qw.matmul(x)))


# --- the packaged model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_tensors(default_gguf: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(default_gguf).tensors}


def torch_shape(tensor: gguf.ReaderTensor) -> tuple[int, int]:
    """GGUF lists dimensions innermost first."""
    inner, outer = (int(n) for n in tensor.shape)
    return outer, inner


def test_real_q4_1_attention_weight(gguf_tensors: dict[str, gguf.ReaderTensor]) -> None:
    tensor = gguf_tensors["blk.0.attn_q.weight"]
    assert tensor.tensor_type == QType.Q4_1
    qw = from_gguf_blocks(tensor.tensor_type, tensor.data, torch_shape(tensor), "cpu")
    ref = reference(tensor.data, tensor.tensor_type)
    deq = qw.dequantize()
    assert_close_to_reference(deq, ref)
    assert_matmul_matches(qw, deq, ref)


def test_real_q8_0_embedding_as_lm_head(gguf_tensors: dict[str, gguf.ReaderTensor]) -> None:
    tensor = gguf_tensors["token_embd.weight"]
    assert tensor.tensor_type == QType.Q8_0
    shape = torch_shape(tensor)
    lm_head = from_gguf_blocks(tensor.tensor_type, tensor.data, shape, "cpu")
    ref = reference(tensor.data, tensor.tensor_type)
    x = torch.randn(4, shape[1], generator=torch.Generator().manual_seed(2))
    logits, exact = lm_head.matmul(x), x @ ref.T
    assert (logits - exact).norm() / exact.norm() < 1e-2
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    # Reading back all 49152 rows through the kernel is slow; rows are independent, so check some.
    rows = tensor.data[-512:]
    deq = from_gguf_blocks(tensor.tensor_type, rows, (512, shape[1]), "cpu").dequantize()
    assert ((deq - ref[-512:]).abs() <= BF16_EPS * ref[-512:].abs()).all()


# --- full-precision checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "group_size", "max_relative_rms"),
    [("int4", 32, 0.09), ("int4", 128, 0.13), ("int8", 32, 0.006), ("int8", 64, 0.007)],
)
def test_quantize_round_trip(
    mode: str, group_size: int, max_relative_rms: float, layout: str
) -> None:
    weight = torch.from_numpy(random_weight((OUT, IN), seed=3)) * 0.02
    qw = quantize(weight, mode, group_size, layout)
    deq = qw.dequantize()
    assert (deq - weight).norm() / weight.norm() < max_relative_rms
    # Per group, no weight is off by more than half a step (plus the bf16 rounding of the zero).
    groups = weight.view(OUT, -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low) / 15 if mode == "int4" else groups.abs().amax(-1) / 127
    bound = step * 0.5 * (1 + BF16_EPS) + BF16_EPS * groups.abs().amax(-1)
    assert ((deq.view_as(groups) - groups).abs().amax(-1) <= bound).all()
    assert_matmul_matches(qw, deq, ref=deq)


def test_quantize_handles_constant_groups() -> None:
    weight = torch.zeros(16, 64)
    weight[:, 32:] = 0.5
    assert torch.equal(quantize(weight, "int4").dequantize(), weight)
    torch.testing.assert_close(quantize(weight, "int8").dequantize(), weight, rtol=0, atol=1e-3)


def test_quantize_rejects_bad_arguments() -> None:
    weight = torch.randn(16, 96)
    with pytest.raises(ValueError, match="group_size"):
        quantize(weight, "int4", group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        quantize(weight, "int4", group_size=16)
    with pytest.raises(ValueError, match="mode"):
        quantize(weight, "int2")  # type: ignore[arg-type]
