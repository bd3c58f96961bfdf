// 4-bit weight x float activation matmul for x86 CPUs with AVX512-VNNI.
//
// Layout (built by sluice/layers/quant.py): output rows are cut into tiles of 16; a tile's codes
// are stored input by input in chunks of 64 bytes covering 8 inputs. Byte b of chunk j holds, for
// output row 16 t + b / 4, the code of input 8 j + b % 4 in its low nibble and of input
// 8 j + 4 + b % 4 in its high one. Masking a chunk's low (or high) nibbles thus puts 4
// consecutive codes of each of the 16 rows in one 32-bit lane, which is the operand order of
// vpdpbusd: one instruction multiplies 16 rows by 4 inputs as unsigned x signed bytes and adds
// the sums to 16 int32 lanes. Tiles are stored in pairs, chunk by chunk ([K / 8, 2, 64] per pair),
// so a thread reads its share of the weight as one stream.
//
// Activations are quantized per row and group of inputs (as llama.cpp's Q8 activations): with
// s = max |x| / 127, x = s (q1 + q2 / 256) + e, q1 = round(x / s) and q2 the rounded rest, both
// int8. Two passes give |e| <= s / 256 (about 2^-15 of the group's largest input: the product
// is that of an fp32 matmul of the dequantized weight to ~1e-5), the first alone |e| <= s / 2
// (as llama.cpp; for bf16 activations, and for ranking). The integer sums are exact; per
// group and row, with one fp16 scale and offset per weight row and group (W = c * scale + offset),
//   y += scale * s * (sum c q1 + sum c q2 / 256) + offset * sum of the quantized x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kChunkInputs = 8;
constexpr int64_t kChunkBytes = 64;
constexpr int64_t kPairTiles = 2;
// Rows sharing each unpacked chunk: as many as keep their integer sums (2 * TN * PASSES vectors
// a row) within the 32 vector registers beside the chunk's codes.
template <int PASSES>
constexpr int kRowBlock = PASSES == 2 ? 3 : 4;
constexpr float kRestScale = 256.0f;

struct Rows {
  const int8_t* codes;  // [passes, M, K]: q1, then q2
  const float* scale;   // [M, groups]: s of each row and group
  const float* sums;    // [M, groups]: sum of the quantized x over each group
  int64_t pass_stride;
  int64_t inputs;
  int64_t groups;
};

struct Weight {
  const uint8_t* codes;          // pairs of tiles, [K / 8, tiles in pair, 64] each
  const at::Half* scale_offset;  // pairs of tiles, [groups, tiles in pair, 2, 16] each
  int64_t tile_code_bytes;       // K / 8 * 64
  int64_t tile_scale_halves;     // groups * 2 * 16
  int64_t group;
};

int32_t four_codes(const int8_t* codes) {
  int32_t word;
  std::memcpy(&word, codes, sizeof word);
  return word;
}

// MR rows of x against TN tiles of a pair stored `stored` tiles wide, from `codes` and
// `scale_offset` (already at the first tile). Each row's sums are its own and are added in the
// same order whatever MR is, so a row's result does not depend on the rows beside it. The
// results accumulate in `out` (L1-resident), leaving the vector registers to the integer sums.
template <int MR, int TN, int PASSES>
void tile_block(const Rows& x, const uint8_t* codes, const at::Half* scale_offset, int stored,
                int64_t group, int64_t row0, float* out, int64_t out_stride) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512 rest = _mm512_set1_ps(1.0f / kRestScale);
  const int64_t chunks_per_group = group / kChunkInputs;
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < TN; ++t)
      _mm512_storeu_ps(out + (row0 + m) * out_stride + t * kTileRows, _mm512_setzero_ps());

  for (int64_t g = 0; g < x.groups; ++g) {
    __m512i inner[MR][TN][PASSES];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < TN; ++t)
        for (int p = 0; p < PASSES; ++p) inner[m][t][p] = _mm512_setzero_si512();
    for (int64_t j = g * chunks_per_group; j < (g + 1) * chunks_per_group; ++j) {
      __m512i low[TN], high[TN];
      for (int t = 0; t < TN; ++t) {
        __m512i bytes = _mm512_loadu_si512(codes + (j * stored + t) * kChunkBytes);
        low[t] = _mm512_and_si512(bytes, low_nibbles);
        high[t] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
      }
      for (int m = 0; m < MR; ++m) {
        for (int p = 0; p < PASSES; ++p) {
          const int8_t* q = x.codes + p * x.pass_stride + (row0 + m) * x.inputs + j * kChunkInputs;
          const __m512i first = _mm512_set1_epi32(four_codes(q));
          const __m512i second = _mm512_set1_epi32(four_codes(q + 4));
          for (int t = 0; t < TN; ++t) {
            inner[m][t][p] = _mm512_dpbusd_epi32(inner[m][t][p], low[t], first);
            inner[m][t][p] = _mm512_dpbusd_epi32(inner[m][t][p], high[t], second);
          }
        }
      }
    }
    for (int t = 0; t < TN; ++t) {
      const at::Half* so = scale_offset + (g * stored + t) * 2 * kTileRows;
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)so));
      const __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(so + kTileRows)));
      for (int m = 0; m < MR; ++m) {
        __m512 sum = _mm512_cvtepi32_ps(inner[m][t][0]);
        if constexpr (PASSES == 2)
          sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(inner[m][t][1]), rest, sum);
        const int64_t at = (row0 + m) * x.groups + g;
        float* y = out + (row0 + m) * out_stride + t * kTileRows;
        __m512 acc = _mm512_loadu_ps(y);
        acc = _mm512_fmadd_ps(_mm512_mul_ps(scale, _mm512_set1_ps(x.scale[at])), sum, acc);
        acc = _mm512_fmadd_ps(offset, _mm512_set1_ps(x.sums[at]), acc);
        _mm512_storeu_ps(y, acc);
      }
    }
  }
}

template <int TN, int PASSES>
void rows_against(const Rows& x, const uint8_t* codes, const at::Half* so, int stored,
                  int64_t group, int64_t rows, float* out, int64_t out_stride) {
  constexpr int block = kRowBlock<PASSES>;
  int64_t m = 0;
  for (; m + block <= rows; m += block)
    tile_block<block, TN, PASSES>(x, codes, so, stored, group, m, out, out_stride);
  switch (rows - m) {
    case 3: tile_block<3, TN, PASSES>(x, codes, so, stored, group, m, out, out_stride); break;
    case 2: tile_block<2, TN, PASSES>(x, codes, so, stored, group, m, out, out_stride); break;
    case 1: tile_block<1, TN, PASSES>(x, codes, so, stored, group, m, out, out_stride); break;
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
      const uint8_t* codes = w.codes + tile0 * w.tile_code_bytes;
      const at::Half* so = w.scale_offset + tile0 * w.tile_scale_halves;
      float* at = out + tile0 * kTileRows;
      if (tiles - tile0 >= kPairTiles)
        rows_against<kPairTiles, PASSES>(x, codes, so, kPairTiles, w.group, rows, at, out_stride);
      else
        rows_against<1, PASSES>(x, codes, so, 1, w.group, rows, at, out_stride);
    }
  });
}

__m512 load16(const float* x) { return _mm512_loadu_ps(x); }

__m512 load16(const at::BFloat16* x) {
  __m256i bits = _mm256_loadu_si256((const __m256i*)x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Rounds 16 values to int32 (to nearest even), stores them as int8 and returns them.
__m512i store_rounded(__m512 values, int8_t* to) {
  __m512i q = _mm512_cvtps_epi32(values);
  q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-128));
  _mm_storeu_si128((__m128i*)to, _mm512_cvtepi32_epi8(q));
  return q;
}

// One row's group of inputs (a multiple of 16) as q1 (and q2), its s and its quantized sum.
template <int PASSES, typename T>
void quantize_group(const T* x, int64_t group, int8_t* q1, int8_t* q2, float* scale, float* sum) {
  __m512 largest = _mm512_setzero_ps();
  for (int64_t k = 0; k < group; k += 16)
    largest = _mm512_max_ps(largest, _mm512_abs_ps(load16(x + k)));
  const float max = _mm512_reduce_max_ps(largest);
  const float s = max / 127.0f;
  const __m512 inverse = _mm512_set1_ps(max > 0.0f ? 127.0f / max : 0.0f);
  __m512i first = _mm512_setzero_si512(), second = _mm512_setzero_si512();
  for (int64_t k = 0; k < group; k += 16) {
    __m512 value = load16(x + k);
    __m512 scaled = _mm512_mul_ps(value, inverse);
    __m512i q = store_rounded(scaled, q1 + k);
    first = _mm512_add_epi32(first, q);
    if constexpr (PASSES == 2) {
      __m512 rest = _mm512_sub_ps(scaled, _mm512_cvtepi32_ps(q));
      q = store_rounded(_mm512_mul_ps(rest, _mm512_set1_ps(kRestScale)), q2 + k);
      second = _mm512_add_epi32(second, q);
    }
  }
  *scale = s;
  *sum = s * (static_cast<float>(_mm512_reduce_add_epi32(first)) +
              static_cast<float>(_mm512_reduce_add_epi32(second)) / kRestScale);
}

template <int PASSES, typename T>
void quantize_rows(const T* x, int64_t rows, int64_t inputs, int64_t group, int8_t* codes,
                   float* scales, float* sums) {
  const int64_t groups = inputs / group;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = m * inputs + g * group;
        quantize_group<PASSES>(x + at, group, codes + at, codes + rows * inputs + at,
                               scales + m * groups + g, sums + m * groups + g);
      }
  });
}

template <int PASSES, typename T>
void multiply(const at::Tensor& x, const Weight& w, int64_t tiles, float* out) {
  const int64_t rows = x.size(0), inputs = x.size(1), groups = inputs / w.group;
  std::vector<int8_t> quantized(PASSES * rows * inputs);
  std::vector<float> scales(rows * groups), sums(rows * groups);
  quantize_rows<PASSES>(x.data_ptr<T>(), rows, inputs, w.group, quantized.data(), scales.data(),
                        sums.data());
  const Rows r{quantized.data(), scales.data(), sums.data(), rows * inputs, inputs, groups};
  all_tiles<PASSES>(r, w, rows, tiles, out);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& scale_offset, int64_t group, int64_t passes) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_linear: x must be contiguous [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int4_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(passes == 1 || passes == 2, "int4_linear: passes must be 1 or 2, got ", passes);
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kChunkBytes && codes.is_contiguous() &&
                  codes.scalar_type() == at::kByte,
              "int4_linear: codes must be contiguous uint8 [tiles, K / 8, 64]");
  const int64_t rows = x.size(0), inputs = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(group % 16 == 0 && inputs % group == 0 && codes.size(1) * kChunkInputs == inputs,
              "int4_linear: ", inputs, " inputs do not fit codes ", codes.sizes(), " in groups of ",
              group);
  const int64_t groups = inputs / group;
  TORCH_CHECK(scale_offset.scalar_type() == at::kHalf && scale_offset.is_contiguous() &&
                  scale_offset.numel() == tiles * groups * 2 * kTileRows,
              "int4_linear: scale_offset must be contiguous float16 [tiles, groups, 2, 16]");

  at::Tensor out = at::empty({rows, tiles * kTileRows}, x.options().dtype(at::kFloat));
  if (rows == 0) return out.to(x.scalar_type());
  const Weight w{codes.data_ptr<uint8_t>(), scale_offset.data_ptr<at::Half>(),
                 codes.size(1) * kChunkBytes, groups * 2 * kTileRows, group};
  const bool fp32 = x.scalar_type() == at::kFloat;
  float* y = out.data_ptr<float>();
  if (passes == 2)
    fp32 ? multiply<2, float>(x, w, tiles, y) : multiply<2, at::BFloat16>(x, w, tiles, y);
  else
    fp32 ? multiply<1, float>(x, w, tiles, y) : multiply<1, at::BFloat16>(x, w, tiles, y);
  return fp32 ? out : out.to(x.scalar_type());
}

}  // namespace

// A fragment: sluice/layers/attention.py defines operators of this namespace too.
TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def(
      "int4_linear(Tensor x, Tensor codes, Tensor scale_offset, int group, int passes) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("int4_linear", &int4_linear); }
