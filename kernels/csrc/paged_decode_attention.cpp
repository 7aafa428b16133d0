// Paged attention for decode rows on the CPU: each sequence's single query token attends
// over its keys/values read in place from the block-table KV cache.
//
// Why a kernel: the PyTorch reference gathers every sequence's blocks into a dense buffer
// (a full copy of the KV it reads) and then runs SDPA over a padded, masked batch. At 64
// sequences of a few hundred tokens that copy is as costly as the attention itself. Here
// K and V are read once, straight from the cache, with no padding.
//
// The GQA group of query heads sharing a kv head is handled together, so each key/value
// vector is loaded once for the whole group. Scores and the softmax are in float32
// whatever the cache dtype; the softmax is exact (max subtracted), not online, since a
// decode row's scores fit in a small buffer. Dot products, exp and the value accumulation
// are vectorised (vec_math.h). float32 caches with head dim 64 or 128 and groups of 1-8
// take a faster path (decode_heads_f32, below), which at 64 sequences is close to bound by
// reading K and V, ~25 MB per layer.
//
// Layouts (checked by the Python wrapper, which is the only caller):
//   query        [T, Hq, D]  any row/head strides, unit stride along D
//   k/v cache    [num_blocks, block_size, Hkv, D] contiguous
//   block_tables [n, max_blocks] int32 contiguous; context_lens [n] int32; rows [n] int64
//   out          [T, Hq, D]  any row/head strides, unit stride along D; only `rows` written

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec_math.h"

namespace {

// A cache row as float32: the row itself for float caches, else converted into `buf`.
template <typename scalar_t>
inline const float* as_float(const scalar_t* row, float* buf, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t i = 0; i < d; ++i) buf[i] = static_cast<float>(row[i]);
    return buf;
  }
}

// The float32 path for the common head shapes, with the head dim D and the GQA group G
// fixed at compile time, for the `nh` kv heads of one sequence. Why a second path: the
// generic loop below spent as long on arithmetic as on reading. Measured on this project's
// 2-core AVX-512 box, 64 sequences of 150-350 tokens, 30 layers, 738 MB of K/V per step,
// medians: generic 82 ms from a cold pool and 41 ms with the blocks cache-hot (a one-off
// run of that shape before this path existed); this path 50-55 ms cold and 10-17 ms hot,
// where a plain torch.sum over the same bytes takes 40-45 ms
// (loadtests/bench_decode_attention.py). What changed:
//  - the dot products of a chunk of Vec::size() tokens end in one transpose-and-add
//    (reduce_lanes) instead of one horizontal add each, and their scores in one store;
//  - the group's value sums stay in registers over a chunk instead of a load and a store
//    of the accumulator per token and head;
//  - a chunk's tokens are read with all their kv heads (whole cache lines), and the next
//    chunk's rows are prefetched: blocks lie anywhere in the pool, so the hardware's
//    stream prefetcher stops at each block's end (~10 ms of the cold time in one run).
// Scores are laid out [nh * G][ctx_pad], ctx_pad a multiple of the vector width.
template <int D, int G>
void decode_heads_f32(const float* q, int64_t q_head, const float* kc, const float* vc,
                      const int32_t* table, int64_t ctx, int64_t bs, int64_t block_stride,
                      int64_t token_stride, int64_t nh, float scale, float* scores,
                      int64_t ctx_pad, float* acc_buf, float* o, int64_t o_head) {
  using rayfleet_vec::Vec;
  constexpr int L = Vec::size();
  constexpr int NV = D / L;
  static_assert(D % L == 0, "head dim must be a multiple of the vector width");
  const Vec vscale(scale);
  // Token t lives at cache + table[t / bs] * block_stride + (t % bs) * token_stride, its
  // heads side by side; walked a chunk of L tokens at a time with no division per token.
  // All `nh` kv heads of a chunk are done together, so each cache line is read once.
  const float* tp[L];
  const int64_t row_floats = nh * D;
  auto chunk_rows = [&](const float* cache, int64_t t0, int nt, int64_t& blk, int64_t& off) {
    for (int j = 0; j < nt; ++j) {
      tp[j] = cache + static_cast<int64_t>(table[blk]) * block_stride + off * token_stride;
      if (++off == bs) off = 0, ++blk;
    }
    // Ask for the next chunk's rows now: blocks lie anywhere in the pool, so the hardware's
    // stream prefetcher stops at each block's end.
    int64_t b = blk, f = off;
    const int nn = static_cast<int>(std::min<int64_t>(L, ctx - t0 - nt));
    for (int j = 0; j < nn; ++j) {
      const float* r = cache + static_cast<int64_t>(table[b]) * block_stride + f * token_stride;
      for (int64_t x = 0; x < row_floats; x += 16) __builtin_prefetch(r + x);
      if (++f == bs) f = 0, ++b;
    }
  };
  int64_t blk = 0, off = 0;
  for (int64_t t0 = 0; t0 < ctx; t0 += L) {
    const int nt = static_cast<int>(std::min<int64_t>(L, ctx - t0));
    chunk_rows(kc, t0, nt, blk, off);
    for (int64_t h = 0; h < nh; ++h) {
      for (int g = 0; g < G; ++g) {
        const float* qp = q + (h * G + g) * q_head;
        Vec qv[NV];
        for (int v = 0; v < NV; ++v) qv[v] = Vec::loadu(qp + v * L) * vscale;
        Vec acc[L];
        for (int j = 0; j < L; ++j) {
          if (j < nt) {
            const float* kp = tp[j] + h * D;
            acc[j] = qv[0] * Vec::loadu(kp);
            for (int v = 1; v < NV; ++v)
              acc[j] = at::vec::fmadd(qv[v], Vec::loadu(kp + v * L), acc[j]);
          } else {
            acc[j] = Vec(0.f);
          }
        }
        rayfleet_vec::reduce_lanes(acc).store(scores + (h * G + g) * ctx_pad + t0);
      }
    }
  }
  for (int64_t r = 0; r < nh * G; ++r) rayfleet_vec::softmax_inplace(scores + r * ctx_pad, ctx);
  std::fill(acc_buf, acc_buf + nh * G * D, 0.f);
  blk = 0, off = 0;
  for (int64_t t0 = 0; t0 < ctx; t0 += L) {
    const int nt = static_cast<int>(std::min<int64_t>(L, ctx - t0));
    chunk_rows(vc, t0, nt, blk, off);
    for (int64_t h = 0; h < nh; ++h) {  // the group's sums stay in registers for a chunk
      Vec acc[G][NV];
      float* ab = acc_buf + h * G * D;
      for (int g = 0; g < G; ++g)
        for (int v = 0; v < NV; ++v) acc[g][v] = Vec::loadu(ab + g * D + v * L);
      for (int j = 0; j < nt; ++j) {
        const float* vp = tp[j] + h * D;
        Vec vv[NV];
        for (int v = 0; v < NV; ++v) vv[v] = Vec::loadu(vp + v * L);
        for (int g = 0; g < G; ++g) {
          const Vec p(scores[(h * G + g) * ctx_pad + t0 + j]);
          for (int v = 0; v < NV; ++v) acc[g][v] = at::vec::fmadd(p, vv[v], acc[g][v]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int v = 0; v < NV; ++v) acc[g][v].store(ab + g * D + v * L);
    }
  }
  for (int64_t r = 0; r < nh * G; ++r)
    std::copy(acc_buf + r * D, acc_buf + (r + 1) * D, o + r * o_head);
}

using FastHeadFn = void (*)(const float*, int64_t, const float*, const float*, const int32_t*,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, float*, int64_t,
                            float*, float*, int64_t);

template <int D, int... Gs>
FastHeadFn pick_group(int64_t group, std::integer_sequence<int, Gs...>) {
  FastHeadFn fn = nullptr;
  ((group == Gs + 1 ? (fn = &decode_heads_f32<D, Gs + 1>, 0) : 0), ...);
  return fn;
}

// The fast path for this shape, or nullptr: float32, head dim 64 or 128, group 1..8.
template <typename scalar_t>
FastHeadFn fast_head_fn(int64_t d, int64_t group) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    return nullptr;
  } else {
    constexpr auto groups = std::make_integer_sequence<int, 8>{};
    if (d == 64) return pick_group<64>(group, groups);
    if (d == 128) return pick_group<128>(group, groups);
    return nullptr;
  }
}

template <typename scalar_t>
void decode_attention_impl(const at::Tensor& query, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, const at::Tensor& rows, double scale_d,
                           at::Tensor& out) {
  const int64_t n = context_lens.size(0);
  const int64_t hq = query.size(1);
  const int64_t d = query.size(2);
  const int64_t bs = k_cache.size(1);
  const int64_t hkv = k_cache.size(2);
  const int64_t group = hq / hkv;
  const float scale = static_cast<float>(scale_d);

  const scalar_t* q = query.data_ptr<scalar_t>();
  const int64_t q_row = query.stride(0), q_head = query.stride(1);
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t o_row = out.stride(0), o_head = out.stride(1);
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const int64_t token_stride = hkv * d;  // between consecutive tokens of one block
  const int64_t block_stride = bs * token_stride;

  // Work item = (sequence, range of kv heads). With many sequences a whole sequence is one
  // item, so each block is read front to back (all heads of a token are adjacent): the
  // blocks lie anywhere in a pool far larger than the caches, and reading them is most of
  // what this kernel costs (measured: 2.1 ms for 19 MB of K/V from a cold 1.2 GB pool, vs
  // 3.6 ms before vectorising; explicit prefetching gained nothing over the hardware's).
  // With few sequences, one item per kv head keeps every thread busy.
  const int64_t threads = at::get_num_threads();
  const int64_t hsplit = n >= 4 * threads ? 1 : hkv;
  const int64_t heads_per_item = hkv / hsplit;
  const FastHeadFn fast = fast_head_fn<scalar_t>(d, group);
  if (fast != nullptr) {
    const float* qf32 = reinterpret_cast<const float*>(q);
    float* of32 = reinterpret_cast<float*>(o);
    const float* kf32 = reinterpret_cast<const float*>(kc);
    const float* vf32 = reinterpret_cast<const float*>(vc);
    constexpr int64_t L = rayfleet_vec::Vec::size();
    at::parallel_for(0, n * hsplit, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc(heads_per_item * group * d);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t s = w / hsplit, h0 = (w % hsplit) * heads_per_item;
        const int64_t ctx = lens[s], row = row_of[s];
        const int64_t ctx_pad = (ctx + L - 1) / L * L;
        scores.resize(heads_per_item * group * ctx_pad);
        fast(qf32 + row * q_row + h0 * group * q_head, q_head, kf32 + h0 * d, vf32 + h0 * d,
             tables + s * table_stride, ctx, bs, block_stride, token_stride, heads_per_item,
             scale, scores.data(), ctx_pad, acc.data(), of32 + row * o_row + h0 * group * o_head,
             o_head);
      }
    });
    return;
  }
  at::parallel_for(0, n * hsplit, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads_per_item * group * d), acc(heads_per_item * group * d), scores;
    std::vector<float> kf(d), vf(d);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = w / hsplit, h0 = (w % hsplit) * heads_per_item;
      const int64_t ctx = lens[s];
      const int64_t row = row_of[s];
      const int32_t* table = tables + s * table_stride;
      const int64_t nq = heads_per_item * group;  // query heads of this item, from h0 * group
      scores.resize(nq * ctx);
      for (int64_t g = 0; g < nq; ++g) {
        const scalar_t* qp = q + row * q_row + (h0 * group + g) * q_head;
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = static_cast<float>(qp[i]) * scale;
      }
      auto block_of = [&](const scalar_t* cache, int64_t t0) {
        return cache + static_cast<int64_t>(table[t0 / bs]) * block_stride + h0 * d;
      };
      // Scores, block by block (one table lookup per block, not per token).
      for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t nt = std::min(bs, ctx - t0);
        const scalar_t* kb = block_of(kc, t0);
        for (int64_t j = 0; j < nt; ++j) {
          for (int64_t hh = 0; hh < heads_per_item; ++hh) {
            const float* kv = as_float(kb + j * token_stride + hh * d, kf.data(), d);
            for (int64_t g = hh * group; g < (hh + 1) * group; ++g)
              scores[g * ctx + t0 + j] = rayfleet_vec::dot(qf.data() + g * d, kv, d);
          }
        }
      }
      for (int64_t g = 0; g < nq; ++g) rayfleet_vec::softmax_inplace(scores.data() + g * ctx, ctx);
      // Weighted sum of values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t nt = std::min(bs, ctx - t0);
        const scalar_t* vb = block_of(vc, t0);
        for (int64_t j = 0; j < nt; ++j) {
          for (int64_t hh = 0; hh < heads_per_item; ++hh) {
            const float* vv = as_float(vb + j * token_stride + hh * d, vf.data(), d);
            for (int64_t g = hh * group; g < (hh + 1) * group; ++g)
              rayfleet_vec::axpy(scores[g * ctx + t0 + j], vv, acc.data() + g * d, d);
          }
        }
      }
      for (int64_t g = 0; g < nq; ++g) {
        scalar_t* op = o + row * o_row + (h0 * group + g) * o_head;
        for (int64_t i = 0; i < d; ++i) op[i] = static_cast<scalar_t>(acc[g * d + i]);
      }
    }
  });
}

void paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, const at::Tensor& rows, double scale,
                            at::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3, "query and out must be [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "k/v caches must be contiguous [num_blocks, block_size, Hkv, D] of equal shape");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query/out need unit stride on D");
  TORCH_CHECK(query.size(2) == k_cache.size(3) && query.size(1) % k_cache.size(2) == 0,
              "query heads/dim do not match the cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  rows.scalar_type() == at::kLong,
              "block_tables/context_lens must be int32 and rows int64");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous() && rows.is_contiguous(),
              "index tensors must be contiguous");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, cache and out must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(),
                                  "paged_decode_attention", [&] {
                                    decode_attention_impl<scalar_t>(query, k_cache, v_cache,
                                                                    block_tables, context_lens,
                                                                    rows, scale, out);
                                  });
}

}  // namespace

TORCH_LIBRARY(rayfleet_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, Tensor rows, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(rayfleet_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
