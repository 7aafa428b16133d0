// Paged attention for decode rows on the CPU: each sequence's single query token attends
// over its keys/values read in place from the block-table KV cache.
//
// Why a kernel: the PyTorch reference gathers every sequence's blocks into a dense buffer
// (a full copy of the KV it reads) and then runs SDPA over a padded, masked batch. At 64
// sequences of a few hundred tokens that copy is as costly as the attention itself. Here
// K and V are read once, straight from the cache, with no padding.
//
// Work item = (sequence, kv head): the GQA group of query heads sharing that kv head is
// handled together, so each key/value vector is loaded once for the whole group. Scores
// and the softmax are in float32 whatever the cache dtype; the softmax is exact (max
// subtracted), not online, since a decode row's scores fit in a small buffer.
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
#include <vector>

namespace {

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

  at::parallel_for(0, n * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), scores;
    std::vector<float> kf(d), vf(d);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = w / hkv, h = w % hkv;
      const int64_t ctx = lens[s];
      const int64_t row = row_of[s];
      const int32_t* table = tables + s * table_stride;
      scores.resize(group * ctx);
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* qp = q + row * q_row + (h * group + g) * q_head;
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = static_cast<float>(qp[i]) * scale;
      }
      // Scores, block by block (one table lookup per block, not per token).
      for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t nt = std::min(bs, ctx - t0);
        const scalar_t* kb = kc + static_cast<int64_t>(table[t0 / bs]) * block_stride + h * d;
        for (int64_t j = 0; j < nt; ++j) {
          const scalar_t* kp = kb + j * token_stride;
          const float* kv;
          if constexpr (std::is_same_v<scalar_t, float>) {
            kv = kp;
          } else {
            for (int64_t i = 0; i < d; ++i) kf[i] = static_cast<float>(kp[i]);
            kv = kf.data();
          }
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * d;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < d; ++i) dot += qg[i] * kv[i];
            scores[g * ctx + t0 + j] = dot;
          }
        }
      }
      // Softmax per query head of the group.
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * ctx;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < ctx; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < ctx; ++t) {
          sg[t] = std::exp(sg[t] - mx);
          sum += sg[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < ctx; ++t) sg[t] *= inv;
      }
      // Weighted sum of values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t nt = std::min(bs, ctx - t0);
        const scalar_t* vb = vc + static_cast<int64_t>(table[t0 / bs]) * block_stride + h * d;
        for (int64_t j = 0; j < nt; ++j) {
          const scalar_t* vp = vb + j * token_stride;
          const float* vv;
          if constexpr (std::is_same_v<scalar_t, float>) {
            vv = vp;
          } else {
            for (int64_t i = 0; i < d; ++i) vf[i] = static_cast<float>(vp[i]);
            vv = vf.data();
          }
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * ctx + t0 + j];
            float* ag = acc.data() + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) ag[i] += p * vv[i];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* op = o + row * o_row + (h * group + g) * o_head;
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
