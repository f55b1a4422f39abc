// An XLA FFI handler for a memory-bound pass of the train step on CPU, one pass over its
// arrays where XLA:CPU (jaxlib 0.10.2, no multi-output fusion) makes several:
//
//   gorilla_adamw_in_place: clipping + AdamW for one parameter, reading the gradient sums,
//     the parameter and its two moments once and writing the three back in place.
//
// The work is cut into chunks run on the calling thread and XLA's intra-op pool
// (parallel.h). Built by gorilla_jax/cpu_kernels/__init__.py, with attention.cc.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using gorilla::ParallelChunks;

// ---------------------------------------------------------------------------------- AdamW

// scalars: [grad_scale, clip_factor, b1, 1 - b1, b2, 1 - b2, eps, learning_rate, 1 - b1^t,
// 1 - b2^t] (1 - b as rounded from double, as optax computes it)
constexpr size_t kAdamWScalars = 10;

void AdamWRange(float* __restrict p, const float* __restrict g, float* __restrict m,
                float* __restrict v, int64_t n, const float* s, float wd) {
  const float grad_scale = s[0], clip = s[1], b1 = s[2], c1 = s[3], b2 = s[4], c2 = s[5];
  const float eps = s[6], lr = s[7], bc1 = s[8], bc2 = s[9];
  // the same operations, in the same order, as optax's clip + adamw + apply_updates
  for (int64_t i = 0; i < n; ++i) {
    const float gi = (g[i] * grad_scale) * clip;
    const float mi = c1 * gi + b1 * m[i];
    const float vi = c2 * (gi * gi) + b2 * v[i];
    m[i] = mi;
    v[i] = vi;
    const float u = (mi / bc1) / (__builtin_sqrtf(vi / bc2) + eps) + wd * p[i];
    p[i] = p[i] + (-lr) * u;
  }
}

constexpr int64_t kAdamWChunk = 1 << 15;  // elements: 128 KiB of each array

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> param,
                     ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::F32> mu,
                     ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> scalars, float weight_decay,
                     ffi::ResultBuffer<ffi::F32> param_out, ffi::ResultBuffer<ffi::F32> mu_out,
                     ffi::ResultBuffer<ffi::F32> nu_out) {
  const size_t n = param.element_count();
  if (grad.element_count() != n || mu.element_count() != n || nu.element_count() != n ||
      scalars.element_count() != kAdamWScalars)
    return ffi::Error::InvalidArgument(
        "gorilla_adamw_in_place: parameter, gradient and moments of one size, and 10 scalars");
  float* p = param_out->typed_data();
  float* m = mu_out->typed_data();
  float* v = nu_out->typed_data();
  // the outputs alias the inputs when XLA honours the aliasing; otherwise start from a copy
  if (p != param.typed_data()) std::memcpy(p, param.typed_data(), n * sizeof(float));
  if (m != mu.typed_data()) std::memcpy(m, mu.typed_data(), n * sizeof(float));
  if (v != nu.typed_data()) std::memcpy(v, nu.typed_data(), n * sizeof(float));
  const float* g = grad.typed_data();
  const float* s = scalars.typed_data();
  const int64_t count = static_cast<int64_t>(n);
  ParallelChunks(pool, (count + kAdamWChunk - 1) / kAdamWChunk, [=](int64_t c) {
    const int64_t lo = c * kAdamWChunk, len = std::min(count, lo + kAdamWChunk) - lo;
    AdamWRange(p + lo, g + lo, m + lo, v + lo, len, s, weight_decay);
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GorillaAdamWInPlace, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Attr<float>("weight_decay")
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
