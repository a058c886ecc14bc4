//! Kernels for CUDA, compiled once per process with NVRTC (no nvcc step in the build, and the
//! CPU build does not see them): NF4 dequantization and decoding GEMV, and seeded dropout.
//!
//! - `dequantize`: 4-bit codes and (double-quantized) absmax to a 16- or 32-bit weight in one
//!   pass, every step in f32 with the operations bitsandbytes does, then one rounding: the same
//!   bits as the CPU path. The tensor-op version it replaces moved ~20 bytes per weight through
//!   five kernels; this one reads half a byte and writes two.
//! - `gemv`: `y = x W^T` straight from the 4-bit data for up to [`GEMV_MAX_ROWS`] rows of `x`
//!   (decoding), so a token reads half a byte per weight instead of dequantizing the weight.
//!
//! The `__fmul_rn`/`__fadd_rn` intrinsics keep NVRTC from fusing a multiply and an add into an
//! FMA, which would round differently from bitsandbytes and from the CPU path.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Error, Result, Storage, Tensor};

/// Rows of `x` one GEMV launch handles; more rows go through dequantize + cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

const MODULE: &str = "adapterlab_nf4";

/// The 4-bit data of one weight on the GPU, as `linear::DeviceNf4` holds it.
pub struct Nf4Gpu<'a> {
    /// `[bytes]` u8, two codes a byte, high nibble first.
    pub codes: &'a Tensor,
    pub absmax: AbsmaxGpu<'a>,
    /// Elements of the weight.
    pub n: usize,
    /// Elements per absmax block (64).
    pub blocksize: usize,
}

pub enum AbsmaxGpu<'a> {
    /// One f32 per block.
    Plain(&'a Tensor),
    /// Double quantization: `code[q[i]] * absmax[i / blocksize] + offset`.
    Nested {
        q: &'a Tensor,
        code: &'a Tensor,
        absmax: &'a Tensor,
        offset: f32,
        blocksize: usize,
    },
}

fn source() -> String {
    let table: Vec<String> = crate::nf4::NF4_CODE
        .iter()
        .map(|v| format!("{v:?}f"))
        .collect();
    format!(
        r#"
typedef unsigned char u8;
typedef unsigned short u16;
#define GEMV_MAX_ROWS {max_rows}

__constant__ float NF4[16] = {{ {table} }};

__device__ __forceinline__ float bf16_to_f32(u16 h) {{ return __uint_as_float(((unsigned int)h) << 16); }}
__device__ __forceinline__ u16 f32_to_bf16(float f) {{
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}}
__device__ __forceinline__ float f16_to_f32(u16 h) {{ float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }}
__device__ __forceinline__ u16 f32_to_f16(float f) {{ u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }}
__device__ __forceinline__ float f32_id(float f) {{ return f; }}

// Shared copies of the lookup tables: constant memory serialises a warp's distinct addresses.
#define LOAD_TABLES                                                          \
  __shared__ float nf4s[16];                                                 \
  __shared__ float code_s[256];                                              \
  if (threadIdx.x < 16) nf4s[threadIdx.x] = NF4[threadIdx.x];                \
  if (nested) for (int t = threadIdx.x; t < 256; t += blockDim.x) code_s[t] = acode[t]; \
  __syncthreads();

__device__ __forceinline__ float absmax_of(long long blk, int nested, const float* absmax,
    const u8* aq, const float* code_s, float offset, int nbs) {{
  if (nested) return __fadd_rn(__fmul_rn(code_s[aq[blk]], absmax[blk / nbs]), offset);
  return absmax[blk];
}}

#define DEQUANT(NAME, T, CONV)                                                                 \
extern "C" __global__ void NAME(const u8* codes, long long n, int bs, int nested,              \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs, T* out) {{   \
  LOAD_TABLES                                                                                  \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= (n + 1) / 2) return;                                                                \
  u8 c = codes[i];                                                                             \
  long long e = 2 * i;                                                                         \
  out[e] = CONV(__fmul_rn(nf4s[c >> 4], absmax_of(e / bs, nested, absmax, aq, code_s, offset, nbs))); \
  if (e + 1 < n)                                                                               \
    out[e + 1] = CONV(__fmul_rn(nf4s[c & 15], absmax_of((e + 1) / bs, nested, absmax, aq, code_s, offset, nbs))); \
}}
DEQUANT(nf4_dequant_f32, float, f32_id)
DEQUANT(nf4_dequant_bf16, u16, f32_to_bf16)
DEQUANT(nf4_dequant_f16, u16, f32_to_f16)

// The same, 8 weights a thread: one 4-byte load of codes, one absmax (the caller guarantees
// n % 8 == 0 and bs % 8 == 0, so the 8 share a block), 16- or 32-byte stores. Indices are
// 32-bit (the caller guarantees n < 2^32): 64-bit divisions cost more than the memory traffic.
#define DEQUANT8(NAME, T, CONV, STORE8)                                                        \
extern "C" __global__ void NAME(const u8* codes, long long n, int bs, int nested,              \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs, T* out) {{   \
  LOAD_TABLES                                                                                  \
  unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;                                      \
  if (i >= (unsigned int)(n / 8)) return;                                                      \
  unsigned int c = ((const unsigned int*)codes)[i];                                            \
  unsigned int blk = 8u * i / (unsigned int)bs;                                                \
  float a = nested ? __fadd_rn(__fmul_rn(code_s[aq[blk]], absmax[blk / (unsigned int)nbs]), offset) \
                   : absmax[blk];                                                              \
  float w[8];                                                                                  \
  _Pragma("unroll") for (int t = 0; t < 4; ++t) {{                                             \
    unsigned int b = (c >> (8 * t)) & 255u;                                                    \
    w[2 * t] = __fmul_rn(nf4s[b >> 4], a);                                                     \
    w[2 * t + 1] = __fmul_rn(nf4s[b & 15], a);                                                 \
  }}                                                                                           \
  STORE8(out, i, w, CONV)                                                                      \
}}
#define STORE8_16(out, i, w, CONV) {{                                                          \
  uint4 v;                                                                                     \
  v.x = (unsigned int)CONV(w[0]) | ((unsigned int)CONV(w[1]) << 16);                           \
  v.y = (unsigned int)CONV(w[2]) | ((unsigned int)CONV(w[3]) << 16);                           \
  v.z = (unsigned int)CONV(w[4]) | ((unsigned int)CONV(w[5]) << 16);                           \
  v.w = (unsigned int)CONV(w[6]) | ((unsigned int)CONV(w[7]) << 16);                           \
  ((uint4*)out)[i] = v; }}
#define STORE8_32(out, i, w, CONV) {{                                                          \
  ((float4*)out)[2 * i] = make_float4(w[0], w[1], w[2], w[3]);                                 \
  ((float4*)out)[2 * i + 1] = make_float4(w[4], w[5], w[6], w[7]); }}
DEQUANT8(nf4_dequant8_f32, float, f32_id, STORE8_32)
DEQUANT8(nf4_dequant8_bf16, u16, f32_to_bf16, STORE8_16)
DEQUANT8(nf4_dequant8_f16, u16, f32_to_f16, STORE8_16)

// One warp per output feature; each lane walks the row's codes 4 bytes (8 weights) at a time.
#define GEMV(NAME, LOAD, STORE)                                                                \
extern "C" __global__ void NAME(const u8* codes, int n, int k, int bs, int nested,             \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,              \
    const u16* x, u16* y, int m) {{                                                            \
  LOAD_TABLES                                                                                  \
  int lane = threadIdx.x & 31;                                                                 \
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);              \
  if (row >= n) return;                                                                        \
  float acc[GEMV_MAX_ROWS];                                                                    \
  _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.f;                      \
  long long base = row * (long long)k;                                                         \
  if ((k & 7) == 0 && (bs & 7) == 0) {{                                                        \
    const unsigned int* cw = (const unsigned int*)(codes + (base >> 1));                       \
    int nw = k >> 3;                                                                           \
    for (int j = lane; j < nw; j += 32) {{                                                     \
      unsigned int v = cw[j];                                                                  \
      float a = absmax_of((base + 8LL * j) / bs, nested, absmax, aq, code_s, offset, nbs);     \
      float w[8];                                                                              \
      _Pragma("unroll") for (int t = 0; t < 4; ++t) {{                                         \
        unsigned int b = (v >> (8 * t)) & 255u;                                                \
        w[2 * t] = nf4s[b >> 4] * a;                                                           \
        w[2 * t + 1] = nf4s[b & 15] * a;                                                       \
      }}                                                                                       \
      _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r) {{                             \
        if (r < m) {{                                                                          \
          uint4 xv = *(const uint4*)(x + (long long)r * k + 8 * j);                            \
          float s = w[0] * LOAD((u16)(xv.x & 0xffffu)) + w[1] * LOAD((u16)(xv.x >> 16))        \
                  + w[2] * LOAD((u16)(xv.y & 0xffffu)) + w[3] * LOAD((u16)(xv.y >> 16))        \
                  + w[4] * LOAD((u16)(xv.z & 0xffffu)) + w[5] * LOAD((u16)(xv.z >> 16))        \
                  + w[6] * LOAD((u16)(xv.w & 0xffffu)) + w[7] * LOAD((u16)(xv.w >> 16));       \
          acc[r] += s;                                                                         \
        }}                                                                                     \
      }}                                                                                       \
    }}                                                                                         \
  }} else {{                                                                                   \
    for (int kk = lane; kk < k; kk += 32) {{                                                   \
      long long e = base + kk;                                                                 \
      u8 c = codes[e >> 1];                                                                    \
      float wv = nf4s[(e & 1) ? (c & 15) : (c >> 4)]                                           \
               * absmax_of(e / bs, nested, absmax, aq, code_s, offset, nbs);                   \
      _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r)                                \
        if (r < m) acc[r] += wv * LOAD(x[(long long)r * k + kk]);                              \
    }}                                                                                         \
  }}                                                                                           \
  _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r) {{                                 \
    if (r < m) {{                                                                              \
      float s = acc[r];                                                                        \
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);        \
      if (lane == 0) y[(long long)r * n + row] = STORE(s);                                     \
    }}                                                                                         \
  }}                                                                                           \
}}
GEMV(nf4_gemv_bf16, bf16_to_f32, f32_to_bf16)
GEMV(nf4_gemv_f16, f16_to_f32, f32_to_f16)

// crate::dropout::keep_scale, element for element (splitmix64 of key + (i + 1) * golden ratio).
__device__ __forceinline__ float keep_scale(unsigned long long key, long long i, float p, float scale) {{
  unsigned long long z = key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  float u = (float)(z >> 40) * (1.0f / 16777216.0f);
  return u < p ? 0.0f : scale;
}}
#define DROPOUT(NAME, T, LOAD, STORE)                                                          \
extern "C" __global__ void NAME(const T* x, T* y, long long n, unsigned long long key,         \
    float p, float scale) {{                                                                   \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i < n) y[i] = STORE(__fmul_rn(LOAD(x[i]), keep_scale(key, i, p, scale)));                \
}}
DROPOUT(seeded_dropout_f32, float, f32_id, f32_id)
DROPOUT(seeded_dropout_bf16, u16, bf16_to_f32, f32_to_bf16)
DROPOUT(seeded_dropout_f16, u16, f16_to_f32, f32_to_f16)

#define NEG_INF __int_as_float(0xff800000)

// crate::gelu::gelu_grad, element for element.
#define GELU_BWD(NAME, T, LOAD, STORE)                                                         \
extern "C" __global__ void NAME(const T* x, const T* g, T* out, long long n) {{                 \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= n) return;                                                                          \
  float v = LOAD(x[i]);                                                                        \
  float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));                                  \
  float pdf = 0.3989423f * expf(-0.5f * v * v);                                                \
  out[i] = STORE(LOAD(g[i]) * (cdf + v * pdf));                                                \
}}
GELU_BWD(gelu_bwd_f32, float, f32_id, f32_id)
GELU_BWD(gelu_bwd_bf16, u16, bf16_to_f32, f32_to_bf16)
GELU_BWD(gelu_bwd_f16, u16, f16_to_f32, f32_to_f16)

// Attention's softmax (crate::masked_softmax): one block per row of t scores. The block
// reductions go through warp shuffles and one shared word per warp.
__device__ __forceinline__ float block_reduce(float v, float* red, int is_max) {{
  for (int off = 16; off > 0; off >>= 1) {{
    float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }}
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = threadIdx.x < nw ? red[threadIdx.x] : (is_max ? NEG_INF : 0.f);
  if (warp == 0) {{
    for (int off = 16; off > 0; off >>= 1) {{
      float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }}
    if (lane == 0) red[0] = v;
  }}
  __syncthreads();
  return red[0];
}}
#define SOFTMAX(NAME, T, LOAD, STORE)                                                          \
extern "C" __global__ void NAME(const T* x, const float* mask, const T* dp, T* out, int t,     \
    long long per_batch, int s, int mask_batch, float scale, int has_mask, int backward,        \
    long long rows) {{                                                                         \
  __shared__ float red[32];                                                                    \
  long long row = blockIdx.x;                                                                  \
  const T* xr = x + row * t;                                                                   \
  const float* mr = 0;                                                                         \
  if (has_mask) {{                                                                             \
    long long bi = mask_batch == 1 ? 0 : row / per_batch;                                      \
    mr = mask + (bi * s + row % s) * (long long)t;                                             \
  }}                                                                                           \
  float mx = NEG_INF;                                                                        \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {{                                         \
    float v = __fmul_rn(LOAD(xr[j]), scale);                                                   \
    if (has_mask) v = __fadd_rn(v, mr[j]);                                                     \
    mx = fmaxf(mx, v);                                                                         \
  }}                                                                                           \
  mx = block_reduce(mx, red, 1);                                                               \
  float sum = 0.f;                                                                             \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {{                                         \
    float v = __fmul_rn(LOAD(xr[j]), scale);                                                   \
    if (has_mask) v = __fadd_rn(v, mr[j]);                                                     \
    sum += expf(v - mx);                                                                       \
  }}                                                                                           \
  sum = block_reduce(sum, red, 0);                                                             \
  float dot = 0.f;                                                                             \
  if (backward) {{                                                                             \
    for (int j = threadIdx.x; j < t; j += blockDim.x) {{                                       \
      float v = __fmul_rn(LOAD(xr[j]), scale);                                                 \
      if (has_mask) v = __fadd_rn(v, mr[j]);                                                   \
      dot += (expf(v - mx) / sum) * LOAD(dp[row * t + j]);                                     \
    }}                                                                                         \
    dot = block_reduce(dot, red, 0);                                                           \
  }}                                                                                           \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {{                                         \
    float v = __fmul_rn(LOAD(xr[j]), scale);                                                   \
    if (has_mask) v = __fadd_rn(v, mr[j]);                                                     \
    float p = expf(v - mx) / sum;                                                              \
    out[row * t + j] = STORE(p);                                                               \
    if (backward) out[(rows + row) * t + j] = STORE(p * (LOAD(dp[row * t + j]) - dot) * scale); \
  }}                                                                                           \
}}
// The same for 16-bit rows of at most 1024 scores, t a multiple of 8: one warp a row, held in
// registers (8 scores a lane for every 256), so the scores are read once and the output written
// once, with no block-wide synchronization. Scores, dP and the output come in 16-byte vectors.
// IT (1, 2 or 4: rows up to 256, 512, 1024) sizes the register arrays: one size for all rows
// held 64 floats a thread and cut the warps an SM could keep in flight.
__device__ __forceinline__ float warp_max(float v) {{
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}}
__device__ __forceinline__ float warp_sum(float v) {{
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}}
#define SOFTMAX_WARP(NAME, LOAD, STORE, IT)                                                    \
extern "C" __global__ void NAME(const u16* x, const float* mask, const u16* dp, u16* out,     \
    int t, long long per_batch, int s, int mask_batch, float scale, int has_mask,              \
    int backward, long long rows) {{                                                           \
  int lane = threadIdx.x & 31;                                                                 \
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);              \
  if (row >= rows) return;                                                                     \
  const u16* xr = x + row * t;                                                                 \
  const float* mr = 0;                                                                         \
  if (has_mask) {{                                                                             \
    long long bi = mask_batch == 1 ? 0 : row / per_batch;                                      \
    mr = mask + (bi * s + row % s) * (long long)t;                                             \
  }}                                                                                           \
  float v[IT * 8];                                                                               \
  float mx = NEG_INF;                                                                          \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {{                                         \
    int j0 = (it * 32 + lane) * 8;                                                             \
    if (j0 < t) {{                                                                             \
      uint4 q = *(const uint4*)(xr + j0);                                                      \
      unsigned int w[4] = {{q.x, q.y, q.z, q.w}};                                              \
      float m8[8] = {{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}};                                \
      if (has_mask) {{                                                                         \
        float4 a = *(const float4*)(mr + j0), b = *(const float4*)(mr + j0 + 4);               \
        m8[0] = a.x; m8[1] = a.y; m8[2] = a.z; m8[3] = a.w;                                    \
        m8[4] = b.x; m8[5] = b.y; m8[6] = b.z; m8[7] = b.w;                                    \
      }}                                                                                       \
      _Pragma("unroll") for (int u = 0; u < 8; ++u) {{                                         \
        float e = __fmul_rn(LOAD((u16)(w[u >> 1] >> (16 * (u & 1)))), scale);                  \
        if (has_mask) e = __fadd_rn(e, m8[u]);                                                 \
        v[it * 8 + u] = e;                                                                     \
        mx = fmaxf(mx, e);                                                                     \
      }}                                                                                       \
    }}                                                                                         \
  }}                                                                                           \
  mx = warp_max(mx);                                                                           \
  float sum = 0.f;                                                                             \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {{                                         \
    if ((it * 32 + lane) * 8 < t) {{                                                           \
      _Pragma("unroll") for (int u = 0; u < 8; ++u) {{                                         \
        v[it * 8 + u] = expf(v[it * 8 + u] - mx);                                              \
        sum += v[it * 8 + u];                                                                  \
      }}                                                                                       \
    }}                                                                                         \
  }}                                                                                           \
  sum = warp_sum(sum);                                                                         \
  float g[IT * 8];                                                                               \
  float dot = 0.f;                                                                             \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {{                                         \
    int j0 = (it * 32 + lane) * 8;                                                             \
    if (j0 < t) {{                                                                             \
      _Pragma("unroll") for (int u = 0; u < 8; ++u) v[it * 8 + u] = v[it * 8 + u] / sum;       \
      if (backward) {{                                                                         \
        uint4 q = *(const uint4*)(dp + row * t + j0);                                          \
        unsigned int w[4] = {{q.x, q.y, q.z, q.w}};                                            \
        _Pragma("unroll") for (int u = 0; u < 8; ++u) {{                                       \
          g[it * 8 + u] = LOAD((u16)(w[u >> 1] >> (16 * (u & 1))));                            \
          dot += v[it * 8 + u] * g[it * 8 + u];                                                \
        }}                                                                                     \
      }}                                                                                       \
    }}                                                                                         \
  }}                                                                                           \
  if (backward) dot = warp_sum(dot);                                                           \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {{                                         \
    int j0 = (it * 32 + lane) * 8;                                                             \
    if (j0 < t) {{                                                                             \
      const float* p = v + it * 8;                                                             \
      uint4 o;                                                                                 \
      o.x = (unsigned int)STORE(p[0]) | ((unsigned int)STORE(p[1]) << 16);                     \
      o.y = (unsigned int)STORE(p[2]) | ((unsigned int)STORE(p[3]) << 16);                     \
      o.z = (unsigned int)STORE(p[4]) | ((unsigned int)STORE(p[5]) << 16);                     \
      o.w = (unsigned int)STORE(p[6]) | ((unsigned int)STORE(p[7]) << 16);                     \
      *(uint4*)(out + row * t + j0) = o;                                                       \
      if (backward) {{                                                                         \
        float d[8];                                                                            \
        _Pragma("unroll") for (int u = 0; u < 8; ++u)                                          \
          d[u] = p[u] * (g[it * 8 + u] - dot) * scale;                                         \
        o.x = (unsigned int)STORE(d[0]) | ((unsigned int)STORE(d[1]) << 16);                   \
        o.y = (unsigned int)STORE(d[2]) | ((unsigned int)STORE(d[3]) << 16);                   \
        o.z = (unsigned int)STORE(d[4]) | ((unsigned int)STORE(d[5]) << 16);                   \
        o.w = (unsigned int)STORE(d[6]) | ((unsigned int)STORE(d[7]) << 16);                   \
        *(uint4*)(out + (rows + row) * t + j0) = o;                                            \
      }}                                                                                       \
    }}                                                                                         \
  }}                                                                                           \
}}
SOFTMAX_WARP(masked_softmax_warp1_bf16, bf16_to_f32, f32_to_bf16, 1)
SOFTMAX_WARP(masked_softmax_warp2_bf16, bf16_to_f32, f32_to_bf16, 2)
SOFTMAX_WARP(masked_softmax_warp4_bf16, bf16_to_f32, f32_to_bf16, 4)
SOFTMAX_WARP(masked_softmax_warp1_f16, f16_to_f32, f32_to_f16, 1)
SOFTMAX_WARP(masked_softmax_warp2_f16, f16_to_f32, f32_to_f16, 2)
SOFTMAX_WARP(masked_softmax_warp4_f16, f16_to_f32, f32_to_f16, 4)
// Cross-entropy over rows of `v` logits (crate::loss::cross_entropy_sum): one block a row.
// Forward: lse = log(sum(exp(x - max))) + max and nll = lse - x[label] (NaN for a label out of
// range). Backward: (exp(x - lse) - onehot(label)) * g, g the gradient of the summed loss.
#define CE_FWD(NAME, T, LOAD)                                                                  \
extern "C" __global__ void NAME(const T* x, const unsigned int* labels, float* lse,           \
    float* nll, int v) {{                                                                      \
  __shared__ float red[32];                                                                    \
  long long row = blockIdx.x;                                                                  \
  const T* xr = x + row * (long long)v;                                                        \
  float mx = NEG_INF;                                                                          \
  for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, LOAD(xr[j]));               \
  mx = block_reduce(mx, red, 1);                                                               \
  float sum = 0.f;                                                                             \
  for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(LOAD(xr[j]) - mx);             \
  sum = block_reduce(sum, red, 0);                                                             \
  if (threadIdx.x == 0) {{                                                                     \
    float l = logf(sum) + mx;                                                                  \
    unsigned int lab = labels[row];                                                            \
    lse[row] = l;                                                                              \
    nll[row] = lab < (unsigned int)v ? l - LOAD(xr[lab]) : __int_as_float(0x7fc00000);         \
  }}                                                                                           \
}}
#define CE_BWD(NAME, T, LOAD, STORE)                                                           \
extern "C" __global__ void NAME(const T* x, const unsigned int* labels, const float* lse,     \
    const float* g, T* out, int v) {{                                                          \
  long long row = blockIdx.x;                                                                  \
  const T* xr = x + row * (long long)v;                                                        \
  float l = lse[row], gg = g[0];                                                               \
  unsigned int lab = labels[row];                                                              \
  for (int j = threadIdx.x; j < v; j += blockDim.x) {{                                         \
    float p = expf(LOAD(xr[j]) - l);                                                           \
    if ((unsigned int)j == lab) p -= 1.f;                                                      \
    out[row * (long long)v + j] = STORE(p * gg);                                               \
  }}                                                                                           \
}}
CE_FWD(ce_fwd_f32, float, f32_id)
CE_FWD(ce_fwd_bf16, u16, bf16_to_f32)
CE_FWD(ce_fwd_f16, u16, f16_to_f32)
CE_BWD(ce_bwd_f32, float, f32_id, f32_id)
CE_BWD(ce_bwd_bf16, u16, bf16_to_f32, f32_to_bf16)
CE_BWD(ce_bwd_f16, u16, f16_to_f32, f32_to_f16)
// One AdamW update (torch.optim.AdamW, f32), with the roundings of the op-by-op version in
// the trainer: every product and sum rounded on its own, `/ bc2_sqrt` as a multiply by its
// inverse (candle's tensor / scalar), `sqrtf` and `/` exact.
extern "C" __global__ void adamw_f32(const float* p, const float* g, const float* m,
    const float* v, float* po, float* mo, float* vo, long long n, float b1, float omb1,
    float b2, float omb2, float decay, int has_decay, float inv_bc2, float eps, float step) {{
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gi = g[i];
  float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, omb1));
  float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
  float pi = has_decay ? __fmul_rn(p[i], decay) : p[i];
  float denom = __fadd_rn(__fmul_rn(sqrtf(vi), inv_bc2), eps);
  po[i] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step));
  mo[i] = mi;
  vo[i] = vi;
}}
// An unmerged LoRA adapter at inference on a few rows (crate::lora::LoraLayer::add_to):
// h = x A^T (one block per row and rank, f32), then y + (h (B * scaling)^T), summed in f32
// and rounded once, as PEFT computes it with f32 adapter weights.
#define LORA_H(NAME, LOAD)                                                                     \
extern "C" __global__ void NAME(const u16* x, const float* a, float* h, int k, int r) {{       \
  __shared__ float red[32];                                                                    \
  int row = blockIdx.x / r, j = blockIdx.x % r;                                                \
  const u16* xr = x + (long long)row * k;                                                      \
  const float* ar = a + (long long)j * k;                                                      \
  float acc = 0.f;                                                                             \
  for (int t = threadIdx.x; t < k; t += blockDim.x) acc += LOAD(xr[t]) * ar[t];                \
  acc = block_reduce(acc, red, 0);                                                             \
  if (threadIdx.x == 0) h[blockIdx.x] = acc;                                                   \
}}
#define LORA_OUT(NAME, LOAD, STORE)                                                            \
extern "C" __global__ void NAME(const u16* y, const float* h, const float* b, float scaling,  \
    u16* out, int n, int r, long long total) {{                                                \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= total) return;                                                                      \
  long long row = i / n;                                                                       \
  int col = (int)(i - row * n);                                                                \
  const float* hr = h + row * r;                                                               \
  const float* br = b + (long long)col * r;                                                    \
  float d = 0.f;                                                                               \
  for (int j = 0; j < r; ++j) d += hr[j] * __fmul_rn(br[j], scaling);                          \
  out[i] = STORE(__fadd_rn(LOAD(y[i]), d));                                                    \
}}
LORA_H(lora_h_bf16, bf16_to_f32)
LORA_H(lora_h_f16, f16_to_f32)
LORA_OUT(lora_out_bf16, bf16_to_f32, f32_to_bf16)
LORA_OUT(lora_out_f16, f16_to_f32, f32_to_f16)
SOFTMAX(masked_softmax_f32, float, f32_id, f32_id)
SOFTMAX(masked_softmax_bf16, u16, bf16_to_f32, f32_to_bf16)
SOFTMAX(masked_softmax_f16, u16, f16_to_f32, f32_to_f16)
"#,
        max_rows = GEMV_MAX_ROWS,
        table = table.join(", "),
    )
}

/// The PTX, compiled on first use. NVRTC's default target (the oldest architecture it
/// supports) is JIT-compiled by the driver for the card at hand.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source())
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling the NF4 CUDA kernels with NVRTC: {e}"))
    })
    .as_deref()
    .map_err(|e| Error::Msg(e.clone()))
}

/// Launches kernel `$name` of this module on `$dev` with `$cfg`, pushing the arguments in
/// order.
macro_rules! run_kernel {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // SAFETY: every call site passes the kernel's parameters in its order and types.
        unsafe { builder.launch($cfg) }.w()
    }};
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => Err(Error::Msg(
            "NF4 CUDA kernel called with a tensor not on a CUDA device".into(),
        )),
    }
}

/// Runs `f` with the CUDA slice of every input tensor (which must be fresh, offset-0 tensors of
/// the named dtype).
fn with_slices<R>(w: &Nf4Gpu, f: impl FnOnce(Slices) -> Result<R>) -> Result<R> {
    fn guard(t: &Tensor) -> Result<impl std::ops::Deref<Target = Storage> + '_> {
        if t.layout().start_offset() != 0 || !t.is_contiguous() {
            return Err(Error::Msg("NF4 CUDA kernel: input is a view".into()));
        }
        Ok(t.storage_and_layout().0)
    }
    fn cuda(s: &Storage) -> Result<&CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => Err(Error::Msg(
                "NF4 CUDA kernel: input is not on the GPU".into(),
            )),
        }
    }
    let codes = guard(w.codes)?;
    match &w.absmax {
        AbsmaxGpu::Plain(a) => {
            let a = guard(a)?;
            let a = cuda(&a)?.as_cuda_slice::<f32>()?;
            let codes = cuda(&codes)?.as_cuda_slice::<u8>()?;
            f(Slices {
                codes,
                nested: 0,
                absmax: a,
                aq: codes,
                acode: a,
                offset: 0.0,
                nbs: 1,
            })
        }
        AbsmaxGpu::Nested {
            q,
            code,
            absmax,
            offset,
            blocksize,
        } => {
            let (q, code, absmax) = (guard(q)?, guard(code)?, guard(absmax)?);
            f(Slices {
                codes: cuda(&codes)?.as_cuda_slice::<u8>()?,
                nested: 1,
                absmax: cuda(&absmax)?.as_cuda_slice::<f32>()?,
                aq: cuda(&q)?.as_cuda_slice::<u8>()?,
                acode: cuda(&code)?.as_cuda_slice::<f32>()?,
                offset: *offset,
                nbs: *blocksize as i32,
            })
        }
    }
}

struct Slices<'a> {
    codes: &'a CudaSlice<u8>,
    nested: i32,
    absmax: &'a CudaSlice<f32>,
    aq: &'a CudaSlice<u8>,
    acode: &'a CudaSlice<f32>,
    offset: f32,
    nbs: i32,
}

fn wrap<T: candle_core::cuda_backend::CudaDType>(
    out: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<candle_core::Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The whole weight in `dtype` (bf16, f16 or f32), flat: the caller reshapes it.
pub fn dequantize(w: &Nf4Gpu, dtype: DType) -> Result<Tensor> {
    let dev = cuda_device(w.codes)?;
    let n = w.n as i64;
    let bs = w.blocksize as i32;
    let threads = 256u32;
    // Eight weights a thread where whole 4-byte words of codes share an absmax block.
    let by8 = w.n % 8 == 0 && w.blocksize % 8 == 0 && w.n <= u32::MAX as usize;
    let per_thread = if by8 { w.n / 8 } else { w.n.div_ceil(2) };
    let cfg = LaunchConfig {
        grid_dim: (per_thread.div_ceil(threads as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    with_slices(w, |s| {
        macro_rules! launch {
            ($name:literal, $name8:literal, $t:ty) => {{
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(w.n)? };
                let name = if by8 { $name8 } else { $name };
                run_kernel!(dev, name, cfg;
                    s.codes, &n, &bs, &s.nested, s.absmax, s.aq, s.acode, &s.offset, &s.nbs, &out,
                )?;
                Ok(wrap(out, &dev, w.n))
            }};
        }
        match dtype {
            DType::F32 => launch!("nf4_dequant_f32", "nf4_dequant8_f32", f32),
            DType::BF16 => launch!("nf4_dequant_bf16", "nf4_dequant8_bf16", half::bf16),
            DType::F16 => launch!("nf4_dequant_f16", "nf4_dequant8_f16", half::f16),
            other => Err(Error::Msg(format!(
                "NF4 dequantize to {other:?} is not supported"
            ))),
        }
    })
}

/// `x [m, k] @ W^T` for `W [n, k]` held as NF4, `m <= GEMV_MAX_ROWS`, `x` bf16 or f16.
pub fn gemv(w: &Nf4Gpu, out_features: usize, x: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if m == 0 || m > GEMV_MAX_ROWS || out_features * k != w.n {
        return Err(Error::Msg(format!(
            "NF4 GEMV: {m} rows of {k} features against a weight of {} elements",
            w.n
        )));
    }
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        // A fresh, offset-0 copy; the round trip through f32 is exact for bf16 and f16.
        x.to_dtype(DType::F32)?.to_dtype(x.dtype())?
    };
    let dev = cuda_device(&x)?;
    let (n_i, k_i, m_i, bs) = (out_features as i32, k as i32, m as i32, w.blocksize as i32);
    let warps_per_block = 8u32;
    let cfg = LaunchConfig {
        grid_dim: (out_features.div_ceil(warps_per_block as usize) as u32, 1, 1),
        block_dim: (32 * warps_per_block, 1, 1),
        shared_mem_bytes: 0,
    };
    let (xs, _) = x.storage_and_layout();
    let xs = match &*xs {
        Storage::Cuda(c) => c,
        _ => return Err(Error::Msg("NF4 GEMV: x is not on the GPU".into())),
    };
    with_slices(w, |s| {
        macro_rules! launch {
            ($name:literal, $t:ty) => {{
                let xv = xs.as_cuda_slice::<$t>()?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(m * out_features)? };
                run_kernel!(dev, $name, cfg;
                    s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode, &s.offset,
                    &s.nbs, xv, &out, &m_i,
                )?;
                Ok(wrap(out, &dev, (m, out_features)))
            }};
        }
        match x.dtype() {
            DType::BF16 => launch!("nf4_gemv_bf16", half::bf16),
            DType::F16 => launch!("nf4_gemv_f16", half::f16),
            other => Err(Error::Msg(format!(
                "NF4 GEMV on {other:?} input is not supported"
            ))),
        }
    })
}

/// `x * mask / (1 - p)` with the mask of [`crate::dropout::keep_scale`]; `x` contiguous from
/// its storage's start (`offset` elements in).
pub fn seeded_dropout(
    x: &CudaStorage,
    offset: usize,
    n: usize,
    key: u64,
    p: f32,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let n_i = n as i64;
    let cfg = LaunchConfig::for_num_elems(n as u32);
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let src = x.as_cuda_slice::<$t>()?.slice(offset..offset + n);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            run_kernel!(dev, $name, cfg; &src, &out, &n_i, &key, &p, &scale)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match x.dtype() {
        DType::F32 => launch!("seeded_dropout_f32", f32),
        DType::BF16 => launch!("seeded_dropout_bf16", half::bf16),
        DType::F16 => launch!("seeded_dropout_f16", half::f16),
        other => Err(Error::Msg(format!("dropout on {other:?} is not supported"))),
    }
}

/// The shape and options of one [`masked_softmax`] launch (see `crate::masked_softmax`).
pub struct SoftmaxArgs {
    pub rows: usize,
    pub t: usize,
    pub per_batch: usize,
    pub s: usize,
    pub mask_batch: usize,
    pub scale: f32,
    pub has_mask: bool,
}

/// The longest row the one-warp softmax kernel holds in registers.
const SOFTMAX_WARP_MAX_T: usize = 1024;

/// Attention's softmax over rows of `t` scores or, with `dp`, the probabilities followed by the
/// gradient (`2 * rows * t` elements); each input is a storage and the element offset where the
/// contiguous tensor starts.
pub fn masked_softmax(
    scores: (&CudaStorage, usize),
    mask: (&CudaStorage, usize),
    dp: Option<(&CudaStorage, usize)>,
    a: &SoftmaxArgs,
) -> Result<CudaStorage> {
    let dev = scores.0.device.clone();
    let n = a.rows * a.t;
    let sixteen_bit = matches!(scores.0.dtype(), DType::BF16 | DType::F16);
    // The warp kernel reads 16-byte vectors: every row, and the mask's rows, must start on one.
    let aligned = scores.1 % 8 == 0 && dp.is_none_or(|d| d.1 % 8 == 0) && mask.1 % 4 == 0;
    let warp = sixteen_bit && a.t % 8 == 0 && a.t <= SOFTMAX_WARP_MAX_T && aligned;
    // The variant whose register arrays just hold the row.
    let warp_kernel = |dtype: &str| {
        let it = match a.t.div_ceil(256) {
            1 => 1,
            2 => 2,
            _ => 4,
        };
        format!("masked_softmax_warp{it}_{dtype}")
    };
    let cfg = if warp {
        let rows_per_block = 8;
        LaunchConfig {
            grid_dim: (a.rows.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (32 * rows_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        let threads = (a.t.div_ceil(4).next_power_of_two()).clamp(32, 512) as u32;
        LaunchConfig {
            grid_dim: (a.rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    };
    let (t, per_batch, s, mb, rows) = (
        a.t as i32,
        a.per_batch as i64,
        a.s as i32,
        a.mask_batch as i32,
        a.rows as i64,
    );
    let (has_mask, backward) = (a.has_mask as i32, dp.is_some() as i32);
    let out_len = if dp.is_some() { 2 * n } else { n };
    let mask_all = mask.0.as_cuda_slice::<f32>()?;
    let mask_v = mask_all.slice(mask.1..);
    macro_rules! launch {
        ($name:expr, $t:ty) => {{
            let x = scores
                .0
                .as_cuda_slice::<$t>()?
                .slice(scores.1..scores.1 + n);
            // Without a gradient the kernel never reads `dp`; the scores stand in for it.
            let g = match dp {
                Some((g, off)) => g.as_cuda_slice::<$t>()?.slice(off..off + n),
                None => scores
                    .0
                    .as_cuda_slice::<$t>()?
                    .slice(scores.1..scores.1 + n),
            };
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(out_len)? };
            run_kernel!(dev, $name, cfg;
                &x, &mask_v, &g, &out, &t, &per_batch, &s, &mb, &a.scale, &has_mask, &backward,
                &rows,
            )?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match (scores.0.dtype(), warp) {
        (DType::F32, _) => launch!("masked_softmax_f32", f32),
        (DType::BF16, true) => launch!(&warp_kernel("bf16"), half::bf16),
        (DType::BF16, false) => launch!("masked_softmax_bf16", half::bf16),
        (DType::F16, true) => launch!(&warp_kernel("f16"), half::f16),
        (DType::F16, false) => launch!("masked_softmax_f16", half::f16),
        (other, _) => Err(Error::Msg(format!(
            "masked softmax on {other:?} is not supported"
        ))),
    }
}

/// `g * gelu_erf'(x)` (see `crate::gelu`); each input is a storage and the element offset where
/// its contiguous `n` elements start.
pub fn gelu_backward(
    x: (&CudaStorage, usize),
    g: (&CudaStorage, usize),
    n: usize,
) -> Result<CudaStorage> {
    let dev = x.0.device.clone();
    let n_i = n as i64;
    let cfg = LaunchConfig::for_num_elems(n as u32);
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let xv = x.0.as_cuda_slice::<$t>()?.slice(x.1..x.1 + n);
            let gv = g.0.as_cuda_slice::<$t>()?.slice(g.1..g.1 + n);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            run_kernel!(dev, $name, cfg; &xv, &gv, &out, &n_i)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match x.0.dtype() {
        DType::F32 => launch!("gelu_bwd_f32", f32),
        DType::BF16 => launch!("gelu_bwd_bf16", half::bf16),
        DType::F16 => launch!("gelu_bwd_f16", half::f16),
        other => Err(Error::Msg(format!(
            "gelu backward on {other:?} is not supported"
        ))),
    }
}

/// A contiguous tensor's CUDA storage, read-locked while a launch uses it.
struct CudaInput<'a> {
    storage: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> CudaInput<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(Error::Msg("CUDA kernel: input is not contiguous".into()));
        };
        Ok(CudaInput {
            storage,
            start,
            len: end - start,
        })
    }

    /// The tensor's elements as a kernel argument; there must be `n` of them.
    fn view<T: candle_core::cuda_backend::CudaDType>(
        &self,
        n: usize,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>> {
        if n != self.len {
            return Err(Error::Msg(format!(
                "CUDA kernel: input has {} elements, expected {n}",
                self.len
            )));
        }
        match &*self.storage {
            Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?.slice(self.start..self.start + n)),
            _ => Err(Error::Msg("CUDA kernel: input is not on the GPU".into())),
        }
    }
}

/// Per row of `logits` (`[n, v]`, contiguous) and its `labels` (`[n]` u32): `(lse, nll)`, each
/// `[n]` f32 (see the `CE_FWD` kernel).
pub fn cross_entropy_forward(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(logits)?;
    let (n, v) = logits.dims2()?;
    let ls = CudaInput::of(logits)?;
    let ys = CudaInput::of(labels)?;
    let y = ys.view::<u32>(n)?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let v_i = v as i32;
    // SAFETY: every element is written by the kernel below.
    let lse = unsafe { dev.alloc::<f32>(n)? };
    let nll = unsafe { dev.alloc::<f32>(n)? };
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let x = ls.view::<$t>(n * v)?;
            run_kernel!(dev, $name, cfg; &x, &y, &lse, &nll, &v_i)?;
        }};
    }
    match logits.dtype() {
        DType::F32 => launch!("ce_fwd_f32", f32),
        DType::BF16 => launch!("ce_fwd_bf16", half::bf16),
        DType::F16 => launch!("ce_fwd_f16", half::f16),
        other => {
            return Err(Error::Msg(format!(
                "cross-entropy on {other:?} is not supported"
            )));
        }
    }
    Ok((wrap(lse, &dev, n), wrap(nll, &dev, n)))
}

/// The gradient of the summed cross-entropy with respect to `logits`, in their dtype, given the
/// forward's `lse` and `grad` (a one-element f32 tensor: the gradient of the sum).
pub fn cross_entropy_backward(
    logits: &Tensor,
    labels: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let dev = cuda_device(logits)?;
    let (n, v) = logits.dims2()?;
    let ls = CudaInput::of(logits)?;
    let ys = CudaInput::of(labels)?;
    let es = CudaInput::of(lse)?;
    let gs = CudaInput::of(grad)?;
    let y = ys.view::<u32>(n)?;
    let e = es.view::<f32>(n)?;
    let g = gs.view::<f32>(1)?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let v_i = v as i32;
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let x = ls.view::<$t>(n * v)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n * v)? };
            run_kernel!(dev, $name, cfg; &x, &y, &e, &g, &out, &v_i)?;
            Ok(wrap(out, &dev, (n, v)))
        }};
    }
    match logits.dtype() {
        DType::F32 => launch!("ce_bwd_f32", f32),
        DType::BF16 => launch!("ce_bwd_bf16", half::bf16),
        DType::F16 => launch!("ce_bwd_f16", half::f16),
        other => Err(Error::Msg(format!(
            "cross-entropy on {other:?} is not supported"
        ))),
    }
}

/// The scalars of one AdamW update, as the trainer's op-by-op version rounds them to f32.
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 - lr * weight_decay`, or `None` without weight decay.
    pub decay: Option<f64>,
    pub bc2_sqrt: f64,
    /// `lr / bc1`.
    pub step: f64,
}

/// `(p, m, v)` after one AdamW update of the f32 tensors `p`, `m`, `v` with gradient `g` (see
/// the `adamw_f32` kernel): one launch instead of a dozen per weight.
pub fn adamw_f32(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: &AdamWScalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(p)?;
    let n = p.elem_count();
    for t in [g, m, v] {
        if t.elem_count() != n || t.dtype() != DType::F32 || p.dtype() != DType::F32 {
            return Err(Error::Msg(format!(
                "adamw: tensors of {:?} {:?} and {:?} {:?}",
                p.dims(),
                p.dtype(),
                t.dims(),
                t.dtype()
            )));
        }
    }
    let ps = CudaInput::of(p)?;
    let gs = CudaInput::of(g)?;
    let ms = CudaInput::of(m)?;
    let vs = CudaInput::of(v)?;
    let pv = ps.view::<f32>(n)?;
    let gv = gs.view::<f32>(n)?;
    let mv = ms.view::<f32>(n)?;
    let vv = vs.view::<f32>(n)?;
    // SAFETY: every element is written by the kernel below.
    let (po, mo, vo) = unsafe {
        (
            dev.alloc::<f32>(n)?,
            dev.alloc::<f32>(n)?,
            dev.alloc::<f32>(n)?,
        )
    };
    let n_i = n as i64;
    let f = |x: f64| x as f32;
    let (b1, omb1, b2, omb2) = (f(c.beta1), f(1.0 - c.beta1), f(c.beta2), f(1.0 - c.beta2));
    let (decay, has_decay) = (f(c.decay.unwrap_or(1.0)), c.decay.is_some() as i32);
    let (inv_bc2, eps, step) = (f(1.0 / c.bc2_sqrt), f(c.eps), f(c.step));
    run_kernel!(dev, "adamw_f32", LaunchConfig::for_num_elems(n as u32);
        &pv, &gv, &mv, &vv, &po, &mo, &vo, &n_i, &b1, &omb1, &b2, &omb2, &decay, &has_decay,
        &inv_bc2, &eps, &step,
    )?;
    let shape = p.shape().clone();
    Ok((
        wrap(po, &dev, shape.clone()),
        wrap(mo, &dev, shape.clone()),
        wrap(vo, &dev, shape),
    ))
}

/// Rows of `x` up to which [`lora_inference`] serves.
pub const LORA_INFERENCE_MAX_ROWS: usize = 64;

/// `y + (x A^T)(B * scaling)^T` for an adapter at inference: `x` `[m, k]` and `y` `[m, n]` in
/// bf16 or f16 (both contiguous), `a` `[r, k]` and `b` `[n, r]` in f32. Two launches instead of
/// the eight of the op-by-op version, which dominated unmerged decoding.
pub fn lora_inference(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let (m, k) = x.dims2()?;
    let (m2, n) = y.dims2()?;
    let (r, k2) = a.dims2()?;
    let (n2, r2) = b.dims2()?;
    if m != m2 || k != k2 || n != n2 || r != r2 || x.dtype() != y.dtype() {
        return Err(Error::Msg(format!(
            "lora inference: x {:?} {:?}, y {:?} {:?}, A {:?}, B {:?}",
            x.dims(),
            x.dtype(),
            y.dims(),
            y.dtype(),
            a.dims(),
            b.dims()
        )));
    }
    let ys = CudaInput::of(y)?;
    let xs = CudaInput::of(x)?;
    let a_in = CudaInput::of(a)?;
    let b_in = CudaInput::of(b)?;
    let av = a_in.view::<f32>(r * k)?;
    let bv = b_in.view::<f32>(n * r)?;
    // SAFETY: every element is written by the first kernel below.
    let h = unsafe { dev.alloc::<f32>(m * r)? };
    let (k_i, r_i, n_i, total) = (k as i32, r as i32, n as i32, (m * n) as i64);
    let scale = scaling as f32;
    macro_rules! launch {
        ($hname:literal, $oname:literal, $t:ty) => {{
            let xv = xs.view::<$t>(m * k)?;
            let yv = ys.view::<$t>(m * n)?;
            let per_rank = LaunchConfig {
                grid_dim: ((m * r) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            run_kernel!(dev, $hname, per_rank; &xv, &av, &h, &k_i, &r_i)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(m * n)? };
            run_kernel!(dev, $oname, LaunchConfig::for_num_elems((m * n) as u32);
                &yv, &h, &bv, &scale, &out, &n_i, &r_i, &total,
            )?;
            Ok(wrap(out, &dev, (m, n)))
        }};
    }
    match y.dtype() {
        DType::BF16 => launch!("lora_h_bf16", "lora_out_bf16", half::bf16),
        DType::F16 => launch!("lora_h_f16", "lora_out_f16", half::f16),
        other => Err(Error::Msg(format!(
            "lora inference on {other:?} is not supported"
        ))),
    }
}
