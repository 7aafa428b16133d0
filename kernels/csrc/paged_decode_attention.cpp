// Paged attention for decode rows on the CPU: each sequence's single query token attends
// over its keys/values read in place from the block-table KV cache.
//
// Why a kernel: the PyTorch reference gathers every sequence's blocks into a dense buffer
// (a full copy of the KV it reads) and then runs SDPA over a padded, masked batch. At 64
// sequences of a few hundred tokens that copy is as costly as the attention itself. Here
// K and V are read once, straight from the cache, with no padding.
//
// The GQA group of query heads sharing a kv head is handled together, so each key/value
// vector is loaded once for the whole group. Scores
// and the softmax are in float32 whatever the cache dtype; the softmax is exact (max
// subtracted), not online, since a decode row's scores fit in a small buffer. Dot products,
// exp and the value accumulation are vectorised (vec_math.h): at 64 sequences this kernel
// is bound by reading K and V, ~20 MB per layer, not by arithmetic.
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
