// 4-bit weight x float activation matmul for x86 CPUs with AVX512-BF16.
//
// Layout (built by sluice/layers/quant.py): output rows are cut into tiles of 16; a tile's codes
// are stored input by input in chunks of 32 bytes covering 4 inputs. Byte b of chunk j holds, for
// output row 16 t + b / 2, the code of input 4 j + b % 2 in its low nibble and of input
// 4 j + 2 + b % 2 in its high one. Zero-extending a chunk to 16-bit lanes thus puts both codes
// of an input pair side by side for each of the 16 rows, which is the operand order of
// vdpbf16ps: one instruction multiplies 16 rows by two inputs. Tiles are stored in pairs, chunk
// by chunk ([K / 4, 2, 32] per pair), so a thread reads its share of the weight as one stream.
//
// Codes become the bf16 numbers c - 8 by a table lookup (vpermw). Per group of inputs the kernel
// sums (c - 8) * x in fp32 and applies
//   y += scale * inner + (offset + 8 * scale) * sum(x over the group),
// with one fp16 scale and offset per row and group (W = c * scale + offset), stored per tile pair
// as [groups, 2 tiles, 2, 16].
//
// bf16 activations take one pass. fp32 activations take two: x = hi + lo with both halves bf16,
// which carries 16 bits of x's mantissa (a relative error of 2^-17 per input against bf16's
// 2^-9), so the product is that of an fp32 matmul of the dequantized weight to ~1e-5.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kChunkInputs = 4;
constexpr int64_t kChunkBytes = 32;
constexpr int64_t kPairTiles = 2;

struct Rows {
  const uint32_t* pairs;  // [passes, M, K / 2]: bf16 pairs of x's high half, then its low half
  const float* sums;      // [M, K / group]: sum of the passes' x over each group
  int64_t pass_stride;
  int64_t pair_stride;
  int64_t groups;
};

struct Weight {
  const uint8_t* codes;          // pairs of tiles, [K / 4, tiles in pair, 32] each
  const at::Half* scale_offset;  // pairs of tiles, [groups, tiles in pair, 2, 16] each
  int64_t tile_code_bytes;       // K / 4 * 32
  int64_t tile_scale_halves;     // groups * 2 * 16
  int64_t group;
};

uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as torch's .to(bfloat16)
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16_bits(uint16_t half) {
  uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// The bf16 numbers -8..7 in 16-bit lanes 0..15: vpermw's table from code to centred code.
__m512i centred_codes() {
  alignas(64) static const auto table = [] {
    std::array<uint16_t, 32> values{};
    for (int c = 0; c < 16; ++c) values[c] = to_bf16_bits(static_cast<float>(c - 8));
    return values;
  }();
  return _mm512_load_si512(table.data());
}

// MR rows of x against TN tiles of a pair stored `stored` tiles wide, from `codes` and
// `scale_offset` (already at the first tile). Each nibble plane and pass accumulates apart, so
// one row keeps 4 * TN vdpbf16ps chains in flight; the order of additions never depends on MR,
// so a row's result does not depend on its neighbours.
template <int MR, int TN, int PASSES>
void tile_block(const Rows& x, const uint8_t* codes, const at::Half* scale_offset, int stored,
                int64_t group, int64_t row0, float* out, int64_t out_stride) {
  constexpr int PARTS = 2 * PASSES;
  const __m512i low_nibble = _mm512_set1_epi16(0x000F);
  const __m512i centred = centred_codes();
  const __m512 eight = _mm512_set1_ps(8.0f);
  const int64_t chunks_per_group = group / kChunkInputs;
  __m512 acc[MR][TN];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < TN; ++t) acc[m][t] = _mm512_setzero_ps();

  for (int64_t g = 0; g < x.groups; ++g) {
    __m512 inner[MR][TN][PARTS];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < TN; ++t)
        for (int q = 0; q < PARTS; ++q) inner[m][t][q] = _mm512_setzero_ps();
    for (int64_t j = g * chunks_per_group; j < (g + 1) * chunks_per_group; ++j) {
      for (int t = 0; t < TN; ++t) {
        const uint8_t* chunk = codes + (j * stored + t) * kChunkBytes;
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)chunk));
        __m512i low_codes = _mm512_and_si512(bytes, low_nibble);
        __m512bh low = (__m512bh)_mm512_permutexvar_epi16(low_codes, centred);
        __m512bh high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), centred);
        for (int m = 0; m < MR; ++m) {
          for (int p = 0; p < PASSES; ++p) {
            const uint32_t* pair =
                x.pairs + p * x.pass_stride + (row0 + m) * x.pair_stride + 2 * j;
            __m512bh x_low = (__m512bh)_mm512_set1_epi32((int)pair[0]);
            __m512bh x_high = (__m512bh)_mm512_set1_epi32((int)pair[1]);
            inner[m][t][p] = _mm512_dpbf16_ps(inner[m][t][p], low, x_low);
            inner[m][t][PASSES + p] = _mm512_dpbf16_ps(inner[m][t][PASSES + p], high, x_high);
          }
        }
      }
    }
    for (int t = 0; t < TN; ++t) {
      const at::Half* so = scale_offset + (g * stored + t) * 2 * kTileRows;
      __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)so));
      __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(so + kTileRows)));
      offset = _mm512_fmadd_ps(scale, eight, offset);
      for (int m = 0; m < MR; ++m) {
        __m512 sum = inner[m][t][0];
        for (int q = 1; q < PARTS; ++q) sum = _mm512_add_ps(sum, inner[m][t][q]);
        acc[m][t] = _mm512_fmadd_ps(scale, sum, acc[m][t]);
        __m512 xsum = _mm512_set1_ps(x.sums[(row0 + m) * x.groups + g]);
        acc[m][t] = _mm512_fmadd_ps(offset, xsum, acc[m][t]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < TN; ++t)
      _mm512_storeu_ps(out + (row0 + m) * out_stride + t * kTileRows, acc[m][t]);
}

// All rows against the `stored` tiles of a pair (or an odd last tile) from `tile0`: up to two
// rows at a time over both tiles, more rows one tile at a time, so that the partial sums stay
// within the 32 vector registers.
template <int PASSES>
void all_rows(const Rows& x, const Weight& w, int64_t rows, int64_t tile0, int stored, float* out,
              int64_t out_stride) {
  const uint8_t* codes = w.codes + tile0 * w.tile_code_bytes;
  const at::Half* so = w.scale_offset + tile0 * w.tile_scale_halves;
  out += tile0 * kTileRows;
  auto one_tile = [&](auto mr, int64_t m) {
    for (int t = 0; t < stored; ++t)
      tile_block<decltype(mr)::value, 1, PASSES>(x, codes + t * kChunkBytes,
                                                  so + t * 2 * kTileRows, stored, w.group, m,
                                                  out + t * kTileRows, out_stride);
  };
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) one_tile(std::integral_constant<int, 4>{}, m);
  if (rows - m == 3) {
    one_tile(std::integral_constant<int, 3>{}, m);
  } else if (stored == kPairTiles && rows - m > 0) {
    if (rows - m == 2)
      tile_block<2, kPairTiles, PASSES>(x, codes, so, stored, w.group, m, out, out_stride);
    else
      tile_block<1, kPairTiles, PASSES>(x, codes, so, stored, w.group, m, out, out_stride);
  } else if (rows - m == 2) {
    one_tile(std::integral_constant<int, 2>{}, m);
  } else if (rows - m == 1) {
    one_tile(std::integral_constant<int, 1>{}, m);
  }
}

template <int PASSES>
void all_tiles(const Rows& x, const Weight& w, int64_t rows, int64_t tiles, float* out) {
  // Pairs of tiles go to threads in equal shares; each thread reads only its share.
  const int64_t pairs = (tiles + kPairTiles - 1) / kPairTiles;
  const int64_t out_stride = tiles * kTileRows;
  at::parallel_for(0, pairs, 2, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t tile0 = pair * kPairTiles;
      const int stored = tiles - tile0 >= kPairTiles ? kPairTiles : 1;
      all_rows<PASSES>(x, w, rows, tile0, stored, out, out_stride);
    }
  });
}

// x as bf16 bits, one plane per pass (fp32 x: its bf16 rounding, then the bf16 rounding of the
// rest), and per-group sums of the passes' values.
void prepare_rows(const at::Tensor& x, int64_t group, int passes, uint16_t* bits, float* sums) {
  const int64_t n = x.numel();
  if (passes == 1) {
    std::memcpy(bits, x.data_ptr(), n * sizeof(uint16_t));
  } else {
    const float* data = x.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      bits[i] = to_bf16_bits(data[i]);
      bits[n + i] = to_bf16_bits(data[i] - from_bf16_bits(bits[i]));
    }
  }
  for (int64_t i = 0; i < n / group; ++i) {
    float sum = 0.0f;
    for (int p = 0; p < passes; ++p)
      for (int64_t k = 0; k < group; ++k) sum += from_bf16_bits(bits[p * n + i * group + k]);
    sums[i] = sum;
  }
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& scale_offset, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_linear: x must be contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kChunkBytes && codes.is_contiguous() &&
                  codes.scalar_type() == at::kByte,
              "int4_linear: codes must be contiguous uint8 [tiles, K / 4, 32]");
  const int64_t rows = x.size(0), inputs = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(group % kChunkInputs == 0 && inputs % group == 0 &&
                  codes.size(1) * kChunkInputs == inputs,
              "int4_linear: ", inputs, " inputs do not fit codes ", codes.sizes(), " in groups of ",
              group);
  const int64_t groups = inputs / group;
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.numel() == tiles * groups * 2 * kTileRows,
              "int4_linear: scale_offset must be contiguous float16 [tiles, groups, 2, 16]");

  at::Tensor out = at::empty({rows, tiles * kTileRows}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const int passes = x.scalar_type() == at::kFloat ? 2 : 1;
  std::vector<uint16_t> bits(passes * rows * inputs);
  std::vector<float> sums(rows * groups);
  prepare_rows(x, group, passes, bits.data(), sums.data());
  const Rows r{reinterpret_cast<const uint32_t*>(bits.data()), sums.data(), rows * inputs / 2,
               inputs / 2, groups};
  const Weight w{codes.data_ptr<uint8_t>(), scale_offset.data_ptr<at::Half>(),
                 codes.size(1) * kChunkBytes, groups * 2 * kTileRows, group};
  if (passes == 2)
    all_tiles<2>(r, w, rows, tiles, out.data_ptr<float>());
  else
    all_tiles<1>(r, w, rows, tiles, out.data_ptr<float>());
  return passes == 2 ? out : out.to(x.scalar_type());
}

}  // namespace

// A fragment: sluice/layers/attention.py defines operators of this namespace too.
TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale_offset, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("int4_linear", &int4_linear); }
