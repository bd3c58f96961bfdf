// 4-bit weight x float32 activation matmul for x86 CPUs with AVX2, FMA and F16C (no AVX-512).
//
// Layout (built by sluice/layers/quant.py, Int4Avx2Weight): output rows are cut into tiles of
// 16; a tile stores 8 bytes per input, byte j holding the code of row j in its low nibble and of
// row 8 + j in its high one ([tiles, K, 8]), so one 8-byte load and a mask or a shift give the
// codes of 8 rows as 8 int32 lanes. Scales and offsets are float16, [tiles, groups, 2, 16].
//
// With W = c * scale + offset per row and group of inputs, each row m of x and group g adds
//   y += scale * sum_k c_k x_k + offset * sum_k x_k,
// so the codes are only converted to float, never scaled, and a tile's codes are unpacked once
// per block of up to 4 rows of x and applied to all of them (torch's int4pack kernel scales
// every weight and unpacks once per 4 rows). Few rows keep several tiles in flight, so that
// enough independent sums hide the latency of the multiply-adds. All arithmetic is float32: a
// row's sums are added in the same order whatever the rows or tiles beside it, so its result
// does not depend on the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kTileBytes = 8;  // per input
// Tiles a thread works through together, for every block of rows: their codes (8 KiB for 1024
// inputs each) stay in L1/L2 while each block of rows reads them.
constexpr int64_t kTileChunk = 8;
constexpr int64_t kRowBlock = 4;

struct Problem {
  const float* x;            // [M, K]
  const float* sums;         // [M, groups]: sum of x over each group
  const uint8_t* codes;      // [tiles, K, 8]
  const at::Half* scale_offset;  // [tiles, groups, 2, 16]
  float* out;                // [M, tiles * 16]
  int64_t rows, inputs, groups, group, tiles;
};

// MR rows of x (from row0) against TN tiles (from tile0).
template <int MR, int TN>
void block(const Problem& p, int64_t row0, int64_t tile0) {
  const __m256i low_nibble = _mm256_set1_epi32(0x0F);
  const int64_t out_stride = p.tiles * kTileRows;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 dot[MR][TN][2];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < TN; ++t) dot[m][t][0] = dot[m][t][1] = _mm256_setzero_ps();
    const int64_t k0 = g * p.group;
    for (int64_t k = k0; k < k0 + p.group; ++k) {
      __m256 xs[MR];
      for (int m = 0; m < MR; ++m) xs[m] = _mm256_broadcast_ss(p.x + (row0 + m) * p.inputs + k);
      for (int t = 0; t < TN; ++t) {
        const uint8_t* c = p.codes + ((tile0 + t) * p.inputs + k) * kTileBytes;
        const __m256i packed = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)c));
        const __m256 first = _mm256_cvtepi32_ps(_mm256_and_si256(packed, low_nibble));
        const __m256 second = _mm256_cvtepi32_ps(_mm256_srli_epi32(packed, 4));
        for (int m = 0; m < MR; ++m) {
          dot[m][t][0] = _mm256_fmadd_ps(first, xs[m], dot[m][t][0]);
          dot[m][t][1] = _mm256_fmadd_ps(second, xs[m], dot[m][t][1]);
        }
      }
    }
    for (int t = 0; t < TN; ++t) {
      const at::Half* so = p.scale_offset + ((tile0 + t) * p.groups + g) * 2 * kTileRows;
      __m256 scale[2], offset[2];
      for (int h = 0; h < 2; ++h) {
        scale[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(so + 8 * h)));
        offset[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(so + kTileRows + 8 * h)));
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 sum = _mm256_broadcast_ss(p.sums + (row0 + m) * p.groups + g);
        float* y = p.out + (row0 + m) * out_stride + (tile0 + t) * kTileRows;
        for (int h = 0; h < 2; ++h) {
          __m256 acc = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8 * h);
          acc = _mm256_fmadd_ps(scale[h], dot[m][t][h], acc);
          acc = _mm256_fmadd_ps(offset[h], sum, acc);
          _mm256_storeu_ps(y + 8 * h, acc);
        }
      }
    }
  }
}

template <int MR, int TN>
void rows_against_tiles(const Problem& p, int64_t row0, int64_t begin, int64_t end) {
  int64_t t = begin;
  for (; t + TN <= end; t += TN) block<MR, TN>(p, row0, t);
  for (; t < end; ++t) block<MR, 1>(p, row0, t);
}

// Every row of x against tiles [begin, end).
void tiles(const Problem& p, int64_t begin, int64_t end) {
  int64_t m = 0;
  for (; m + kRowBlock <= p.rows; m += kRowBlock) rows_against_tiles<4, 1>(p, m, begin, end);
  switch (p.rows - m) {
    case 3: rows_against_tiles<3, 1>(p, m, begin, end); break;
    case 2: rows_against_tiles<2, 2>(p, m, begin, end); break;
    case 1: rows_against_tiles<1, 4>(p, m, begin, end); break;
  }
}

void group_sums(const float* x, int64_t rows, int64_t inputs, int64_t group, float* sums) {
  const int64_t groups = inputs / group;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += x[m * inputs + k];
      sums[m * groups + g] = sum;
    }
}

at::Tensor int4_avx2_linear(const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& scale_offset, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "int4_avx2_linear: x must be contiguous float32 [M, K]");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kTileBytes && codes.is_contiguous() &&
                  codes.scalar_type() == at::kByte,
              "int4_avx2_linear: codes must be contiguous uint8 [tiles, K, 8]");
  const int64_t rows = x.size(0), inputs = x.size(1), tile_count = codes.size(0);
  TORCH_CHECK(group > 0 && inputs % group == 0 && codes.size(1) == inputs,
              "int4_avx2_linear: ", inputs, " inputs do not fit codes ", codes.sizes(),
              " in groups of ", group);
  const int64_t groups = inputs / group;
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.numel() == tile_count * groups * 2 * kTileRows,
              "int4_avx2_linear: scale_offset must be contiguous float16 [tiles, groups, 2, 16]");
  at::Tensor out = at::empty({rows, tile_count * kTileRows}, x.options());
  if (rows == 0) return out;
  std::vector<float> sums(rows * groups);
  group_sums(x.data_ptr<float>(), rows, inputs, group, sums.data());
  const Problem p{x.data_ptr<float>(), sums.data(), codes.data_ptr<uint8_t>(),
                  scale_offset.data_ptr<at::Half>(), out.data_ptr<float>(),
                  rows, inputs, groups, group, tile_count};
  const int64_t chunks = (tile_count + kTileChunk - 1) / kTileChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk)
      tiles(p, chunk * kTileChunk, std::min(tile_count, (chunk + 1) * kTileChunk));
  });
  return out;
}

}  // namespace

// A fragment: other sluice kernels define operators of this namespace too.
TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def("int4_avx2_linear(Tensor x, Tensor codes, Tensor scale_offset, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("int4_avx2_linear", &int4_avx2_linear); }
