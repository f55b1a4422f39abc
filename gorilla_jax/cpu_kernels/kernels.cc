// XLA FFI handlers for two memory-bound passes of the train step on CPU, each one pass over
// its arrays where XLA:CPU (jaxlib 0.10.2, no multi-output fusion) makes several:
//
//   gorilla_adamw_in_place: clipping + AdamW for one parameter, reading the gradient sums,
//     the parameter and its two moments once and writing the three back in place.
//   gorilla_exp_rows: the LM head's softmax numerators, row by row (a row of the logits stays
//     in cache between its max pass and its exp-and-sum pass), with the target entry
//     corrected as train/step.py's _exp_once_grads does.
//
// The work is cut into chunks that the calling thread and XLA's intra-op pool threads claim
// from a shared counter. The caller waits only for chunks another thread has already claimed
// (and so is running), never for a task still queued: no deadlock when every pool thread is
// itself inside such a call. Built by gorilla_jax/cpu_kernels/__init__.py.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(chunk) for chunk in [0, n) on the calling thread and up to pool.num_threads() - 1
// pool threads; returns when every chunk is done.
template <typename Body>
void ParallelChunks(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Shared {
    explicit Shared(Body b, int64_t n) : body(std::move(b)), n(n) {}
    Body body;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Run() {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        body(c);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  };
  auto shared = std::make_shared<Shared>(std::move(body), n);
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Run(); });
  shared->Run();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

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

// ------------------------------------------------------------------------ softmax numerators

// exp(x) for x <= 0 (x - row max): Cody-Waite reduction by ln 2 and a degree-6 polynomial,
// written so that the compiler vectorizes it; 0 below float32's normal range (XLA:CPU flushes
// subnormals to zero too).
inline float ExpNonPositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln 2)
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : q * scale;
}

constexpr int kLanes = 16;

// One row: u = exp(x - max) in place, its sum; the target entry gets s / zf taken off.
void ExpRow(float* __restrict x, int64_t cols, int32_t target, float z_loss, float* row_max,
            float* row_sum) {
  float lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = -INFINITY;
  const int64_t body = cols - cols % kLanes;
  for (int64_t j = 0; j < body; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lane[k] = x[j + k] > lane[k] ? x[j + k] : lane[k];
  float m = -INFINITY;
  for (int k = 0; k < kLanes; ++k) m = lane[k] > m ? lane[k] : m;
  for (int64_t j = body; j < cols; ++j) m = x[j] > m ? x[j] : m;
  // lane sums over at most 32 terms each, then accumulated in double: as accurate as XLA's
  // tree reduction (a row-long float sum per lane was 30x less accurate)
  constexpr int64_t kBlock = 32 * kLanes;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < body; j0 += kBlock) {
    const int64_t j1 = std::min(body, j0 + kBlock);
    for (int k = 0; k < kLanes; ++k) lane[k] = 0.0f;
    for (int64_t j = j0; j < j1; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const float e = ExpNonPositive(x[j + k] - m);
        x[j + k] = e;
        lane[k] += e;
      }
    for (int k = 0; k < kLanes; ++k) total += lane[k];
  }
  for (int64_t j = body; j < cols; ++j) {
    const float e = ExpNonPositive(x[j] - m);
    x[j] = e;
    total += e;
  }
  const float s = static_cast<float>(total);
  float zf = 1.0f + 2.0f * z_loss * (m + std::log(s));
  if (zf == 0.0f) zf = 1e-30f;
  if (target < 0) target += cols;                          // as jax's indexing: from the end
  if (target >= 0 && target < cols) x[target] -= s / zf;  // out of range: dropped, as a scatter
  *row_max = m;
  *row_sum = s;
}

constexpr int64_t kRowsPerChunk = 8;

ffi::Error ExpRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                       ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> after, float z_loss,
                       ffi::ResultBuffer<ffi::F32> u, ffi::ResultBuffer<ffi::F32> row_max,
                       ffi::ResultBuffer<ffi::F32> row_sum) {
  (void)after;  // an operand only so that whatever computes it runs first
  const auto dims = logits.dimensions();
  if (dims.size() != 2 || static_cast<int64_t>(targets.element_count()) != dims[0])
    return ffi::Error::InvalidArgument("gorilla_exp_rows: logits [T, V] and targets [T]");
  const int64_t rows = dims[0], cols = dims[1];
  float* out = u->typed_data();
  if (out != logits.typed_data())
    std::memcpy(out, logits.typed_data(), rows * cols * sizeof(float));
  const int32_t* t = targets.typed_data();
  float* mx = row_max->typed_data();
  float* sm = row_sum->typed_data();
  ParallelChunks(pool, (rows + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    for (int64_t r = c * kRowsPerChunk, end = std::min(rows, r + kRowsPerChunk); r < end; ++r)
      ExpRow(out + r * cols, cols, t[r], z_loss, mx + r, sm + r);
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using S32 = ffi::Buffer<ffi::S32>;

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(GorillaExpRows, ExpRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<S32>()
                                  .Arg<F32>()
                                  .Attr<float>("z_loss")
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
