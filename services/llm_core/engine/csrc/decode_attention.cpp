// Decode attention on the CPU, reading each session's keys and values where they live in the KV arena.
//
// A decode row is one query per head over all of its session's keys. The G query heads that share a KV head are
// taken together, so each key and value row is read from memory once for all G of them. Two ops, with torch's
// softmax between them (Python: services/llm_core/engine/cpu_attention.py):
//   decode_scores:  scores[b, h, j] = scale * <q[b, h], k[h / G, offset[b] + j]>   for j < length[b], else -inf
//   decode_values:  out[b, h] = sum_j p[b, h, j] * v[h / G, offset[b] + j]
// Why not MKL: per session these are matmuls with 1-8 rows, for which sgemm reached 13-17 GB/s of key/value reads
// on one core here against 35 GB/s for a plain streaming read, and one call per session and layer adds ~15 us of
// dispatch each. These loops walk the keys in small blocks that stay in L1 while every head of the group uses
// them, and one call covers every decode row of a layer. Why not one pass with an online softmax (flash-decoding):
// tried, with a polynomial exp per block; it was 10-25% slower here and ~1e-6 further from the torch path.
//
// Vectors are GCC vector extensions (8 floats): the compiler lowers them to AVX2/FMA or NEON as built.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace {

constexpr int W = 8;  // floats per vector
constexpr float kInf = std::numeric_limits<float>::infinity();
// How far ahead of the key rows in use their successors are fetched (a prefetch never faults, so one past the
// arena's end is harmless).
constexpr int64_t PREFETCH_ROWS = 32;
constexpr int64_t VALUE_BLOCK = 32;  // value rows per block
typedef float vec __attribute__((vector_size(W * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(vec v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

typedef int mask __attribute__((vector_size(W * sizeof(int))));

// The sums of 8 vectors, as one vector: lane t = sum of a[t]'s lanes (three rounds of pairwise adds).
inline vec hsum8(const vec* a) {
  const mask even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const mask lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const mask lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  vec t[4], u[2];
  for (int i = 0; i < 4; ++i)
    t[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], even) + __builtin_shuffle(a[2 * i], a[2 * i + 1], odd);
  for (int i = 0; i < 2; ++i)
    u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], lo2) + __builtin_shuffle(t[2 * i], t[2 * i + 1], hi2);
  return __builtin_shuffle(u[0], u[1], lo4) + __builtin_shuffle(u[0], u[1], hi4);
}

// scores[g * ld + j] = scale * <q[g], k[j]> for g < G, j < n. Keys 8 at a time: a block of 8 rows stays in L1
// while all G heads use it, and each head keeps one accumulator per key in registers.
void head_scores(const float* q, int64_t G, const float* k, int64_t n, int64_t D, float scale, float* scores,
                 int64_t ld) {
  constexpr int KB = W;  // hsum8 reduces W vectors
  int64_t j = 0;
  for (; j + KB <= n; j += KB) {
    const float* kb = k + j * D;
    for (int64_t line = 0; line < KB * D; line += 16)  // 16 floats: a cache line
      __builtin_prefetch(kb + PREFETCH_ROWS * D + line);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      vec acc[KB] = {};
      for (int64_t c = 0; c < D; c += W) {
        const vec qv = load(qg + c);
        for (int t = 0; t < KB; ++t) acc[t] += qv * load(kb + t * D + c);
      }
      store(scores + g * ld + j, scale * hsum8(acc));
    }
  }
  for (; j < n; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      vec acc = {};
      for (int64_t c = 0; c < D; c += W) acc += load(q + g * D + c) * load(k + j * D + c);
      scores[g * ld + j] = scale * hsum(acc);
    }
  }
}

// out[g] += sum_{j in [j0, j1)} p[g * ldp + j] * v[j] for GN heads, 16 columns (one cache line of a row) at a
// time: the GN x 2 accumulators stay in registers while the rows of the block stream past, and each row's same
// line one block ahead is fetched meanwhile.
template <int GN>
void values_block(const float* p, int64_t ldp, const float* v, int64_t j0, int64_t j1, int64_t D, float* out) {
  for (int64_t c = 0; c < D; c += 2 * W) {
    vec acc[GN][2];
    for (int g = 0; g < GN; ++g) acc[g][0] = load(out + g * D + c), acc[g][1] = load(out + g * D + c + W);
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = v + j * D + c;
      __builtin_prefetch(row + VALUE_BLOCK * D);
      const vec v0 = load(row), v1 = load(row + W);
      for (int g = 0; g < GN; ++g) {
        const float pj = p[g * ldp + j];
        acc[g][0] += pj * v0;
        acc[g][1] += pj * v1;
      }
    }
    for (int g = 0; g < GN; ++g) store(out + g * D + c, acc[g][0]), store(out + g * D + c + W, acc[g][1]);
  }
}

// out[g] = sum_{j < n} p[g * ldp + j] * v[j] for g < G. Value rows in blocks (16 KB at head dim 128), read from
// memory once and from L1 by each group of up to four heads.
void head_values(const float* p, int64_t ldp, int64_t G, const float* v, int64_t n, int64_t D, float* out) {
  std::fill(out, out + G * D, 0.f);
  for (int64_t j0 = 0; j0 < n; j0 += VALUE_BLOCK) {
    const int64_t j1 = std::min(n, j0 + VALUE_BLOCK);
    for (int64_t g = 0; g < G; g += 4) {
      const float* pg = p + g * ldp;
      float* og = out + g * D;
      switch (std::min<int64_t>(4, G - g)) {
        case 4: values_block<4>(pg, ldp, v, j0, j1, D, og); break;
        case 3: values_block<3>(pg, ldp, v, j0, j1, D, og); break;
        case 2: values_block<2>(pg, ldp, v, j0, j1, D, og); break;
        default: values_block<1>(pg, ldp, v, j0, j1, D, og); break;
      }
    }
  }
}

// Shapes, dtypes, layouts and that every row's keys lie inside the arena; returns G (query heads per KV head).
int64_t check_args(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& offsets, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.device().is_cpu(),
              "decode attention: q must be a contiguous float32 CPU tensor (rows, heads, head_dim)");
  TORCH_CHECK(kv.dim() == 3 && kv.scalar_type() == at::kFloat && kv.device().is_cpu() && kv.stride(2) == 1 &&
                  kv.stride(1) == kv.size(2),
              "decode attention: keys/values must be float32 CPU (kv_heads, rows, head_dim) with contiguous rows");
  TORCH_CHECK(kv.size(2) == q.size(2) && q.size(2) % (2 * W) == 0,
              "decode attention: head_dim must match and be a multiple of ", 2 * W);
  TORCH_CHECK(q.size(1) % kv.size(0) == 0, "decode attention: heads must be a multiple of kv_heads");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  lengths.is_contiguous() && offsets.numel() == q.size(0) && lengths.numel() == q.size(0),
              "decode attention: offsets and lengths must be int64 with one entry per row");
  TORCH_CHECK(q.size(0) > 0, "decode attention: no rows");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(off[b] >= 0 && len[b] > 0 && off[b] + len[b] <= kv.size(1), "decode attention: row ", b,
                " reads keys [", off[b], ", ", off[b] + len[b], ") outside the arena's ", kv.size(1), " rows");
  }
  return q.size(1) / kv.size(0);
}

// f(b, h) for every row b and KV head h, split over torch's intra-op threads (one with a replica's default).
template <typename F>
void for_each_kv_head(int64_t B, int64_t Hkv, const F& f) {
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t / Hkv, t % Hkv);
  });
}

at::Tensor decode_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& offsets,
                         const at::Tensor& lengths, double scale) {
  const int64_t G = check_args(q, k, offsets, lengths);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t L = *std::max_element(len, len + B);
  at::Tensor scores = at::empty({B, H, L}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  for_each_kv_head(B, Hkv, [&](int64_t b, int64_t h) {
    float* sb = sp + (b * H + h * G) * L;
    head_scores(qp + (b * H + h * G) * D, G, kp + h * k.stride(0) + off[b] * D, len[b], D,
                static_cast<float>(scale), sb, L);
    for (int64_t g = 0; g < G; ++g) std::fill(sb + g * L + len[b], sb + (g + 1) * L, -kInf);  // shorter rows
  });
  return scores;
}

at::Tensor decode_values(const at::Tensor& p, const at::Tensor& v, const at::Tensor& offsets,
                         const at::Tensor& lengths) {
  TORCH_CHECK(p.dim() == 3 && p.scalar_type() == at::kFloat && p.is_contiguous(),
              "decode attention: probabilities must be contiguous float32 (rows, heads, keys)");
  const int64_t B = p.size(0), H = p.size(1), L = p.size(2), Hkv = v.size(0), D = v.size(2);
  at::Tensor out = at::empty({B, H, D}, p.options());
  const int64_t G = check_args(out, v, offsets, lengths);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  TORCH_CHECK(*std::max_element(len, len + B) <= L, "decode attention: probabilities shorter than a row's keys");
  const float* pp = p.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_each_kv_head(B, Hkv, [&](int64_t b, int64_t h) {
    head_values(pp + (b * H + h * G) * L, L, G, vp + h * v.stride(0) + off[b] * D, len[b], D,
                op + (b * H + h * G) * D);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpmo, m) {
  m.def("decode_scores(Tensor q, Tensor k, Tensor offsets, Tensor lengths, float scale) -> Tensor");
  m.def("decode_values(Tensor p, Tensor v, Tensor offsets, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(minicpmo, CPU, m) {
  m.impl("decode_scores", &decode_scores);
  m.impl("decode_values", &decode_values);
}
