// Flash attention, forward and backward (ops/flash.rs): the [b, h, s, t] scores are never
// stored. One thread owns one query row (forward, dQ) or one key row (dK, dV); the other side
// comes through shared memory in tiles that every thread of the block reads at the same
// address (a broadcast). The arithmetic is f32 on the CUDA cores: a first, checkable version
// of the algorithm the CPU twin in flash.rs runs, tile for tile. In a 16-bit type each
// probability and each dS is rounded to it before the product it enters (E::ld(E::st(x))),
// as the tensor-core kernels (flash_mma.cu) and FlashAttention round them.
//
// Who sees whom (codes, u32 [2, b, t]): key j is visible to the query at absolute position
// p = past + i when j <= p, codes[0][b][j] != 0 (a real key) and codes[0][b][j] ==
// codes[1][b][p] (the same packed example). A query that sees no key gets a zero output and a
// log-sum-exp of +inf, so its backward contributes nothing.
//
// Compiled with NVRTC after the shared prelude (ops/prelude.cu) and flash_common.cu.

// Keys j0 .. j0 + BN of a block's KV head into shared memory (zeros past kend or d), with
// their visibility codes and ALiBi biases, between two barriers: the forward and dQ kernels'
// one way of reading keys.
template <int KIND, int DMAX, int BN>
__device__ __forceinline__ void load_key_tile(const typename Elem<KIND>::T* __restrict__ k,
                                              const typename Elem<KIND>::T* __restrict__ v,
                                              const unsigned* __restrict__ codes,
                                              const float* __restrict__ alibi, float (*ks)[DMAX],
                                              float (*vs)[DMAX], unsigned* kc, float* ab,
                                              long long kvbase, int j0, int kend, int bi, int hi,
                                              const Dims& a) {
  typedef Elem<KIND> E;
  __syncthreads();
  for (int e = threadIdx.x; e < BN * DMAX; e += blockDim.x) {
    const int jj = e / DMAX, x = e % DMAX, j = j0 + jj;
    const bool in = j < kend && x < a.d;
    ks[jj][x] = in ? E::ld(k[kvbase + (long long)j * a.d + x]) : 0.f;
    vs[jj][x] = in ? E::ld(v[kvbase + (long long)j * a.d + x]) : 0.f;
  }
  for (int jj = threadIdx.x; jj < BN; jj += blockDim.x) {
    const int j = j0 + jj;
    kc[jj] = j < kend ? codes[(long long)bi * a.t + j] : 0u;
    ab[jj] = (j < kend && a.has_alibi) ? alibi[((long long)bi * a.h + hi) * a.t + j] : 0.f;
  }
  __syncthreads();
}

// Output rows [b, h, s, d] and the log-sum-exp [b, h, s] of softmax((q k^T + alibi) * scale)
// over the visible keys. Grid: (ceil(s / BM), h, b), BM threads.
template <int KIND, int DMAX, int BN>
__device__ void flash_fwd(const typename Elem<KIND>::T* __restrict__ q,
                          const typename Elem<KIND>::T* __restrict__ k,
                          const typename Elem<KIND>::T* __restrict__ v,
                          const unsigned* __restrict__ codes, const float* __restrict__ alibi,
                          typename Elem<KIND>::T* __restrict__ out, float* __restrict__ lse,
                          Dims a) {
  typedef Elem<KIND> E;
  __shared__ float ks[BN][DMAX];
  __shared__ float vs[BN][DMAX];
  __shared__ unsigned kc[BN];
  __shared__ float ab[BN];
  const int bi = blockIdx.z, hi = blockIdx.y;
  const int kvi = hi / (a.h / a.kvh);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = i < a.s;
  const long long row = ((long long)bi * a.h + hi) * a.s + i;
  float qr[DMAX], acc[DMAX];
#pragma unroll
  for (int x = 0; x < DMAX; ++x) {
    qr[x] = (active && x < a.d) ? E::ld(q[row * a.d + x]) : 0.f;
    acc[x] = 0.f;
  }
  const unsigned qcode = active ? codes[((long long)a.b + bi) * a.t + a.past + i] : 0u;
  const int last = min(a.s - 1, (int)(blockIdx.x * blockDim.x + blockDim.x - 1));
  const int kend = min(a.t, a.past + last + 1);
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t * a.d;
  float m = NEG_INF, l = 0.f;
  for (int j0 = 0; j0 < kend; j0 += BN) {
    load_key_tile<KIND, DMAX, BN>(k, v, codes, alibi, ks, vs, kc, ab, kvbase, j0, kend, bi, hi, a);
    if (!active) continue;
    float sc[BN];
    float mt = m;
#pragma unroll
    for (int jj = 0; jj < BN; ++jj) {
      const int j = j0 + jj;
      const bool vis = j <= a.past + i && kc[jj] != 0u && kc[jj] == qcode;
      float dot = 0.f;
#pragma unroll
      for (int x = 0; x < DMAX; ++x) dot = fmaf(qr[x], ks[jj][x], dot);
      sc[jj] = vis ? (dot + ab[jj]) * a.scale : NEG_INF;
      mt = fmaxf(mt, sc[jj]);
    }
    if (mt == NEG_INF) continue;
    const float corr = __expf(m - mt);
    l *= corr;
#pragma unroll
    for (int x = 0; x < DMAX; ++x) acc[x] *= corr;
#pragma unroll
    for (int jj = 0; jj < BN; ++jj) {
      const float p = sc[jj] == NEG_INF ? 0.f : __expf(sc[jj] - mt);
      l += p;
      const float pr = E::ld(E::st(p));
#pragma unroll
      for (int x = 0; x < DMAX; ++x) acc[x] = fmaf(pr, vs[jj][x], acc[x]);
    }
    m = mt;
  }
  if (!active) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int x = 0; x < DMAX; ++x)
    if (x < a.d) out[row * a.d + x] = E::st(acc[x] * inv);
  lse[row] = l > 0.f ? m + __logf(l) : POS_INF;
}

// dQ [b, h, s, d] and delta = rowsum(dO * O) [b, h, s] (which the dK/dV kernel reads).
// Grid and block as the forward.
template <int KIND, int DMAX, int BN>
__device__ void flash_bwd_dq(const typename Elem<KIND>::T* __restrict__ q,
                             const typename Elem<KIND>::T* __restrict__ k,
                             const typename Elem<KIND>::T* __restrict__ v,
                             const typename Elem<KIND>::T* __restrict__ o,
                             const typename Elem<KIND>::T* __restrict__ dout,
                             const float* __restrict__ lse, const unsigned* __restrict__ codes,
                             const float* __restrict__ alibi, typename Elem<KIND>::T* __restrict__ dq,
                             float* __restrict__ delta, Dims a) {
  typedef Elem<KIND> E;
  __shared__ float ks[BN][DMAX];
  __shared__ float vs[BN][DMAX];
  __shared__ unsigned kc[BN];
  __shared__ float ab[BN];
  const int bi = blockIdx.z, hi = blockIdx.y;
  const int kvi = hi / (a.h / a.kvh);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = i < a.s;
  const long long row = ((long long)bi * a.h + hi) * a.s + i;
  float qr[DMAX], gr[DMAX], acc[DMAX];
  float dl = 0.f;
#pragma unroll
  for (int x = 0; x < DMAX; ++x) {
    const bool in = active && x < a.d;
    qr[x] = in ? E::ld(q[row * a.d + x]) : 0.f;
    gr[x] = in ? E::ld(dout[row * a.d + x]) : 0.f;
    if (in) dl = fmaf(gr[x], E::ld(o[row * a.d + x]), dl);
    acc[x] = 0.f;
  }
  const float li = active ? lse[row] : POS_INF;
  if (active) delta[row] = dl;
  const unsigned qcode = active ? codes[((long long)a.b + bi) * a.t + a.past + i] : 0u;
  const int last = min(a.s - 1, (int)(blockIdx.x * blockDim.x + blockDim.x - 1));
  const int kend = min(a.t, a.past + last + 1);
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t * a.d;
  for (int j0 = 0; j0 < kend; j0 += BN) {
    load_key_tile<KIND, DMAX, BN>(k, v, codes, alibi, ks, vs, kc, ab, kvbase, j0, kend, bi, hi, a);
    if (!active || li == POS_INF) continue;
    for (int jj = 0; jj < BN; ++jj) {
      const int j = j0 + jj;
      if (!(j <= a.past + i && kc[jj] != 0u && kc[jj] == qcode)) continue;
      float dot = 0.f, dp = 0.f;
#pragma unroll
      for (int x = 0; x < DMAX; ++x) {
        dot = fmaf(qr[x], ks[jj][x], dot);
        dp = fmaf(gr[x], vs[jj][x], dp);
      }
      const float p = __expf((dot + ab[jj]) * a.scale - li);
      const float ds = E::ld(E::st(p * (dp - dl) * a.scale));
#pragma unroll
      for (int x = 0; x < DMAX; ++x) acc[x] = fmaf(ds, ks[jj][x], acc[x]);
    }
  }
  if (!active) return;
#pragma unroll
  for (int x = 0; x < DMAX; ++x)
    if (x < a.d) dq[row * a.d + x] = E::st(acc[x]);
}

// dK and dV of one query head, f32 [b, h, t, d] each (the host sums each KV head's group).
// One thread a key row; the block's keys and values sit in shared memory, one padded row per
// thread; queries, their output gradients, log-sum-exps and deltas come in tiles of BM.
// Grid: (ceil(t / TK), h, b), TK threads.
template <int KIND, int DMAX, int TK, int BM>
__device__ void flash_bwd_dkv(const typename Elem<KIND>::T* __restrict__ q,
                              const typename Elem<KIND>::T* __restrict__ k,
                              const typename Elem<KIND>::T* __restrict__ v,
                              const typename Elem<KIND>::T* __restrict__ dout,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              const unsigned* __restrict__ codes, const float* __restrict__ alibi,
                              float* __restrict__ dk, float* __restrict__ dv, Dims a) {
  typedef Elem<KIND> E;
  __shared__ float kr[TK][DMAX + 1];
  __shared__ float vr[TK][DMAX + 1];
  __shared__ float qs[BM][DMAX];
  __shared__ float gs[BM][DMAX];
  __shared__ float ls[BM], ds_[BM];
  __shared__ unsigned qc[BM];
  const int bi = blockIdx.z, hi = blockIdx.y;
  const int kvi = hi / (a.h / a.kvh);
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = j < a.t;
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t * a.d;
  for (int x = 0; x < DMAX; ++x) {
    const bool in = active && x < a.d;
    kr[threadIdx.x][x] = in ? E::ld(k[kvbase + (long long)j * a.d + x]) : 0.f;
    vr[threadIdx.x][x] = in ? E::ld(v[kvbase + (long long)j * a.d + x]) : 0.f;
  }
  const unsigned kcode = active ? codes[(long long)bi * a.t + j] : 0u;
  const float al = (active && a.has_alibi) ? alibi[((long long)bi * a.h + hi) * a.t + j] : 0.f;
  float gk[DMAX], gv[DMAX];
#pragma unroll
  for (int x = 0; x < DMAX; ++x) gk[x] = gv[x] = 0.f;
  // Queries at absolute positions >= this block's first key: i >= j0 - past.
  const int first = max(0, (int)(blockIdx.x * blockDim.x) - a.past);
  const long long qbase = ((long long)bi * a.h + hi) * a.s;
  for (int i0 = first; i0 < a.s; i0 += BM) {
    __syncthreads();
    for (int e = threadIdx.x; e < BM * DMAX; e += blockDim.x) {
      const int ii = e / DMAX, x = e % DMAX, i = i0 + ii;
      const bool in = i < a.s && x < a.d;
      qs[ii][x] = in ? E::ld(q[(qbase + i) * a.d + x]) : 0.f;
      gs[ii][x] = in ? E::ld(dout[(qbase + i) * a.d + x]) : 0.f;
    }
    for (int ii = threadIdx.x; ii < BM; ii += blockDim.x) {
      const int i = i0 + ii;
      const bool in = i < a.s;
      ls[ii] = in ? lse[qbase + i] : POS_INF;
      ds_[ii] = in ? delta[qbase + i] : 0.f;
      qc[ii] = in ? codes[((long long)a.b + bi) * a.t + a.past + i] : 0u;
    }
    __syncthreads();
    if (!active || kcode == 0u) continue;
    for (int ii = 0; ii < BM; ++ii) {
      const int i = i0 + ii;
      if (i >= a.s || j > a.past + i || qc[ii] != kcode || ls[ii] == POS_INF) continue;
      float dot = 0.f, dp = 0.f;
#pragma unroll
      for (int x = 0; x < DMAX; ++x) {
        dot = fmaf(qs[ii][x], kr[threadIdx.x][x], dot);
        dp = fmaf(gs[ii][x], vr[threadIdx.x][x], dp);
      }
      const float p = __expf((dot + al) * a.scale - ls[ii]);
      const float g = E::ld(E::st(p * (dp - ds_[ii]) * a.scale));
      const float pr = E::ld(E::st(p));
#pragma unroll
      for (int x = 0; x < DMAX; ++x) {
        gv[x] = fmaf(pr, gs[ii][x], gv[x]);
        gk[x] = fmaf(g, qs[ii][x], gk[x]);
      }
    }
  }
  if (!active) return;
  const long long orow = (((long long)bi * a.h + hi) * a.t + j) * a.d;
#pragma unroll
  for (int x = 0; x < DMAX; ++x) {
    if (x < a.d) {
      dk[orow + x] = gk[x];
      dv[orow + x] = gv[x];
    }
  }
}

// The forward pass for a few queries a head (decoding: one new token after a cache): one warp
// a query row, its lanes taking every 32nd key with an online softmax each, merged across the
// warp at the end. The row-per-thread kernel would leave all but one thread of a block idle.
// Grid: ceil(b * h * s / 4) blocks of 4 warps. Same outputs as flash_fwd.
template <int KIND, int DMAX>
__device__ void flash_decode(const typename Elem<KIND>::T* __restrict__ q,
                             const typename Elem<KIND>::T* __restrict__ k,
                             const typename Elem<KIND>::T* __restrict__ v,
                             const unsigned* __restrict__ codes, const float* __restrict__ alibi,
                             typename Elem<KIND>::T* __restrict__ out, float* __restrict__ lse,
                             Dims a) {
  typedef Elem<KIND> E;
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= (long long)a.b * a.h * a.s) return;
  const int i = (int)(row % a.s);
  const int hi = (int)((row / a.s) % a.h);
  const int bi = (int)(row / ((long long)a.s * a.h));
  const int kvi = hi / (a.h / a.kvh);
  const int query = a.past + i;
  float qr[DMAX], acc[DMAX];
#pragma unroll
  for (int x = 0; x < DMAX; ++x) {
    qr[x] = x < a.d ? E::ld(q[row * a.d + x]) : 0.f;
    acc[x] = 0.f;
  }
  const unsigned qcode = codes[((long long)a.b + bi) * a.t + query];
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t * a.d;
  const int kend = min(a.t, query + 1);
  float m = NEG_INF, l = 0.f;
  for (int j = lane; j < kend; j += 32) {
    const unsigned kc = codes[(long long)bi * a.t + j];
    if (kc == 0u || kc != qcode) continue;
    const typename E::T* kr = k + kvbase + (long long)j * a.d;
    const typename E::T* vr = v + kvbase + (long long)j * a.d;
    float dot = 0.f;
#pragma unroll
    for (int x = 0; x < DMAX; ++x)
      if (x < a.d) dot = fmaf(qr[x], E::ld(kr[x]), dot);
    const float bias = a.has_alibi ? alibi[((long long)bi * a.h + hi) * a.t + j] : 0.f;
    const float sc = (dot + bias) * a.scale;
    const float mn = fmaxf(m, sc);
    const float corr = __expf(m - mn);
    const float p = __expf(sc - mn);
    l = l * corr + p;
    const float pr = E::ld(E::st(p));
#pragma unroll
    for (int x = 0; x < DMAX; ++x)
      if (x < a.d) acc[x] = fmaf(pr, E::ld(vr[x]), acc[x] * corr);
    m = mn;
  }
  // Merge the lanes' partial softmaxes: rescale each to the warp's maximum, then sum.
  const float mw = warp_max(m);
  const float w = (m == NEG_INF) ? 0.f : __expf(m - mw);
  const float lw = warp_sum(l * w);
  const float inv = lw > 0.f ? 1.f / lw : 0.f;
#pragma unroll
  for (int x = 0; x < DMAX; ++x) {
    const float sum = warp_sum(acc[x] * w);
    if (x < a.d && lane == (x & 31)) out[row * a.d + x] = E::st(sum * inv);
  }
  if (lane == 0) lse[row] = lw > 0.f ? mw + __logf(lw) : POS_INF;
}

// The entry points: f32, bf16 and f16 for head dims up to 32, 64 and 128 (a head of d is
// served by the smallest DMAX >= d).
#define FLASH_ENTRIES(SUFFIX, KIND, DMAX, BN, TK, BM)                                          \
  extern "C" __global__ void flash_fwd_##SUFFIX##_##DMAX(                                      \
      const Elem<KIND>::T* q, const Elem<KIND>::T* k, const Elem<KIND>::T* v,                   \
      const unsigned* codes, const float* alibi, Elem<KIND>::T* out, float* lse,               \
      DIMS_PARAMS) {                                                                           \
    flash_fwd<KIND, DMAX, BN>(q, k, v, codes, alibi, out, lse, DIMS_VALUE);                    \
  }                                                                                            \
  extern "C" __global__ void flash_decode_##SUFFIX##_##DMAX(                                   \
      const Elem<KIND>::T* q, const Elem<KIND>::T* k, const Elem<KIND>::T* v,                   \
      const unsigned* codes, const float* alibi, Elem<KIND>::T* out, float* lse,               \
      DIMS_PARAMS) {                                                                           \
    flash_decode<KIND, DMAX>(q, k, v, codes, alibi, out, lse, DIMS_VALUE);                     \
  }                                                                                            \
  extern "C" __global__ void flash_bwd_dq_##SUFFIX##_##DMAX(                                   \
      const Elem<KIND>::T* q, const Elem<KIND>::T* k, const Elem<KIND>::T* v,                   \
      const Elem<KIND>::T* o, const Elem<KIND>::T* dout, const float* lse,                      \
      const unsigned* codes, const float* alibi, Elem<KIND>::T* dq, float* delta,              \
      DIMS_PARAMS) {                                                                           \
    flash_bwd_dq<KIND, DMAX, BN>(q, k, v, o, dout, lse, codes, alibi, dq, delta, DIMS_VALUE);  \
  }                                                                                            \
  extern "C" __global__ void flash_bwd_dkv_##SUFFIX##_##DMAX(                                  \
      const Elem<KIND>::T* q, const Elem<KIND>::T* k, const Elem<KIND>::T* v,                   \
      const Elem<KIND>::T* dout, const float* lse, const float* delta, const unsigned* codes,  \
      const float* alibi, float* dk, float* dv, DIMS_PARAMS) {                                 \
    flash_bwd_dkv<KIND, DMAX, TK, BM>(q, k, v, dout, lse, delta, codes, alibi, dk, dv,         \
                                      DIMS_VALUE);                                             \
  }

// Per head size: key tile BN (forward, dQ), threads TK and query tile BM (dK/dV), kept under
// 48 KB of static shared memory.
#define FLASH_DTYPES(DMAX, BN, TK, BM)    \
  FLASH_ENTRIES(f32, 0, DMAX, BN, TK, BM) \
  FLASH_ENTRIES(bf16, 1, DMAX, BN, TK, BM) \
  FLASH_ENTRIES(f16, 2, DMAX, BN, TK, BM)

// One head size per NVRTC module (the host defines FLASH_DMAX), so a model compiles only
// the kernels it runs.
#if FLASH_DMAX == 32
FLASH_DTYPES(32, 32, 64, 16)
#elif FLASH_DMAX == 64
FLASH_DTYPES(64, 32, 64, 16)
#elif FLASH_DMAX == 128
FLASH_DTYPES(128, 16, 32, 8)
#else
#error "FLASH_DMAX must be 32, 64 or 128"
#endif
