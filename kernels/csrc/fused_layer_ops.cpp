// Fused element-wise ops of a Llama decoder layer, for the CPU.
//
// Why: at small batches a decode step is ~1000 tiny PyTorch ops (30 layers x ~35), and their
// dispatch costs as much as a third of the step next to the memory-bound matmuls. These
// three ops replace ~20 of them per layer, and never materialise the temporaries the
// composite versions allocate. Each matches its PyTorch reference in rayfleet/kernels
// (tests/test_cpu_fused_ops.py); all math is in float32 whatever the tensor dtype.
//
//   fused_add_rms_norm(x, residual, weight, eps): residual += x; x = rms_norm(residual) * w
//       (in place on both; the Hugging Face order: normalise in float32, cast, then scale)
//   rotary_embedding_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slots, hq, hkv)
//       rotates q and k of the fused qkv rows in place (GPT-NeoX "rotate half" layout, signed
//       sin table as in rotary.py) and writes k and v into their cache slots
//   silu_and_mul(gate_up, out): out = silu(gate_up[:, :I]) * gate_up[:, I:]

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "vec_math.h"

namespace {

template <typename scalar_t>
void add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                       double eps_d) {
  const int64_t t = x.size(0), h = x.size(1);
  scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* rp = residual.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const float eps = static_cast<float>(eps_d);
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(h);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* xr = xp + r * h;
      scalar_t* rr = rp + r * h;
      float ss = 0.f;
      for (int64_t i = 0; i < h; ++i) {
        // The residual stream is stored in the model dtype, so round the sum to it first.
        const scalar_t s = static_cast<scalar_t>(static_cast<float>(rr[i]) + static_cast<float>(xr[i]));
        rr[i] = s;
        buf[i] = static_cast<float>(s);
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < h; ++i) ss += buf[i] * buf[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
      for (int64_t i = 0; i < h; ++i) {
        const scalar_t normed = static_cast<scalar_t>(buf[i] * inv);
        xr[i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * static_cast<float>(normed));
      }
    }
  });
}

void fused_add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == residual.sizes(), "x and residual must be [T, H]");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "x, residual and weight must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be [H]");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "x, residual and weight must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm",
                                  [&] { add_rms_norm_impl<scalar_t>(x, residual, weight, eps); });
}

template <typename scalar_t>
void rotary_cache_impl(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                       const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slots, int64_t hq, int64_t hkv) {
  const int64_t t = qkv.size(0), d = qkv.size(2), half = d / 2;
  const int64_t row_stride = qkv.stride(0);
  scalar_t* base = qkv.data_ptr<scalar_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const scalar_t* cp = cos.data_ptr<scalar_t>();
  const scalar_t* sp = sin.data_ptr<scalar_t>();
  scalar_t* kc = k_cache.data_ptr<scalar_t>();
  scalar_t* vc = v_cache.data_ptr<scalar_t>();
  const int64_t slot_stride = hkv * d;
  at::parallel_for(0, t, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(d);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* c = cp + pos[r] * d;
      const scalar_t* s = sp + pos[r] * d;  // [-sin_lo, sin_hi]: x*cos + roll(x, half)*s
      scalar_t* row = base + r * row_stride;
      for (int64_t hd = 0; hd < hq + hkv; ++hd) {
        scalar_t* x = row + hd * d;
        for (int64_t i = 0; i < d; ++i) {
          const int64_t j = i < half ? i + half : i - half;
          // Two roundings, as the composite x * cos + roll(x) * sin does in the model dtype.
          const scalar_t a = static_cast<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(c[i]));
          const scalar_t b = static_cast<scalar_t>(static_cast<float>(x[j]) * static_cast<float>(s[i]));
          tmp[i] = static_cast<float>(static_cast<scalar_t>(static_cast<float>(a) + static_cast<float>(b)));
        }
        for (int64_t i = 0; i < d; ++i) x[i] = static_cast<scalar_t>(tmp[i]);
      }
      scalar_t* kd = kc + slot[r] * slot_stride;
      scalar_t* vd = vc + slot[r] * slot_stride;
      const scalar_t* ks = row + hq * d;
      const scalar_t* vs = row + (hq + hkv) * d;
      std::copy(ks, ks + hkv * d, kd);
      std::copy(vs, vs + hkv * d, vd);
    }
  });
}

void rotary_embedding_and_cache(at::Tensor qkv, const at::Tensor& positions, const at::Tensor& cos,
                                const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                const at::Tensor& slots, int64_t hq, int64_t hkv) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == hq + 2 * hkv, "qkv must be [T, Hq + 2 Hkv, D]");
  TORCH_CHECK(qkv.stride(2) == 1 && qkv.stride(1) == qkv.size(2), "qkv rows must be dense");
  TORCH_CHECK(qkv.size(2) % 2 == 0, "head dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.size(1) == qkv.size(2) && cos.sizes() == sin.sizes(),
              "cos/sin must be contiguous [max_position, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.size(2) == hkv && k_cache.size(3) == qkv.size(2),
              "caches must be contiguous [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slots.is_contiguous() &&
                  positions.numel() == qkv.size(0) && slots.numel() == qkv.size(0),
              "positions and slots must be contiguous int64 [T]");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == k_cache.scalar_type(),
              "qkv, cos/sin and the cache must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                  "rotary_embedding_and_cache", [&] {
                                    rotary_cache_impl<scalar_t>(qkv, positions, cos, sin, k_cache,
                                                                v_cache, slots, hq, hkv);
                                  });
}

template <typename scalar_t>
void silu_and_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t t = out.size(0), n = out.size(1);
  const scalar_t* in = gate_up.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, t, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> act(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = in + r * 2 * n;
      const scalar_t* u = g + n;
      scalar_t* orow = o + r * n;
      for (int64_t i = 0; i < n; ++i) act[i] = static_cast<float>(g[i]);
      rayfleet_vec::silu_inplace(act.data(), n);
      // silu is rounded to the dtype before the product, as the composite does.
      for (int64_t i = 0; i < n; ++i)
        orow[i] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(act[i])) *
                                        static_cast<float>(u[i]));
    }
  });
}

void silu_and_mul(const at::Tensor& gate_up, at::Tensor out) {
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(0) == out.size(0) &&
                  gate_up.size(1) == 2 * out.size(1),
              "gate_up must be [T, 2 I] and out [T, I]");
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous(), "gate_up and out must be contiguous");
  TORCH_CHECK(gate_up.scalar_type() == out.scalar_type(), "gate_up and out must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "silu_and_mul",
                                  [&] { silu_and_mul_impl<scalar_t>(gate_up, out); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rayfleet_cpu, m) {
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def(
      "rotary_embedding_and_cache(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, int hq, int hkv) -> ()");
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(rayfleet_cpu, CPU, m) {
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding_and_cache", &rotary_embedding_and_cache);
  m.impl("silu_and_mul", &silu_and_mul);
}
