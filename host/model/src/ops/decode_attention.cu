// Attention for one new query a row and head after a cache (ops/decode_attention.rs): the
// eager path's scores, softmax and weighted sum in one launch, one block a (row, head). It
// rounds where the eager path rounds: each score to the 16-bit dtype (the eager matmul's
// output) before scaling and masking, each probability to it (the masked softmax's output)
// before the weighted sum, and the output once; sums are f32 in another order than cuBLAS's.
// Keys and values are read where the cache holds them: rows of d elements (16-byte aligned,
// d % 8 == 0), heads `kh`/`vh` and batch rows `kb`/`vb` elements apart. The loops over keys
// are unrolled: a (row, head) has few threads, and each would otherwise wait out one load's
// latency per key; in the weighted sum a thread takes four adjacent dimensions (one 8-byte load
// a key), so 4 * blockDim / d groups of threads split the keys, quartering each one's chain of
// loads. Two dimensions a thread took 1.3 ms off a step of batch 16's decoding against one (H100,
// 2026-12-06), and ncu put that form at 13.9 us a layer at batch 1 (2026-12-07); this form has
// passed its golden test on an H100 but was not timed alone.
#define DECODE_ATTN(NAME, LOAD, STORE)                                                         \
extern "C" __global__ void NAME(const u16* q, const u16* k, const u16* v, const float* mask,  \
    u16* out, int h, int group, int t, int d, long long kb, long long kh, long long vb,        \
    long long vh, int mask_batch, int has_mask, float scale) {                                \
  extern __shared__ float sm[];                                                                \
  __shared__ float red[32];                                                                    \
  float* qs = sm;                                                                              \
  float* ps = sm + d;                                                                          \
  float* part = ps + t;                                                                        \
  int bh = blockIdx.x, b = bh / h, kvh = (bh % h) / group;                                     \
  for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = LOAD(q[(long long)bh * d + i]);   \
  __syncthreads();                                                                             \
  const u16* k0 = k + b * kb + kvh * kh;                                                       \
  const u16* v0 = v + b * vb + kvh * vh;                                                       \
  const float* mr = has_mask ? mask + (mask_batch == 1 ? 0LL : (long long)b * t) : mask;       \
  float mx = NEG_INF;                                                                          \
  for (int j = threadIdx.x; j < t; j += blockDim.x) {                                         \
    const uint4* kr = (const uint4*)(k0 + (long long)j * d);                                   \
    float acc = 0.f;                                                                           \
    _Pragma("unroll 8")                                                                        \
    for (int c = 0; c < (d >> 3); ++c) {                                                      \
      uint4 w = __ldg(kr + c);                                                                 \
      const float* qc = qs + 8 * c;                                                            \
      acc += qc[0] * LOAD((u16)(w.x & 0xffffu)) + qc[1] * LOAD((u16)(w.x >> 16))               \
           + qc[2] * LOAD((u16)(w.y & 0xffffu)) + qc[3] * LOAD((u16)(w.y >> 16))               \
           + qc[4] * LOAD((u16)(w.z & 0xffffu)) + qc[5] * LOAD((u16)(w.z >> 16))               \
           + qc[6] * LOAD((u16)(w.w & 0xffffu)) + qc[7] * LOAD((u16)(w.w >> 16));              \
    }                                                                                         \
    float s = __fmul_rn(LOAD(STORE(acc)), scale);                                              \
    if (has_mask) s = __fadd_rn(s, mr[j]);                                                     \
    ps[j] = s;                                                                                 \
    mx = fmaxf(mx, s);                                                                         \
  }                                                                                           \
  mx = block_reduce(mx, red, 1);                                                               \
  float sum = 0.f;                                                                             \
  for (int j = threadIdx.x; j < t; j += blockDim.x) sum += expf(ps[j] - mx);                  \
  sum = block_reduce(sum, red, 0);                                                             \
  for (int j = threadIdx.x; j < t; j += blockDim.x) ps[j] = LOAD(STORE(expf(ps[j] - mx) / sum)); \
  __syncthreads();                                                                             \
  int quarter = d >> 2, groups = blockDim.x / quarter, gi = threadIdx.x / quarter;             \
  int i = 4 * (threadIdx.x % quarter);                                                         \
  if (gi < groups) {                                                                          \
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;                                      \
    _Pragma("unroll 8")                                                                        \
    for (int j = gi; j < t; j += groups) {                                                    \
      uint2 w = *(const uint2*)(v0 + (long long)j * d + i);                                    \
      float pj = ps[j];                                                                        \
      acc0 += pj * LOAD((u16)(w.x & 0xffffu));                                                 \
      acc1 += pj * LOAD((u16)(w.x >> 16));                                                     \
      acc2 += pj * LOAD((u16)(w.y & 0xffffu));                                                 \
      acc3 += pj * LOAD((u16)(w.y >> 16));                                                     \
    }                                                                                         \
    part[gi * d + i] = acc0;                                                                   \
    part[gi * d + i + 1] = acc1;                                                               \
    part[gi * d + i + 2] = acc2;                                                               \
    part[gi * d + i + 3] = acc3;                                                               \
  }                                                                                           \
  __syncthreads();                                                                             \
  if (threadIdx.x < d) {                                                                      \
    float o = 0.f;                                                                             \
    for (int g2 = 0; g2 < groups; ++g2) o += part[g2 * d + threadIdx.x];                       \
    out[(long long)bh * d + threadIdx.x] = STORE(o);                                           \
  }                                                                                           \
}
DECODE_ATTN(decode_attn_bf16, bf16_to_f32, f32_to_bf16)
DECODE_ATTN(decode_attn_f16, f16_to_f32, f32_to_f16)
