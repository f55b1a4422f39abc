// Causal grouped-query attention for training on CPU, forward and backward, as XLA FFI
// handlers (called by gorilla_jax/cpu_kernels/attention.py):
//
//   gorilla_attention_fwd: q [B,S,H,Dh], k/v [B,S,KV,Dh], mask [Bm,S,S] (bool, Bm 1 or B),
//     cos/sin [B,S,Dh] -> out [B,S,H,Dh], lse [B,KV,S*G] (each query row's log-sum-exp of its
//     scaled scores)
//   gorilla_attention_bwd: q, k, v, mask, cos, sin, out, lse, d_out -> dq, dk, dv
//
// q and k come before the rotary embedding, which the kernels apply as they copy each row in
// (and its transpose to dq and dk on the way out): in XLA the rotations, their backward and
// the layout copies around them were separate passes over q and k.
//
// Query i attends key j <= i where mask[b, i, j] holds; a row with no such key is uniform over
// keys 0..i (its outputs are meaningless; no NaN). One work item per (batch row, kv head): its
// G query heads' rows are stacked, row r = s * G + g, so that all of them share one copy of the
// item's keys and values in cache. Rows are processed in blocks of kRowBlock, each against the
// keys up to its last position only (causal). The backward recomputes the probabilities from
// the saved log-sum-exp (no [S, S] residual) and accumulates dk and dv over the row blocks.
//
// The products are small (Dh-long contractions): register tiles of 4 rows x 32 (or 16)
// columns written with GCC vector extensions, which the compiler maps to the widest vectors of
// the target (-march=native). XLA:CPU ran these attention cores as many small batched products
// plus layout copies, slices and pads around them (docs/PERFORMANCE.md).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using gorilla::ParallelChunks;

typedef float V16 __attribute__((vector_size(64)));

inline V16 Load(const float* p) {
  V16 r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void Store(float* p, V16 x) { std::memcpy(p, &x, sizeof x); }

// C[r][0 : 16 NV] (+)= sum_k A[r * ars + k * aks] * B[k * ldb + (0 : 16 NV)] for r < R.
template <int R, int NV, bool kAccumulate>
inline void Tile(const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                 int64_t K, float* C, int64_t ldc) {
  V16 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = V16{};
  for (int64_t k = 0; k < K; ++k) {
    V16 b[NV];
    for (int n = 0; n < NV; ++n) {
      b[n] = Load(B + k * ldb + 16 * n);
#if defined(__AVX512F__)
      // keep b in a register: folded into each row's multiply-add as a memory operand, it was
      // loaded R times (4 x 32 tiles: 80 -> 90-105 GFLOP/s on one Zen 4 core). Only where a
      // 16-float vector is one register.
      asm("" : "+v"(b[n]));
#endif
    }
    for (int r = 0; r < R; ++r) {
      const float a = A[r * ars + k * aks];
      for (int n = 0; n < NV; ++n) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NV; ++n) {
      float* c = C + r * ldc + 16 * n;
      Store(c, kAccumulate ? Load(c) + acc[r][n] : acc[r][n]);
    }
}

// What a product of a causal row block may leave out (rows r0 + i of the item, G rows per
// position, M rows in all; row r attends keys 0 .. r / G):
//   kKeyColumns: N indexes keys; a 4-row tile skips the 32 (16) key columns after its last
//     position (left unwritten: the caller masks them)
//   kKeyContraction: K indexes keys; a 4-row tile stops after its last position
//   kRowContraction: M indexes keys, K the block's rows; a 4-key tile starts at the first row
//     that attends its first key (accumulating)
enum class Causal { kKeyColumns, kKeyContraction, kRowContraction };

struct Block {
  int64_t r0, G, M;
  int64_t Keys(int64_t i) const {  // keys needed by the 4-row tile at block row i
    return std::min(r0 + i + 3, M - 1) / G + 1;
  }
};

// C[M][N] (+)= A[M][K] B[K][N], A addressed as A[i * ars + k * aks]; M a multiple of 4, N of 16.
template <bool kAccumulate, Causal kCausal>
void Gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks,
          const float* B, int64_t ldb, float* C, int64_t ldc, Block blk) {
  auto tile = [&](auto width, int64_t j) {
    constexpr int NV = decltype(width)::value;
    for (int64_t i = 0; i < M; i += 4) {
      int64_t k0 = 0, k1 = K;
      if (kCausal == Causal::kKeyColumns && j >= blk.Keys(i)) continue;
      if (kCausal == Causal::kKeyContraction) k1 = std::min(K, blk.Keys(i));
      if (kCausal == Causal::kRowContraction) k0 = std::max<int64_t>(0, i * blk.G - blk.r0);
      if (k0 >= k1) continue;
      Tile<4, NV, kAccumulate>(A + i * ars + k0 * aks, ars, aks, B + k0 * ldb + j, ldb, k1 - k0,
                               C + i * ldc + j, ldc);
    }
  };
  int64_t j = 0;
  for (; j + 32 <= N; j += 32) tile(std::integral_constant<int, 2>{}, j);
  for (; j < N; j += 16) tile(std::integral_constant<int, 1>{}, j);
}

typedef int32_t V16i __attribute__((vector_size(64)));
typedef int8_t V16b __attribute__((vector_size(16)));

inline V16 Splat(float x) { return V16{} + x; }

// exp(x) for x <= ~0, 16 lanes: Cody-Waite reduction by ln 2 and a degree-6 polynomial; 0
// below float32's normal range (XLA:CPU flushes subnormals to zero too) and for -inf.
inline V16 Exp(V16 x) {
  const V16 xc = x < -87.0f ? Splat(-87.0f) : x;
  const V16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  V16 r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  V16 q = Splat(1.9875691500e-4f);
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  const V16i bits = (__builtin_convertvector(n, V16i) + 127) << 23;
  V16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? V16{} : q * scale;
}

inline float HorizontalMax(V16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float HorizontalSum(V16 x) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}

// A large finite negative for masked scores (as model/attention.py's _MASK_VALUE).
constexpr float kMaskValue = -0.7f * 3.4028234663852886e38f;
constexpr int64_t kRowBlock = 32;  // query rows per block (a multiple of 4)

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Dims {
  int64_t B, S, H, KV, Dh, G, M, Mp, Tp, Bm;
  const float *cos, *sin;  // [B, S, Dh]: the rotary embedding's angles per position
};

ffi::Error CheckDims(ffi::AnyBuffer::Dimensions q, ffi::AnyBuffer::Dimensions k,
                     ffi::AnyBuffer::Dimensions v, ffi::AnyBuffer::Dimensions mask,
                     const ffi::Buffer<ffi::F32>& cos, const ffi::Buffer<ffi::F32>& sin,
                     Dims* d) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || mask.size() != 3)
    return ffi::Error::InvalidArgument("gorilla_attention: q, k, v of rank 4 and a rank-3 mask");
  d->B = q[0], d->S = q[1], d->H = q[2], d->Dh = q[3], d->KV = k[2], d->Bm = mask[0];
  if (k[0] != d->B || k[1] != d->S || k[3] != d->Dh || v[0] != k[0] || v[1] != k[1] ||
      v[2] != k[2] || v[3] != k[3] || d->KV == 0 || d->H % d->KV != 0 || d->Dh % 16 != 0 ||
      d->Dh > 1024 || (d->Bm != 1 && d->Bm != d->B) || mask[1] != d->S || mask[2] != d->S)
    return ffi::Error::InvalidArgument(
        "gorilla_attention: q [B,S,H,Dh], k and v [B,S,KV,Dh] with KV dividing H, Dh a multiple "
        "of 16 up to 1024, mask [1 or B,S,S]");
  const auto c = cos.dimensions(), sn = sin.dimensions();
  if (c.size() != 3 || sn.size() != 3 || c[0] != d->B || c[1] != d->S || c[2] != d->Dh ||
      sn[0] != d->B || sn[1] != d->S || sn[2] != d->Dh)
    return ffi::Error::InvalidArgument("gorilla_attention: cos and sin [B,S,Dh]");
  d->cos = cos.typed_data();
  d->sin = sin.typed_data();
  d->G = d->H / d->KV;
  d->M = d->S * d->G;
  d->Mp = RoundUp(d->M, kRowBlock);
  d->Tp = RoundUp(d->S, 32);
  return ffi::Error::Success();
}

// Per-thread scratch, grown as needed and kept between calls.
struct Scratch {
  std::vector<float> q, dout, kt, kn, vt, vn, p, ds, o, dk, dv, delta, inv_sum;
  std::vector<int8_t> masks;
  static Scratch& Get() {
    thread_local Scratch s;
    return s;
  }
};

template <typename T>
inline T* Sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// The rotary embedding of one head vector at (b, s), "rotate half" convention (HF's LLaMA):
// y = x cos + (-x[half:], x[:half]) sin. ``inverse``: its transpose, for a gradient:
// dx = dy cos + (dy[half:] sin[half:], -dy[:half] sin[:half]).
inline void Rotate(const Dims& d, int64_t b, int64_t s, const float* x, float* y, bool inverse) {
  const float* c = d.cos + (b * d.S + s) * d.Dh;
  const float* sn = d.sin + (b * d.S + s) * d.Dh;
  const int64_t h = d.Dh / 2;
  if (!inverse) {
    for (int64_t e = 0; e < h; ++e) y[e] = x[e] * c[e] + (-x[e + h]) * sn[e];
    for (int64_t e = h; e < d.Dh; ++e) y[e] = x[e] * c[e] + x[e - h] * sn[e];
  } else {
    for (int64_t e = 0; e < h; ++e) y[e] = x[e] * c[e] + x[e + h] * sn[e + h];
    for (int64_t e = h; e < d.Dh; ++e) y[e] = x[e] * c[e] - x[e - h] * sn[e - h];
  }
}

// The item's rows of a [B,S,H,Dh] array gathered as [Mp][Dh] (zero rows after M), rotated
// with ``rotate``.
void GatherRows(const float* x, const Dims& d, int64_t b, int64_t n, float* rows, bool rotate) {
  for (int64_t s = 0; s < d.S; ++s) {
    const float* src = x + ((b * d.S + s) * d.H + n * d.G) * d.Dh;
    float* dst = rows + s * d.G * d.Dh;
    if (!rotate)
      std::memcpy(dst, src, d.G * d.Dh * sizeof(float));
    else
      for (int64_t g = 0; g < d.G; ++g) Rotate(d, b, s, src + g * d.Dh, dst + g * d.Dh, false);
  }
  std::memset(rows + d.M * d.Dh, 0, (d.Mp - d.M) * d.Dh * sizeof(float));
}

// Rows [first, first + count) of [Mp][Dh] written to the item's rows of a [B,S,H,Dh] array,
// through the inverse rotation with ``rotate``.
void ScatterRows(const float* rows, const Dims& d, int64_t b, int64_t n, int64_t first,
                 int64_t count, float* x, bool rotate) {
  for (int64_t r = first; r < std::min(first + count, d.M); ++r) {
    float* dst = x + ((b * d.S + r / d.G) * d.H + n * d.G + r % d.G) * d.Dh;
    if (rotate)
      Rotate(d, b, r / d.G, rows + (r - first) * d.Dh, dst, true);
    else
      std::memcpy(dst, rows + (r - first) * d.Dh, d.Dh * sizeof(float));
  }
}

// The item's keys (or values) of a [B,S,KV,Dh] array as [Tp][Dh] and transposed as [Dh][Tp],
// zero after S, rotated with ``rotate``.
void GatherKeys(const float* x, const Dims& d, int64_t b, int64_t n, float* natural,
                float* transposed, bool rotate) {
  float rotated[1024];  // Dh <= 1024 (checked)
  for (int64_t t = 0; t < d.S; ++t) {
    const float* src = x + ((b * d.S + t) * d.KV + n) * d.Dh;
    if (rotate) {
      Rotate(d, b, t, src, rotated, false);
      src = rotated;
    }
    if (natural) std::memcpy(natural + t * d.Dh, src, d.Dh * sizeof(float));
    if (transposed)
      for (int64_t e = 0; e < d.Dh; ++e) transposed[e * d.Tp + t] = src[e];
  }
  if (natural) std::memset(natural + d.S * d.Dh, 0, (d.Tp - d.S) * d.Dh * sizeof(float));
  if (transposed)
    for (int64_t e = 0; e < d.Dh; ++e)
      std::memset(transposed + e * d.Tp + d.S, 0, (d.Tp - d.S) * sizeof(float));
}

// Keys row block [r0, r0 + kRowBlock) looks at: 0 .. its last position, in whole 32-key tiles.
inline int64_t BlockKeys(const Dims& d, int64_t r0) {
  const int64_t last = std::min(d.M, r0 + kRowBlock) - 1;
  return std::min(d.Tp, RoundUp(last / d.G + 1, 32));
}

// Lanes j0 .. j0 + 15 of a row: which keys may be attended (j <= s and the mask holds) and
// which are before the causal limit at all.
struct Lanes {
  V16i valid, causal;
};

inline Lanes RowLanes(const int8_t* mask_row, int64_t j0, int64_t limit) {
  V16i j = V16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + static_cast<int32_t>(j0);
  V16b m;
  std::memcpy(&m, mask_row + j0, sizeof m);
  const V16i causal = j < static_cast<int32_t>(limit);
  return {causal & (__builtin_convertvector(m, V16i) != 0), causal};
}

// How far row r0 + i's probabilities are written: the keys its 4-row tile's products read
// (Causal), in whole 16 lanes; zero from the row's own limit on.
inline int64_t RowEnd(const Dims& d, int64_t r0, int64_t i) {
  return RoundUp(Block{r0, d.G, d.M}.Keys(i & ~int64_t{3}), 16);
}

// The forward's softmax over the block's rows of scores, in place: exp(scaled, masked score -
// row max), with each row's 1 / sum in ``inv_sum`` (applied to the output rows instead of the
// probabilities) and log-sum-exp in ``lse``. ``masks``: each row's mask (kRowBlock rows of Tp
// bytes, zero after the row's own position). Only the keys up to RowEnd are computed.
void SoftmaxRows(const Dims& d, const int8_t* masks, int64_t r0, float scale, float* p,
                 float* inv_sum, float* lse) {
  const V16 minus_inf = Splat(-INFINITY);
  for (int64_t i = 0; i < kRowBlock && r0 + i < d.M; ++i) {
    float* row = p + i * d.Tp;
    const int64_t r = r0 + i, limit = r / d.G + 1, end = RowEnd(d, r0, i);
    const int8_t* m = masks + i * d.Tp;
    V16 vmax = minus_inf;
    for (int64_t j = 0; j < end; j += 16) {
      const Lanes l = RowLanes(m, j, limit);
      // masked keys get the mask value (as in model/attention.py), later keys -inf (exp 0)
      const V16 x = l.valid ? Load(row + j) * scale : (l.causal ? Splat(kMaskValue) : minus_inf);
      Store(row + j, x);
      vmax = x > vmax ? x : vmax;
    }
    const float mx = HorizontalMax(vmax);
    const V16 shift = Splat(mx);
    V16 vsum{};
    for (int64_t j = 0; j < end; j += 16) {
      const V16 e = Exp(Load(row + j) - shift);
      Store(row + j, e);
      vsum += e;
    }
    const float sum = HorizontalSum(vsum);  // >= 1: the maximum's own term
    inv_sum[i] = 1.0f / sum;
    lse[r] = mx + std::log(sum);  // a row with no key: rounds to the mask value
  }
}

// The backward's pass over a block's rows: the probabilities recomputed from the scores and
// the saved log-sum-exp (into ``p``), and the scores' gradient from the probabilities'
// gradient (``ds``, in place): p * (dp - delta) * scale where the key was attended, 0 where
// masked (the mask value is a constant). A row with no key is uniform over keys 0 .. its
// position, as in the forward.
void BackwardRows(const Dims& d, const int8_t* masks, int64_t r0, float scale, const float* lse,
                  const float* delta, float* p, float* ds) {
  for (int64_t i = 0; i < kRowBlock && r0 + i < d.M; ++i) {
    float *prow = p + i * d.Tp, *drow = ds + i * d.Tp;
    const int64_t r = r0 + i, limit = r / d.G + 1, end = RowEnd(d, r0, i);
    const int8_t* m = masks + i * d.Tp;
    const bool empty = lse[r] == kMaskValue;
    const V16 shift = Splat(lse[r]), dr = Splat(delta[r]);
    const V16 uniform = Splat(1.0f / static_cast<float>(limit));
    for (int64_t j = 0; j < end; j += 16) {
      const Lanes l = RowLanes(m, j, limit);
      const V16 pr = empty ? (l.causal ? uniform : V16{})
                           : (l.valid ? Exp(Load(prow + j) * scale - shift) : V16{});
      Store(prow + j, pr);
      Store(drow + j, l.valid ? pr * (Load(drow + j) - dr) * scale : V16{});
    }
  }
}

// Zero probabilities and gradients for the padding rows of the last block.
void ZeroPaddingRows(const Dims& d, int64_t r0, int64_t nk, float* a, float* b) {
  for (int64_t i = std::max<int64_t>(0, d.M - r0); i < kRowBlock; ++i) {
    std::memset(a + i * d.Tp, 0, nk * sizeof(float));
    if (b) std::memset(b + i * d.Tp, 0, nk * sizeof(float));
  }
}

// Each row of the block's mask (kRowBlock rows of Tp bytes): mask[s, 0 .. s], zeros after.
void BlockMasks(const Dims& d, const bool* mask_b, int64_t r0, int8_t* masks) {
  for (int64_t i = 0; i < kRowBlock; ++i) {
    int8_t* row = masks + i * d.Tp;
    const int64_t r = r0 + i;
    const int64_t limit = r < d.M ? r / d.G + 1 : 0;
    if (limit) std::memcpy(row, mask_b + (r / d.G) * d.S, limit);  // bool: one byte, 0 or 1
    std::memset(row + limit, 0, d.Tp - limit);
  }
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos,
                            ffi::Buffer<ffi::F32> sin, float scale,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto err = CheckDims(q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(),
                           cos, sin, &d);
      !err.success())
    return err;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelChunks(pool, d.B * d.KV, [=](int64_t item) {
    const int64_t b = item / d.KV, n = item % d.KV;
    Scratch& sc = Scratch::Get();
    float* Q = Sized(sc.q, d.Mp * d.Dh);
    float* KT = Sized(sc.kt, d.Dh * d.Tp);
    float* Vn = Sized(sc.vn, d.Tp * d.Dh);
    float* P = Sized(sc.p, kRowBlock * d.Tp);
    float* O = Sized(sc.o, kRowBlock * d.Dh);
    float* inv_sum = Sized(sc.inv_sum, kRowBlock);
    int8_t* masks = Sized(sc.masks, kRowBlock * d.Tp);
    GatherRows(qp, d, b, n, Q, true);
    GatherKeys(kp, d, b, n, nullptr, KT, true);
    GatherKeys(vp, d, b, n, Vn, nullptr, false);
    const bool* mask_b = mp + (d.Bm == 1 ? 0 : b) * d.S * d.S;
    float* lse_item = lp + item * d.M;
    for (int64_t r0 = 0; r0 < d.M; r0 += kRowBlock) {
      const int64_t nk = BlockKeys(d, r0);
      const Block blk{r0, d.G, d.M};
      Gemm<false, Causal::kKeyColumns>(kRowBlock, nk, d.Dh, Q + r0 * d.Dh, d.Dh, 1, KT, d.Tp, P,
                                       d.Tp, blk);
      BlockMasks(d, mask_b, r0, masks);
      SoftmaxRows(d, masks, r0, scale, P, inv_sum, lse_item);
      ZeroPaddingRows(d, r0, nk, P, nullptr);
      Gemm<false, Causal::kKeyContraction>(kRowBlock, d.Dh, nk, P, d.Tp, 1, Vn, d.Dh, O, d.Dh,
                                           blk);
      for (int64_t i = 0; i < kRowBlock && r0 + i < d.M; ++i)
        for (int64_t e = 0; e < d.Dh; e += 16)
          Store(O + i * d.Dh + e, Load(O + i * d.Dh + e) * inv_sum[i]);
      ScatterRows(O, d, b, n, r0, kRowBlock, op, false);
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> cos,
                            ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> out,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out, float scale,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto err = CheckDims(q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(),
                           cos, sin, &d);
      !err.success())
    return err;
  if (out.element_count() != q.element_count() || d_out.element_count() != q.element_count() ||
      lse.element_count() != static_cast<size_t>(d.B * d.KV * d.M))
    return ffi::Error::InvalidArgument(
        "gorilla_attention_bwd: out and d_out like q, lse [B,KV,S*G]");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *outp = out.typed_data(), *lp = lse.typed_data(), *dop = d_out.typed_data();
  const bool* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelChunks(pool, d.B * d.KV, [=](int64_t item) {
    const int64_t b = item / d.KV, n = item % d.KV;
    Scratch& sc = Scratch::Get();
    float* Q = Sized(sc.q, d.Mp * d.Dh);
    float* dO = Sized(sc.dout, d.Mp * d.Dh);
    float* Ob = Sized(sc.o, d.Mp * d.Dh);
    float* KT = Sized(sc.kt, d.Dh * d.Tp);
    float* Kn = Sized(sc.kn, d.Tp * d.Dh);
    float* VT = Sized(sc.vt, d.Dh * d.Tp);
    float* P = Sized(sc.p, kRowBlock * d.Tp);
    float* dS = Sized(sc.ds, kRowBlock * d.Tp);
    float* dK = Sized(sc.dk, d.Tp * d.Dh);
    float* dV = Sized(sc.dv, d.Tp * d.Dh);
    float* delta = Sized(sc.delta, d.Mp);
    int8_t* masks = Sized(sc.masks, kRowBlock * d.Tp);
    GatherRows(qp, d, b, n, Q, true);
    GatherRows(dop, d, b, n, dO, false);
    GatherRows(outp, d, b, n, Ob, false);
    GatherKeys(kp, d, b, n, Kn, KT, true);
    GatherKeys(vp, d, b, n, nullptr, VT, false);
    std::memset(dK, 0, d.Tp * d.Dh * sizeof(float));
    std::memset(dV, 0, d.Tp * d.Dh * sizeof(float));
    for (int64_t r = 0; r < d.Mp; ++r) {  // delta_r = d_out_r . out_r
      V16 acc{};
      for (int64_t e = 0; e < d.Dh; e += 16)
        acc += Load(dO + r * d.Dh + e) * Load(Ob + r * d.Dh + e);
      delta[r] = HorizontalSum(acc);
    }
    const bool* mask_b = mp + (d.Bm == 1 ? 0 : b) * d.S * d.S;
    const float* lse_item = lp + item * d.M;
    float* dQ = Ob;  // the block's dq rows ([kRowBlock][Dh]; out is no longer needed)
    for (int64_t r0 = 0; r0 < d.M; r0 += kRowBlock) {
      const int64_t nk = BlockKeys(d, r0);
      const float* Qb = Q + r0 * d.Dh;
      const float* dOb = dO + r0 * d.Dh;
      const Block blk{r0, d.G, d.M};
      Gemm<false, Causal::kKeyColumns>(kRowBlock, nk, d.Dh, Qb, d.Dh, 1, KT, d.Tp, P, d.Tp, blk);
      Gemm<false, Causal::kKeyColumns>(kRowBlock, nk, d.Dh, dOb, d.Dh, 1, VT, d.Tp, dS, d.Tp,
                                       blk);  // the probabilities' gradient
      BlockMasks(d, mask_b, r0, masks);
      BackwardRows(d, masks, r0, scale, lse_item, delta, P, dS);
      ZeroPaddingRows(d, r0, nk, P, dS);
      Gemm<false, Causal::kKeyContraction>(kRowBlock, d.Dh, nk, dS, d.Tp, 1, Kn, d.Dh, dQ, d.Dh,
                                           blk);
      ScatterRows(dQ, d, b, n, r0, kRowBlock, dqp, true);
      Gemm<true, Causal::kRowContraction>(nk, d.Dh, kRowBlock, P, 1, d.Tp, dOb, d.Dh, dV, d.Dh,
                                          blk);
      Gemm<true, Causal::kRowContraction>(nk, d.Dh, kRowBlock, dS, 1, d.Tp, Qb, d.Dh, dK, d.Dh,
                                          blk);
    }
    for (int64_t t = 0; t < d.S; ++t) {
      Rotate(d, b, t, dK + t * d.Dh, dkp + ((b * d.S + t) * d.KV + n) * d.Dh, true);
      std::memcpy(dvp + ((b * d.S + t) * d.KV + n) * d.Dh, dV + t * d.Dh, d.Dh * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GorillaAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Attr<float>("scale")
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GorillaAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Attr<float>("scale")
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
