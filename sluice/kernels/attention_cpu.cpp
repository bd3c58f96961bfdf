// Attention over paged K/V for x86 CPUs with AVX-512, one query per row against its context,
// read in place from the pages (no gathered copy), for float32, float16 and bfloat16 pages. A row
// is a decoding sequence's new token, or a token of a prompt's chunk with the context up to
// itself (the engine gives each its sequence's page table and its own length).
//
// Threads take spans of rows one at a time: a row alone, or consecutive rows of one sequence
// (a verify step's, a prompt chunk's), whose keys are read and widened once for them all. Per
// row: the scores of every head for every context token (dot products of 16-lane vectors, 16
// tokens' folded into one vector together), an exact softmax (max, exp, sum) and the
// probability-weighted sum of the values. A half-precision cache's keys and values are widened
// once for all the query heads that share their KV head. A row's result depends on its own pages
// and length only, never on the rows around it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

__m512 load16(const float* x) { return _mm512_loadu_ps(x); }

__m512 load16(const at::Half* x) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)x)); }

__m512 load16(const at::BFloat16* x) {
  __m256i bits = _mm256_loadu_si256((const __m256i*)x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// e^x for x <= 0, to ~2 ulp: 2^n e^r with |r| <= ln 2 / 2 and e^r by its Taylor series to r^7.
__m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below this e^x is 0 in fp32
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

struct Problem {
  const float* q;            // [B, heads, dim]
  const int64_t* tables;     // [B, pages per row]
  const int64_t* lens;       // [B]
  float* out;                // [B, heads, dim]
  int64_t table_stride;
  int64_t heads, kv_heads, dim, page_size;
  float scale;
};

// Calls visit(t, token) for each context token t of sequence b (its K or V for every KV head),
// page by page.
template <typename T, typename Visit>
void for_each_token(const Problem& p, const T* cache, int64_t b, Visit visit) {
  const int64_t token_stride = p.kv_heads * p.dim, page_stride = p.page_size * token_stride;
  const int64_t* table = p.tables + b * p.table_stride;
  for (int64_t t0 = 0; t0 < p.lens[b]; t0 += p.page_size) {
    const T* page = cache + table[t0 / p.page_size] * page_stride;
    const int64_t count = std::min(p.page_size, p.lens[b] - t0);
    for (int64_t i = 0; i < count; ++i) visit(t0 + i, page + i * token_stride);
  }
}

// The first min(n, 16) lanes.
__mmask16 first_lanes(int64_t n) { return n >= kLanes ? 0xFFFF : (1u << n) - 1; }

// Softmax of one head's scores in place.
void softmax(float* s, int64_t len) {
  __m512 most = _mm512_set1_ps(-INFINITY);  // by hand: the compiler keeps a max loop scalar
  for (int64_t t = 0; t < len; t += kLanes) {
    const __mmask16 live = first_lanes(len - t);
    most = _mm512_mask_max_ps(most, live, most, _mm512_maskz_loadu_ps(live, s + t));
  }
  const float largest = _mm512_reduce_max_ps(most);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t += kLanes) {
    const __mmask16 live = first_lanes(len - t);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), _mm512_set1_ps(largest)));
    e = _mm512_maskz_mov_ps(live, e);
    _mm512_mask_storeu_ps(s + t, live, e);
    total = _mm512_add_ps(total, e);
  }
  const float inverse = 1.0f / _mm512_reduce_add_ps(total);
  for (int64_t t = 0; t < len; ++t) s[t] *= inverse;
}

// The sums of 16 vectors' lanes, sum j in lane j: pairs, then quads, are folded within each
// 128-bit quarter, then the quarters are added across; 30 shuffles for 16 sums, where reducing
// each vector alone takes 4 apiece and a chain of 4 dependent adds.
__m512 sum16(const __m512 (&v)[kLanes]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per quarter: [a, b, a, b] for a = v[2i], b = v[2i + 1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per quarter: [a, b, c, d] of v[4i .. 4i + 3]
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  // quarters (0 + 1, 2 + 3) of quads 0 and 1, and of 2 and 3; then their halves added
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

// One head's scores for `count` (1-16) consecutive tokens, their keys `stride` floats apart from
// `keys`; past `count` the last token is scored again and not stored.
template <int VECTORS>
void score_tokens(const float* q, const float* keys, int64_t stride, int64_t count, float scale,
                  float* scores) {
  __m512 query[VECTORS];
  for (int v = 0; v < VECTORS; ++v) query[v] = _mm512_loadu_ps(q + v * kLanes);
  __m512 dots[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    const float* k = keys + std::min(j, count - 1) * stride;
    dots[j] = _mm512_mul_ps(query[0], _mm512_loadu_ps(k));
    for (int v = 1; v < VECTORS; ++v)
      dots[j] = _mm512_fmadd_ps(query[v], _mm512_loadu_ps(k + v * kLanes), dots[j]);
  }
  _mm512_mask_storeu_ps(scores, first_lanes(count),
                        _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale)));
}

// `count` tokens' rows of one KV head (`dim` values each, `stride` apart) as float32 rows, dim
// apart: a half-precision cache is widened once for all the heads that share the KV head.
template <typename T>
const float* widened(const T* rows, int64_t count, int64_t dim, int64_t stride,
                     std::vector<float>& to, int64_t& to_stride) {
  if constexpr (std::is_same_v<T, float>) {
    to_stride = stride;
    return rows;
  } else {
    to.resize(count * dim);
    for (int64_t j = 0; j < count; ++j)
      for (int64_t d = 0; d < dim; d += kLanes)
        _mm512_storeu_ps(to.data() + j * dim + d, load16(rows + j * stride + d));
    to_stride = dim;
    return to.data();
  }
}

// HEADS heads of one KV head (from `head`): the probability-weighted sum of the values, each
// value widened once for all of them.
template <typename T, int VECTORS, int HEADS>
void weigh_values(const Problem& p, const T* values, int64_t b, int64_t head, const float* probs,
                  int64_t len, float* out) {
  const int64_t offset = head / (p.heads / p.kv_heads) * p.dim;
  __m512 acc[HEADS][VECTORS];
  for (int h = 0; h < HEADS; ++h)
    for (int v = 0; v < VECTORS; ++v) acc[h][v] = _mm512_setzero_ps();
  for_each_token(p, values, b, [&](int64_t t, const T* value) {
    __m512 row[VECTORS];
    for (int v = 0; v < VECTORS; ++v) row[v] = load16(value + offset + v * kLanes);
    for (int h = 0; h < HEADS; ++h) {
      const __m512 weight = _mm512_set1_ps(probs[h * len + t]);
      for (int v = 0; v < VECTORS; ++v) acc[h][v] = _mm512_fmadd_ps(weight, row[v], acc[h][v]);
    }
  });
  for (int h = 0; h < HEADS; ++h)
    for (int v = 0; v < VECTORS; ++v) _mm512_storeu_ps(out + h * p.dim + v * kLanes, acc[h][v]);
}

// Consecutive rows of one sequence, each one token longer than the one before (a verify step's
// tokens, a prompt chunk's): they read the same pages, so their keys are read and widened once.
struct Span {
  int64_t first, rows;
};

// Where row r of a span whose first row has `first_len` tokens starts in the span's scores
// ([row][head][its length]): after the rows before it, each a token longer than the last.
int64_t scores_before(int64_t heads, int64_t first_len, int64_t r) {
  return heads * (r * first_len + r * (r - 1) / 2);
}

// The span's rows' scores [row][head][its length] from `scores`, 16 tokens at a time in the
// order the pages hold them (their values are prefetched meanwhile). Block for block each row's
// scores are those it would get alone.
template <typename T, int VECTORS>
void score_span(const Problem& p, const T* keys, const T* values, Span span,
                std::vector<float>& scores, std::vector<float>& rows) {
  const int64_t group = p.heads / p.kv_heads, first_len = p.lens[span.first];
  const int64_t longest = first_len + span.rows - 1;
  const int64_t token_stride = p.kv_heads * p.dim, page_stride = p.page_size * token_stride;
  // the longest row's table: each row's own agrees with it on every page that row reads
  const int64_t* table = p.tables + (span.first + span.rows - 1) * p.table_stride;
  for (int64_t t0 = 0, count; t0 < longest; t0 += count) {  // blocks end at a page's end too
    const int64_t at = table[t0 / p.page_size] * page_stride + t0 % p.page_size * token_stride;
    count = std::min({kLanes, longest - t0, p.page_size - t0 % p.page_size});
    const char* value = reinterpret_cast<const char*>(values + at);
    for (int64_t byte = 0; byte < count * token_stride * int64_t(sizeof(T)); byte += 64)
      _mm_prefetch(value + byte, _MM_HINT_T1);
    for (int64_t kv_head = 0; kv_head < p.kv_heads; ++kv_head) {
      int64_t stride;
      const float* k =
          widened(keys + at + kv_head * p.dim, count, p.dim, token_stride, rows, stride);
      // rows too short for this block (only the first ones can be) are skipped
      const int64_t r0 = std::max<int64_t>(0, t0 + 1 - first_len);
      for (int64_t r = r0; r < span.rows; ++r) {
        const int64_t len = first_len + r, b = span.first + r, live = std::min(count, len - t0);
        float* row_scores = scores.data() + scores_before(p.heads, first_len, r);
        for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h)
          score_tokens<VECTORS>(p.q + (b * p.heads + h) * p.dim, k, stride, live, p.scale,
                                row_scores + h * len + t0);
      }
    }
  }
}

// One row's output from its scores [head][len]: each head's softmax, then the weighted values,
// the heads of a KV head together (as many as keep their sums in registers).
template <typename T, int VECTORS>
void weigh_row(const Problem& p, const T* values, int64_t b, float* scores) {
  const int64_t group = p.heads / p.kv_heads, len = p.lens[b];
  for (int64_t h = 0; h < p.heads; ++h) softmax(scores + h * len, len);
  // at most 4 heads (the cases below) and 16 accumulators
  constexpr int64_t kMostHeads = std::clamp(16 / VECTORS, 1, 4);
  float* out = p.out + b * p.heads * p.dim;
  for (int64_t h = 0; h < p.heads;) {
    const int64_t heads = std::min(kMostHeads, (h / group + 1) * group - h);
    const float* probs = scores + h * len;
    switch (heads) {
      case 1: weigh_values<T, VECTORS, 1>(p, values, b, h, probs, len, out + h * p.dim); break;
      case 2: weigh_values<T, VECTORS, 2>(p, values, b, h, probs, len, out + h * p.dim); break;
      case 3: weigh_values<T, VECTORS, 3>(p, values, b, h, probs, len, out + h * p.dim); break;
      case 4: weigh_values<T, VECTORS, 4>(p, values, b, h, probs, len, out + h * p.dim); break;
    }
    h += heads;
  }
}

// One span (VECTORS = head dim / 16): every row's scores, then each row's output.
template <typename T, int VECTORS>
void attend(const Problem& p, const T* keys, const T* values, Span span,
            std::vector<float>& scores, std::vector<float>& rows) {
  const int64_t first_len = p.lens[span.first];
  scores.resize(scores_before(p.heads, first_len, span.rows));
  score_span<T, VECTORS>(p, keys, values, span, scores, rows);
  for (int64_t r = 0; r < span.rows; ++r)
    weigh_row<T, VECTORS>(p, values, span.first + r,
                          scores.data() + scores_before(p.heads, first_len, r));
}

// Whether row b is row b - 1's sequence one token further: a token longer, and the same pages
// for all it reads.
bool continues(const Problem& p, int64_t b) {
  const int64_t len = p.lens[b];
  if (len != p.lens[b - 1] + 1) return false;
  const int64_t* table = p.tables + b * p.table_stride;
  return std::equal(table, table + (len + p.page_size - 1) / p.page_size, table - p.table_stride);
}

// Runs of rows that continue one another, each cut into as many spans as there are threads (so
// that a lone sequence's verify rows still spread over them), at most 8 rows a span.
std::vector<Span> spans_of(const Problem& p, int64_t seqs, int64_t threads) {
  std::vector<Span> spans;
  for (int64_t first = 0, end; first < seqs; first = end) {
    end = first + 1;
    while (end < seqs && continues(p, end)) ++end;
    const int64_t size = std::min<int64_t>(8, (end - first + threads - 1) / threads);
    for (int64_t at = first; at < end; at += size) spans.push_back({at, std::min(size, end - at)});
  }
  return spans;
}

// Rows differ in length (a prompt's tokens attend to ever more of it), so threads take spans one
// at a time, longest (last) first, rather than equal shares.
template <typename T, int VECTORS>
void attend_all(const Problem& p, const T* keys, const T* values, int64_t seqs) {
  const std::vector<Span> spans = spans_of(p, seqs, at::get_num_threads());
  const int64_t count = spans.size();
  std::atomic<int64_t> taken{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);  // a lone span: inline
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scores, rows;
    for (int64_t next = taken++; next < count; next = taken++)
      attend<T, VECTORS>(p, keys, values, spans[count - 1 - next], scores, rows);
  });
}

template <typename T>
void attend_all(const Problem& p, const at::Tensor& k_cache, const at::Tensor& v_cache,
                int64_t seqs) {
  const T* keys = reinterpret_cast<const T*>(k_cache.data_ptr());
  const T* values = reinterpret_cast<const T*>(v_cache.data_ptr());
  switch (p.dim / kLanes) {
    case 1: attend_all<T, 1>(p, keys, values, seqs); break;
    case 2: attend_all<T, 2>(p, keys, values, seqs); break;
    case 4: attend_all<T, 4>(p, keys, values, seqs); break;
    case 8: attend_all<T, 8>(p, keys, values, seqs); break;
    case 16: attend_all<T, 16>(p, keys, values, seqs); break;
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& page_tables, const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be [B, heads, dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "paged_decode: caches must be contiguous [pages, page_size, kv_heads, dim] alike");
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && (dim == 16 || dim == 32 || dim == 64 || dim == 128 ||
                                         dim == 256),
              "paged_decode: head dim ", dim,
              " must match the cache and be 16, 32, 64, 128 or 256");
  TORCH_CHECK(heads % kv_heads == 0, "paged_decode: ", heads, " query heads do not group over ",
              kv_heads, " KV heads");
  TORCH_CHECK(page_tables.dim() == 2 && page_tables.size(0) == seqs &&
                  page_tables.scalar_type() == at::kLong && kv_lens.numel() == seqs &&
                  kv_lens.scalar_type() == at::kLong,
              "paged_decode: page_tables [B, pages] and kv_lens [B] must be int64");
  const at::Tensor queries = q.to(at::kFloat).contiguous();
  const at::Tensor tables = page_tables.contiguous(), lens = kv_lens.contiguous();
  const int64_t page_size = k_cache.size(1);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < seqs; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= tables.size(1) * page_size, "paged_decode: sequence ",
                b, " has ", len[b], " tokens, its table holds ", tables.size(1) * page_size);
  const int64_t* table = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < seqs; ++b)
    for (int64_t i = 0; i < (len[b] + page_size - 1) / page_size; ++i) {
      const int64_t page = table[b * tables.size(1) + i];
      TORCH_CHECK(page >= 0 && page < k_cache.size(0), "paged_decode: sequence ", b, " names page ",
                  page, " of ", k_cache.size(0));
    }
  at::Tensor out = at::empty({seqs, heads * dim}, q.options().dtype(at::kFloat));
  const Problem p{queries.data_ptr<float>(), table, len,
                  out.data_ptr<float>(), tables.size(1), heads, kv_heads, dim, page_size,
                  static_cast<float>(scale)};
  switch (k_cache.scalar_type()) {
    case at::kFloat: attend_all<float>(p, k_cache, v_cache, seqs); break;
    case at::kHalf: attend_all<at::Half>(p, k_cache, v_cache, seqs); break;
    case at::kBFloat16: attend_all<at::BFloat16>(p, k_cache, v_cache, seqs); break;
    default: TORCH_CHECK(false, "paged_decode: pages of ", k_cache.scalar_type(), " unsupported");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sluice, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_tables, "
      "Tensor kv_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sluice, CPU, m) { m.impl("paged_decode", &paged_decode); }
