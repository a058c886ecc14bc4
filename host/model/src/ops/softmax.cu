// Attention's masked softmax and its backward pass (ops/softmax.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

#define SOFTMAX(NAME, T, LOAD, STORE)                                                          \
extern "C" __global__ void NAME(const T* x, const float* mask, const T* dp, T* out, int t,     \
    long long per_batch, int s, int mask_batch, float scale, int has_mask, int backward,        \
    long long rows) {                                                                         \
  __shared__ float red[32];                                                                    \
  long long row = blockIdx.x;                                                                  \
  const T* xr = x + row * t;                                                                   \
  const float* mr = 0;                                                                         \
  if (has_mask) {                                                                             \
    long long bi = mask_batch == 1 ? 0 : row / per_batch;                                      \
    mr = mask + (bi * s + row % s) * (long long)t;                                             \
  }                                                                                           \
  float mx = NEG_INF;                                                                        \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {                                         \
    float v = __fmul_rn(LOAD(xr[j]), scale);                                                   \
    if (has_mask) v = __fadd_rn(v, mr[j]);                                                     \
    mx = fmaxf(mx, v);                                                                         \
  }                                                                                           \
  mx = block_reduce(mx, red, 1);                                                               \
  float sum = 0.f;                                                                             \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {                                         \
    float v = __fmul_rn(LOAD(xr[j]), scale);                                                   \
    if (has_mask) v = __fadd_rn(v, mr[j]);                                                     \
    sum += expf(v - mx);                                                                       \
  }                                                                                           \
  sum = block_reduce(sum, red, 0);                                                             \
  float dot = 0.f;                                                                             \
  if (backward) {                                                                             \
    for (int j = threadIdx.x; j < t; j += blockDim.x) {                                       \
      float v = __fmul_rn(LOAD(xr[j]), scale);                                                 \
      if (has_mask) v = __fadd_rn(v, mr[j]);                                                   \
      dot += (expf(v - mx) / sum) * LOAD(dp[row * t + j]);                                     \
    }                                                                                         \
    dot = block_reduce(dot, red, 0);                                                           \
  }                                                                                           \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {                                         \
    float v = __fmul_rn(LOAD(xr[j]), scale);                                                   \
    if (has_mask) v = __fadd_rn(v, mr[j]);                                                     \
    float p = expf(v - mx) / sum;                                                              \
    out[row * t + j] = STORE(p);                                                               \
    if (backward) out[(rows + row) * t + j] = STORE(p * (LOAD(dp[row * t + j]) - dot) * scale); \
  }                                                                                           \
}
// The same for 16-bit rows of at most 1024 scores, t a multiple of 8: one warp a row, held in
// registers (8 scores a lane for every 256), so the scores are read once and the output written
// once, with no block-wide synchronization. Scores, dP and the output come in 16-byte vectors.
// IT (1, 2 or 4: rows up to 256, 512, 1024) sizes the register arrays: one size for all rows
// held 64 floats a thread and cut the warps an SM could keep in flight.
#define SOFTMAX_WARP(NAME, LOAD, STORE, IT)                                                    \
extern "C" __global__ void NAME(const u16* x, const float* mask, const u16* dp, u16* out,     \
    int t, long long per_batch, int s, int mask_batch, float scale, int has_mask,              \
    int backward, long long rows) {                                                           \
  int lane = threadIdx.x & 31;                                                                 \
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);              \
  if (row >= rows) return;                                                                     \
  const u16* xr = x + row * t;                                                                 \
  const float* mr = 0;                                                                         \
  if (has_mask) {                                                                             \
    long long bi = mask_batch == 1 ? 0 : row / per_batch;                                      \
    mr = mask + (bi * s + row % s) * (long long)t;                                             \
  }                                                                                           \
  float v[IT * 8];                                                                               \
  float mx = NEG_INF;                                                                          \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {                                         \
    int j0 = (it * 32 + lane) * 8;                                                             \
    if (j0 < t) {                                                                             \
      uint4 q = *(const uint4*)(xr + j0);                                                      \
      unsigned int w[4] = {q.x, q.y, q.z, q.w};                                              \
      float m8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};                                \
      if (has_mask) {                                                                         \
        float4 a = *(const float4*)(mr + j0), b = *(const float4*)(mr + j0 + 4);               \
        m8[0] = a.x; m8[1] = a.y; m8[2] = a.z; m8[3] = a.w;                                    \
        m8[4] = b.x; m8[5] = b.y; m8[6] = b.z; m8[7] = b.w;                                    \
      }                                                                                       \
      _Pragma("unroll") for (int u = 0; u < 8; ++u) {                                         \
        float e = __fmul_rn(LOAD((u16)(w[u >> 1] >> (16 * (u & 1)))), scale);                  \
        if (has_mask) e = __fadd_rn(e, m8[u]);                                                 \
        v[it * 8 + u] = e;                                                                     \
        mx = fmaxf(mx, e);                                                                     \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  mx = warp_max(mx);                                                                           \
  float sum = 0.f;                                                                             \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {                                         \
    if ((it * 32 + lane) * 8 < t) {                                                           \
      _Pragma("unroll") for (int u = 0; u < 8; ++u) {                                         \
        v[it * 8 + u] = expf(v[it * 8 + u] - mx);                                              \
        sum += v[it * 8 + u];                                                                  \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  sum = warp_sum(sum);                                                                         \
  float g[IT * 8];                                                                               \
  float dot = 0.f;                                                                             \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {                                         \
    int j0 = (it * 32 + lane) * 8;                                                             \
    if (j0 < t) {                                                                             \
      _Pragma("unroll") for (int u = 0; u < 8; ++u) v[it * 8 + u] = v[it * 8 + u] / sum;       \
      if (backward) {                                                                         \
        uint4 q = *(const uint4*)(dp + row * t + j0);                                          \
        unsigned int w[4] = {q.x, q.y, q.z, q.w};                                            \
        _Pragma("unroll") for (int u = 0; u < 8; ++u) {                                       \
          g[it * 8 + u] = LOAD((u16)(w[u >> 1] >> (16 * (u & 1))));                            \
          dot += v[it * 8 + u] * g[it * 8 + u];                                                \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  if (backward) dot = warp_sum(dot);                                                           \
  _Pragma("unroll") for (int it = 0; it < IT; ++it) {                                         \
    int j0 = (it * 32 + lane) * 8;                                                             \
    if (j0 < t) {                                                                             \
      const float* p = v + it * 8;                                                             \
      uint4 o;                                                                                 \
      o.x = (unsigned int)STORE(p[0]) | ((unsigned int)STORE(p[1]) << 16);                     \
      o.y = (unsigned int)STORE(p[2]) | ((unsigned int)STORE(p[3]) << 16);                     \
      o.z = (unsigned int)STORE(p[4]) | ((unsigned int)STORE(p[5]) << 16);                     \
      o.w = (unsigned int)STORE(p[6]) | ((unsigned int)STORE(p[7]) << 16);                     \
      *(uint4*)(out + row * t + j0) = o;                                                       \
      if (backward) {                                                                         \
        float d[8];                                                                            \
        _Pragma("unroll") for (int u = 0; u < 8; ++u)                                          \
          d[u] = p[u] * (g[it * 8 + u] - dot) * scale;                                         \
        o.x = (unsigned int)STORE(d[0]) | ((unsigned int)STORE(d[1]) << 16);                   \
        o.y = (unsigned int)STORE(d[2]) | ((unsigned int)STORE(d[3]) << 16);                   \
        o.z = (unsigned int)STORE(d[4]) | ((unsigned int)STORE(d[5]) << 16);                   \
        o.w = (unsigned int)STORE(d[6]) | ((unsigned int)STORE(d[7]) << 16);                   \
        *(uint4*)(out + (rows + row) * t + j0) = o;                                            \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
}
SOFTMAX_WARP(masked_softmax_warp1_bf16, bf16_to_f32, f32_to_bf16, 1)
SOFTMAX_WARP(masked_softmax_warp2_bf16, bf16_to_f32, f32_to_bf16, 2)
SOFTMAX_WARP(masked_softmax_warp4_bf16, bf16_to_f32, f32_to_bf16, 4)
SOFTMAX_WARP(masked_softmax_warp1_f16, f16_to_f32, f32_to_f16, 1)
SOFTMAX_WARP(masked_softmax_warp2_f16, f16_to_f32, f32_to_f16, 2)
SOFTMAX_WARP(masked_softmax_warp4_f16, f16_to_f32, f32_to_f16, 4)
SOFTMAX(masked_softmax_f32, float, f32_id, f32_id)
SOFTMAX(masked_softmax_bf16, u16, bf16_to_f32, f32_to_bf16)
SOFTMAX(masked_softmax_f16, u16, f16_to_f32, f32_to_f16)
