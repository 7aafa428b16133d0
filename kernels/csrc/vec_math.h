// Small float32 vector helpers shared by the CPU kernels, on ATen's `Vectorized<float>`.
//
// Why: the loops these replace were scalar where it hurt most. `std::exp` is not vectorised
// by the compiler (errno semantics), so a softmax over a few hundred scores per head, or a
// SiLU over a [64, 1536] activation, ran at ~15 ns per element. `exp_u20` is ATen's inline
// polynomial exp (within 2 ulp, no Sleef call), the one its own CPU flash attention uses.
//
// cpu_kernels.py defines CPU_CAPABILITY_AVX512 or _AVX2 from the machine's flags, so
// `Vectorized<float>` is 16 or 8 lanes; with neither it is ATen's portable fallback.
#pragma once

#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>

namespace rayfleet_vec {

using Vec = at::vec::Vectorized<float>;

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float tail = 0.f;
  if (n >= Vec::size()) {
    Vec acc = Vec::loadu(a) * Vec::loadu(b);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size())
      acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
    tail = acc.reduce_add();
  }
  for (; i < n; ++i) tail += a[i] * b[i];
  return tail;
}

// The lane sums of Vec::size() vectors, as one vector: out[j] = sum of v[j]'s lanes. Why: a
// dot product of a 64-wide head ends in a horizontal add, which costs more than its four
// FMAs; summing 16 (AVX-512) or 8 (AVX2) of them at once by a transpose-and-add tree costs
// ~3 shuffles and adds per vector instead of ~8, and the scores leave in one store.
inline Vec reduce_lanes(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sums of 4 vectors
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1))));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i) {
    const __m256 a = v[2 * i], b = v[2 * i + 1];
    t[i] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 2; ++i)
    u[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return Vec(_mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                           _mm256_permute2f128_ps(u[0], u[1], 0x31)));
#else
  float out[Vec::size()];
  for (int j = 0; j < Vec::size(); ++j) out[j] = v[j].reduce_add();
  return Vec::loadu(out);
#endif
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

// x = softmax(x), exact (max subtracted).
inline void softmax_inplace(float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vmx = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size())
      vmx = at::vec::maximum(vmx, Vec::loadu(x + i));
    mx = vmx.reduce_max();
  }
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  const Vec vm(mx);
  Vec vsum(0.f);
  for (i = 0; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(x + i) - vm).exp_u20();
    e.store(x + i);
    vsum = vsum + e;
  }
  float sum = vsum.reduce_add();
  if (i < n) {
    const int64_t rest = n - i;
    (Vec::loadu(x + i, rest) - vm).exp_u20().store(x + i, rest);
    for (int64_t j = i; j < n; ++j) sum += x[j];
  }
  const Vec inv(1.f / sum);
  for (i = 0; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * inv).store(x + i);
  for (; i < n; ++i) x[i] *= 1.f / sum;
}

// x = x * sigmoid(x) = x / (1 + exp(-x))
inline void silu_inplace(float* x, int64_t n) {
  const Vec one(1.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    (v / (one + v.neg().exp_u20())).store(x + i);
  }
  if (i < n) {
    const int64_t rest = n - i;
    const Vec v = Vec::loadu(x + i, rest);
    (v / (one + v.neg().exp_u20())).store(x + i, rest);
  }
}

}  // namespace rayfleet_vec
