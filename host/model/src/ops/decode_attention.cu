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
// 2026-12-06), and ncu put that form at 13.9 us a layer at batch 1 (2026-12-07); the form with
// four dimensions a thread at 9.8 us (ncu, H100, 2026-12-07).
// Decoding's chain (ops/pdl.cu): with PDL a block waits for the kernel before (rope_append,
// which writes the newest key and value) before its first load.
// Before anything waits, a thread issues the loads it will need first: its first key's row
// (where d <= 64: 8 registers of 16 bytes) and its first DA_VPRE values for the weighted sum,
// so that the K and V reads overlap q's staging, the scores and the softmax instead of
// following them (the form before ran ~4 dependent trips to the L2: q, K, then V twice). The
// sums are the same, in the same order.
#define DA_VPRE 16
// One key's partial dot product over 8 dimensions (qc: q's 8 in f32, w: the key's 8 as 16 bytes).
#define DOT8(LD, QC, KW)                                                                       \
  (QC[0] * LD((u16)(KW.x & 0xffffu)) + QC[1] * LD((u16)(KW.x >> 16))                           \
   + QC[2] * LD((u16)(KW.y & 0xffffu)) + QC[3] * LD((u16)(KW.y >> 16))                         \
   + QC[4] * LD((u16)(KW.z & 0xffffu)) + QC[5] * LD((u16)(KW.z >> 16))                         \
   + QC[6] * LD((u16)(KW.w & 0xffffu)) + QC[7] * LD((u16)(KW.w >> 16)))
// One key's value (VW: 4 dimensions as 8 bytes) weighted by its probability into acc0..acc3.
#define ACC_V(LD, VW, PJ)                                                                      \
  {                                                                                           \
    uint2 w_ = VW;                                                                             \
    float p_ = PJ;                                                                             \
    acc0 += p_ * LD((u16)(w_.x & 0xffffu));                                                    \
    acc1 += p_ * LD((u16)(w_.x >> 16));                                                        \
    acc2 += p_ * LD((u16)(w_.y & 0xffffu));                                                    \
    acc3 += p_ * LD((u16)(w_.y >> 16));                                                        \
  }
#define DECODE_ATTN(NAME, LOAD, STORE)                                                         \
extern "C" __global__ void NAME(const u16* q, const u16* k, const u16* v, const float* mask,  \
    u16* out, int h, int group, int t, int d, long long kb, long long kh, long long vb,        \
    long long vh, int mask_batch, int has_mask, float scale) {                                \
  extern __shared__ float sm[];                                                                \
  __shared__ float red[32];                                                                    \
  GRID_LAUNCH_DEPENDENTS();                                                                    \
  GRID_WAIT();                                                                                 \
  float* qs = sm;                                                                              \
  float* ps = sm + d;                                                                          \
  float* part = ps + t;                                                                        \
  int bh = blockIdx.x, b = bh / h, kvh = (bh % h) / group;                                     \
  const u16* k0 = k + b * kb + kvh * kh;                                                       \
  const u16* v0 = v + b * vb + kvh * vh;                                                       \
  int quarter = d >> 2, groups = blockDim.x / quarter, gi = threadIdx.x / quarter;             \
  int i = 4 * (threadIdx.x % quarter);                                                         \
  bool kp = d <= 64 && (int)threadIdx.x < t;                                                   \
  uint4 kpre[8];                                                                               \
  _Pragma("unroll") for (int c = 0; c < 8; ++c) {                                             \
    kpre[c] = make_uint4(0u, 0u, 0u, 0u);                                                      \
    if (kp && c < (d >> 3)) kpre[c] = __ldg((const uint4*)(k0 + (long long)threadIdx.x * d) + c); \
  }                                                                                           \
  uint2 vpre[DA_VPRE];                                                                         \
  _Pragma("unroll") for (int u = 0; u < DA_VPRE; ++u) {                                       \
    int j = gi + u * groups;                                                                   \
    vpre[u] = make_uint2(0u, 0u);                                                              \
    if (gi < groups && j < t) vpre[u] = __ldg((const uint2*)(v0 + (long long)j * d + i));      \
  }                                                                                           \
  for (int i2 = threadIdx.x; i2 < d; i2 += blockDim.x) qs[i2] = LOAD(q[(long long)bh * d + i2]); \
  __syncthreads();                                                                             \
  const float* mr = has_mask ? mask + (mask_batch == 1 ? 0LL : (long long)b * t) : mask;       \
  float mx = NEG_INF;                                                                          \
  int j0 = threadIdx.x;                                                                        \
  if (kp) {                                                                                   \
    float acc = 0.f;                                                                           \
    _Pragma("unroll") for (int c = 0; c < 8; ++c)                                             \
      if (c < (d >> 3)) acc += DOT8(LOAD, (qs + 8 * c), kpre[c]);                              \
    float s = __fmul_rn(LOAD(STORE(acc)), scale);                                              \
    if (has_mask) s = __fadd_rn(s, mr[j0]);                                                    \
    ps[j0] = s;                                                                                \
    mx = fmaxf(mx, s);                                                                         \
    j0 += blockDim.x;                                                                          \
  }                                                                                           \
  for (int j = j0; j < t; j += blockDim.x) {                                                  \
    const uint4* kr = (const uint4*)(k0 + (long long)j * d);                                   \
    float acc = 0.f;                                                                           \
    _Pragma("unroll 8")                                                                        \
    for (int c = 0; c < (d >> 3); ++c) {                                                      \
      uint4 w = __ldg(kr + c);                                                                 \
      const float* qc = qs + 8 * c;                                                            \
      acc += DOT8(LOAD, qc, w);                                                                \
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
  if (gi < groups) {                                                                          \
    float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;                                      \
    int j = gi;                                                                                \
    _Pragma("unroll") for (int u = 0; u < DA_VPRE; ++u, j += groups) {                        \
      if (j < t) ACC_V(LOAD, vpre[u], ps[j]);                                                  \
    }                                                                                         \
    _Pragma("unroll 8")                                                                        \
    for (; j < t; j += groups) {                                                              \
      ACC_V(LOAD, (*(const uint2*)(v0 + (long long)j * d + i)), ps[j]);                        \
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
