// Layer norm's input gradient (ops/layer_norm.rs), one block a row, in f32:
// rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w, xhat = (x - mean(x)) * rstd,
// rstd = 1 / sqrt(var(x) + eps) recomputed from x. The row (x, g: 2 x 9 KB at Falcon-7B's
// width) is read once from memory and again from the caches in the later passes. The op-by-op
// form it replaces ran ~15 graph-free ops over [tokens, hidden] f32 temporaries: 97 ms of a
// 0.51 s training step at 8 x 512 on an H100 (2026-12-06).
#define LN_BWD(NAME, LOAD, STORE)                                                              \
extern "C" __global__ void NAME(const u16* x, const u16* g, const float* w, u16* out, int n,   \
    float eps) {                                                                              \
  __shared__ float red[32];                                                                    \
  const u16* xr = x + (long long)blockIdx.x * n;                                               \
  const u16* gr = g + (long long)blockIdx.x * n;                                               \
  u16* orow = out + (long long)blockIdx.x * n;                                                 \
  float s = 0.f;                                                                               \
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += LOAD(xr[i]);                          \
  float mean = block_reduce(s, red, 0) / (float)n;                                             \
  float v = 0.f;                                                                               \
  for (int i = threadIdx.x; i < n; i += blockDim.x) {                                          \
    float d = LOAD(xr[i]) - mean;                                                              \
    v += d * d;                                                                                \
  }                                                                                           \
  float rstd = 1.0f / sqrtf(block_reduce(v, red, 0) / (float)n + eps);                         \
  float a = 0.f, b = 0.f;                                                                      \
  for (int i = threadIdx.x; i < n; i += blockDim.x) {                                          \
    float gw = LOAD(gr[i]) * w[i];                                                             \
    a += gw;                                                                                   \
    b += gw * ((LOAD(xr[i]) - mean) * rstd);                                                   \
  }                                                                                           \
  float m1 = block_reduce(a, red, 0) / (float)n;                                               \
  float m2 = block_reduce(b, red, 0) / (float)n;                                               \
  for (int i = threadIdx.x; i < n; i += blockDim.x) {                                          \
    float gw = LOAD(gr[i]) * w[i];                                                             \
    float xh = (LOAD(xr[i]) - mean) * rstd;                                                    \
    orow[i] = STORE((gw - m1 - xh * m2) * rstd);                                               \
  }                                                                                           \
}
LN_BWD(layer_norm_bwd_bf16, bf16_to_f32, f32_to_bf16)
LN_BWD(layer_norm_bwd_f16, f16_to_f32, f32_to_f16)

// The same gradient with the row held in registers: each thread loads its 8-element chunks of
// x and g once as 16-byte words (w as f32 pairs of float4), and every later pass reads
// registers; mean and variance come from the held values, and the two means of the last pass
// share one reduction's barriers. The kernel above issues a 2-byte load per element and pass
// and five reductions, and ran at ~1/6 of the bandwidth (7.2 ms of a 0.29 s H100 step for 32
// rows of 4,544; 2026-12-07). Rows of n % 8 == 0, 16-byte aligned, up to LNV_THREADS * 8 *
// LNV_CHUNKS elements (layer_norm.rs checks; other rows take the kernel above).
#define LNV_THREADS 256
#define LNV_CHUNKS 4
// A row's mean and (biased) variance from the values a block holds in registers (xv, this
// thread's chunks) and the thread's partial sum s: the variance from the held values in a second
// pass. Both vector kernels take their statistics here; each keeps its own reciprocal square
// root (the backward 1 / sqrtf, the forward rsqrtf, as measured).
__device__ __forceinline__ void row_moments(const float (&xv)[LNV_CHUNKS][8], float s, float* red,
    int n, int chunks, float* mean, float* var) {
  float m = block_reduce(s, red, 0) / (float)n;
  float v = 0.f;
  _Pragma("unroll") for (int c = 0; c < LNV_CHUNKS; ++c) {
    if (threadIdx.x + c * LNV_THREADS < chunks) {
      _Pragma("unroll") for (int i = 0; i < 8; ++i) {
        float d = xv[c][i] - m;
        v += d * d;
      }
    }
  }
  *mean = m;
  *var = block_reduce(v, red, 0) / (float)n;
}
template <bool BF16>
__device__ __forceinline__ void layer_norm_bwd_vec(const u16* x, const u16* g, const float* w,
    u16* out, int n, float eps) {
  __shared__ float red[32];
  __shared__ float red2[32];
  int chunks = n >> 3;
  long long row = (long long)blockIdx.x * n;
  float xv[LNV_CHUNKS][8], gv[LNV_CHUNKS][8];
  float s = 0.f;
  _Pragma("unroll") for (int c = 0; c < LNV_CHUNKS; ++c) {
    int idx = threadIdx.x + c * LNV_THREADS;
    if (idx < chunks) {
      uint4 xw = __ldg((const uint4*)(x + row) + idx), gw = __ldg((const uint4*)(g + row) + idx);
      const u16 *xs = (const u16*)&xw, *gs = (const u16*)&gw;
      float4 w0 = __ldg((const float4*)w + 2 * idx), w1 = __ldg((const float4*)w + 2 * idx + 1);
      float ws[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
      _Pragma("unroll") for (int i = 0; i < 8; ++i) {
        xv[c][i] = load16<BF16>(xs[i]);
        gv[c][i] = load16<BF16>(gs[i]) * ws[i];
        s += xv[c][i];
      }
    }
  }
  float mean, var;
  row_moments(xv, s, red, n, chunks, &mean, &var);
  float rstd = 1.0f / sqrtf(var + eps);
  float a = 0.f, b = 0.f;
  _Pragma("unroll") for (int c = 0; c < LNV_CHUNKS; ++c) {
    if (threadIdx.x + c * LNV_THREADS < chunks) {
      _Pragma("unroll") for (int i = 0; i < 8; ++i) {
        xv[c][i] = (xv[c][i] - mean) * rstd;
        a += gv[c][i];
        b += gv[c][i] * xv[c][i];
      }
    }
  }
  // Two sums through one set of barriers: warp sums, then warp 0 over the warps' partials.
  a = warp_sum(a);
  b = warp_sum(b);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // every thread has read the last reduction's red[0]
  if (lane == 0) {
    red[warp] = a;
    red2[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < LNV_THREADS / 32 ? red[lane] : 0.f;
    b = lane < LNV_THREADS / 32 ? red2[lane] : 0.f;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      red[0] = a;
      red2[0] = b;
    }
  }
  __syncthreads();
  float m1 = red[0] / (float)n, m2 = red2[0] / (float)n;
  _Pragma("unroll") for (int c = 0; c < LNV_CHUNKS; ++c) {
    int idx = threadIdx.x + c * LNV_THREADS;
    if (idx < chunks) {
      uint4 ow;
      u16* os = (u16*)&ow;
      _Pragma("unroll") for (int i = 0; i < 8; ++i)
        os[i] = round16<BF16>((gv[c][i] - m1 - xv[c][i] * m2) * rstd);
      *((uint4*)(out + row) + idx) = ow;
    }
  }
}
extern "C" __global__ void __launch_bounds__(LNV_THREADS) layer_norm_bwd_vec_bf16(const u16* x,
    const u16* g, const float* w, u16* out, int n, float eps) {
  layer_norm_bwd_vec<true>(x, g, w, out, n, eps);
}
extern "C" __global__ void __launch_bounds__(LNV_THREADS) layer_norm_bwd_vec_f16(const u16* x,
    const u16* g, const float* w, u16* out, int n, float eps) {
  layer_norm_bwd_vec<false>(x, g, w, out, n, eps);
}

// Layer norm's value, (x - mean) * rstd * w + b, rounded to the 16-bit type, with the row held in
// registers as the backward kernel above holds it: x, w and b read once as 16-byte words (w and b
// in x's type), the variance from the held values in a second pass (candle's kernel, which this
// replaces, read x twice with 2-byte loads and took E[x^2] - mean^2: ~90 us a call for 4,096 rows
// of 4,544 on an H100 by the synchronised profile, 2026-12-07). The same rows as that kernel.
template <bool BF16>
__device__ __forceinline__ void layer_norm_fwd_vec(const u16* x, const u16* w, const u16* b,
    u16* out, int n, float eps) {
  __shared__ float red[32];
  // Decoding's chain (ops/pdl.cu): no-ops where the module is not compiled for PDL.
  GRID_LAUNCH_DEPENDENTS();
  GRID_WAIT();
  int chunks = n >> 3;
  long long row = (long long)blockIdx.x * n;
  float xv[LNV_CHUNKS][8];
  float s = 0.f;
  _Pragma("unroll") for (int c = 0; c < LNV_CHUNKS; ++c) {
    int idx = threadIdx.x + c * LNV_THREADS;
    if (idx < chunks) {
      uint4 xw = __ldg((const uint4*)(x + row) + idx);
      unsigned int xs[4] = {xw.x, xw.y, xw.z, xw.w};
      _Pragma("unroll") for (int i = 0; i < 8; ++i) {
        xv[c][i] = load16<BF16>((u16)(xs[i >> 1] >> (16 * (i & 1))));
        s += xv[c][i];
      }
    }
  }
  float mean, var;
  row_moments(xv, s, red, n, chunks, &mean, &var);
  float rstd = rsqrtf(var + eps);
  _Pragma("unroll") for (int c = 0; c < LNV_CHUNKS; ++c) {
    int idx = threadIdx.x + c * LNV_THREADS;
    if (idx < chunks) {
      uint4 ww = __ldg((const uint4*)w + idx), bw = __ldg((const uint4*)b + idx);
      unsigned int ws[4] = {ww.x, ww.y, ww.z, ww.w}, bs[4] = {bw.x, bw.y, bw.z, bw.w}, os[4];
      _Pragma("unroll") for (int q = 0; q < 4; ++q) {
        unsigned int pair = 0u;
        _Pragma("unroll") for (int h = 0; h < 2; ++h) {
          int i = 2 * q + h;
          float wi = load16<BF16>((u16)(ws[q] >> (16 * h)));
          float bi = load16<BF16>((u16)(bs[q] >> (16 * h)));
          pair |= (unsigned int)round16<BF16>((xv[c][i] - mean) * rstd * wi + bi) << (16 * h);
        }
        os[q] = pair;
      }
      *((uint4*)(out + row) + idx) = make_uint4(os[0], os[1], os[2], os[3]);
    }
  }
}
extern "C" __global__ void __launch_bounds__(LNV_THREADS) layer_norm_fwd_vec_bf16(const u16* x,
    const u16* w, const u16* b, u16* out, int n, float eps) {
  layer_norm_fwd_vec<true>(x, w, b, out, n, eps);
}
extern "C" __global__ void __launch_bounds__(LNV_THREADS) layer_norm_fwd_vec_f16(const u16* x,
    const u16* w, const u16* b, u16* out, int n, float eps) {
  layer_norm_fwd_vec<false>(x, w, b, out, n, eps);
}
