// Flash attention on the tensor cores (ops/flash.rs): the algorithm of flash.cu, with each
// tile's products (q k^T, p v and backward's five) as mma.sync m16n8k16 in 16-bit inputs and
// f32 sums, for 16-bit q, k, v and heads of exactly D (64 or 128). Compiled for compute_80
// after the prelude, ops/mma.cu (the instruction and its fragments' layout) and
// flash_common.cu.
//
// A block is four warps; each warp owns 16 rows of the side the block holds (queries in the
// forward and dQ kernels, keys in the dK/dV kernel), kept in registers as mma A fragments for
// the whole kernel, and the other side comes through shared memory in tiles, once row-major
// (an operand whose reduction runs along d) and, where a product reduces over the tile's rows,
// once transposed. A score tile's f32 accumulators are laid out as the next product's A
// fragment wants them (lane (g, c) holds rows g and g + 8, columns 2c, 2c + 1 of each 8-column
// tile), so probabilities and dS go from one product to the next in registers, rounded to the
// 16-bit type as FlashAttention rounds them. The online softmax, the log-sum-exp, visibility
// (codes) and ALiBi are flash.cu's; so a result differs from the SIMT kernels' by that
// rounding and the order of sums.

template <bool BF16> struct Half;
template <> struct Half<true> {
  typedef Elem<1> E;
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    return pack_bf16x2(lo, hi);
  }
};
template <> struct Half<false> {
  typedef Elem<2> E;
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    return pack_f16x2(lo, hi);
  }
};

__device__ __forceinline__ unsigned ld32(const u16* p) { return *(const unsigned*)p; }

// Scores are kept in base-2 units, (q k + alibi) * scale * log2(e), so each exponential is one
// ex2 (exp2f) after a subtraction; the log-sum-exp goes out in natural units, as flash.cu's.
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Rows r0 + g and r0 + g + 8 of x ([n, D], row-major) as A fragments, one per 16 columns;
// zeros for rows past n.
template <int D>
__device__ __forceinline__ void load_a(unsigned (*fr)[4], const u16* __restrict__ x, int r0,
                                       int n, int g, int c) {
  const bool in0 = r0 + g < n, in1 = r0 + g + 8 < n;
  const u16* p0 = x + (long long)(r0 + g) * D + 2 * c;
  const u16* p1 = p0 + 8 * D;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    fr[kk][0] = in0 ? ld32(p0 + 16 * kk) : 0u;
    fr[kk][1] = in1 ? ld32(p1 + 16 * kk) : 0u;
    fr[kk][2] = in0 ? ld32(p0 + 16 * kk + 8) : 0u;
    fr[kk][3] = in1 ? ld32(p1 + 16 * kk + 8) : 0u;
  }
}

// Rows r0 .. r0 + ROWS of x ([n, D]) into dst[ROWS][D + 8] (zeros past n), 16 bytes a thread.
// The pad keeps the B-fragment loads below (rows g, columns 2c) on 32 distinct banks.
template <int ROWS, int D>
__device__ __forceinline__ void tile_rows(u16 (*dst)[D + 8], const u16* __restrict__ x, int r0,
                                          int n) {
  constexpr int V = D / 8;
  for (int e = threadIdx.x; e < ROWS * V; e += blockDim.x) {
    const int r = e / V, col = (e % V) * 8;
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r < n) w = *(const uint4*)(x + (long long)(r0 + r) * D + col);
    *(uint4*)&dst[r][col] = w;
  }
}

// The same rows transposed, dst[D][ROWS + 8] (dst[x][r] = row r0 + r's column x): the operand
// of a product that reduces over the rows. A warp's threads take consecutive rows of one
// 8-column group, so each 16-bit store of theirs lands in its own word or shares it.
template <int ROWS, int D>
__device__ __forceinline__ void tile_cols(u16 (*dst)[ROWS + 8], const u16* __restrict__ x, int r0,
                                          int n) {
  for (int e = threadIdx.x; e < ROWS * (D / 8); e += blockDim.x) {
    const int r = e % ROWS, col = (e / ROWS) * 8;
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r < n) w = *(const uint4*)(x + (long long)(r0 + r) * D + col);
    const u16* h = (const u16*)&w;
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[col + i][r] = h[i];
  }
}

// acc[N / 8] (16 x N) += a (16 x 16 K, as KS A fragments) times the rows of t (t[N][K + 8],
// row-major: the B operand is t's rows read as columns, t^T).
template <bool BF16, int KS, int NT, int STRIDE>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const unsigned (*a)[4],
                                         const u16 (*t)[STRIDE], int g, int c) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const u16* row = &t[nt * 8 + g][kk * 16 + 2 * c];
      mma_16816<BF16>(acc[nt], a[kk][0], a[kk][1], a[kk][2], a[kk][3], ld32(row), ld32(row + 8));
    }
  }
}

// acc[NT] (16 x 8 NT) += p (16 x 16 KS, f32 accumulators of a score tile: 2 KS tiles of 8
// columns) rounded to the 16-bit type, times tt[8 NT][16 KS + 8] read as columns (tt is the
// transposed tile of the product's B operand).
template <bool BF16, int KS, int NT, int STRIDE>
__device__ __forceinline__ void mma_scores(float (*acc)[4], const float (*p)[4],
                                           const u16 (*tt)[STRIDE], int g, int c) {
  typedef Half<BF16> H;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const unsigned a0 = H::pack(p[2 * kk][0], p[2 * kk][1]);
    const unsigned a1 = H::pack(p[2 * kk][2], p[2 * kk][3]);
    const unsigned a2 = H::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    const unsigned a3 = H::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const u16* row = &tt[nt * 8 + g][kk * 16 + 2 * c];
      mma_16816<BF16>(acc[nt], a0, a1, a2, a3, ld32(row), ld32(row + 8));
    }
  }
}

// A row's maximum or sum across the four lanes that share it (lanes 4g .. 4g + 3).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// A key tile's visibility codes and ALiBi biases into shared memory, ending the tile load's
// barrier; returns whether the tile is uniform: every key real (below kend) and of one example.
template <int BN>
__device__ __forceinline__ bool load_codes(unsigned* kc, float* ab,
                                           const unsigned* __restrict__ codes,
                                           const float* __restrict__ alibi, int bi, int hi,
                                           int j0, int kend, const Dims& a) {
  const unsigned first = codes[(long long)bi * a.t + j0];
  bool same = first != 0u;
  for (int jj = threadIdx.x; jj < BN; jj += blockDim.x) {
    const int j = j0 + jj;
    kc[jj] = j < kend ? codes[(long long)bi * a.t + j] : 0u;
    ab[jj] = (j < kend && a.has_alibi) ? alibi[((long long)bi * a.h + hi) * a.t + j] : 0.f;
    same = same && kc[jj] == first;
  }
  return __syncthreads_and(same);
}

// A score tile to base-2 units, (s + alibi) * scale * log2(e), and the rows' running maxima;
// outside `full`, scores a row may not see become -inf.
template <int NT>
__device__ __forceinline__ void scale_scores(float (*sc)[4], float* mt, bool full,
                                             const unsigned* kc, const float* ab, int j0,
                                             const int* row, const unsigned* qcode,
                                             const Dims& a) {
  const int c = threadIdx.x & 3;
  const float sl2 = a.scale * LOG2E;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1, jj = nt * 8 + 2 * c + (e & 1), j = j0 + jj;
      const float x = a.has_alibi ? sc[nt][e] + ab[jj] : sc[nt][e];
      const bool vis = full || (j <= a.past + row[r] && kc[jj] != 0u && kc[jj] == qcode[r]);
      sc[nt][e] = vis ? x * sl2 : NEG_INF;
      mt[r] = fmaxf(mt[r], sc[nt][e]);
    }
  }
}

// Forward: out [b, h, s, D] and lse [b, h, s]. Grid (ceil(s / 64), h, b), 128 threads; keys in
// tiles of BN.
template <bool BF16, int D, int BN>
__device__ void flash_mma_fwd(const u16* __restrict__ q, const u16* __restrict__ k,
                              const u16* __restrict__ v, const unsigned* __restrict__ codes,
                              const float* __restrict__ alibi, u16* __restrict__ out,
                              float* __restrict__ lse, Dims a) {
  typedef Half<BF16> H;
  constexpr int KS = D / 16, NT = BN / 8, DT = D / 8;
  __shared__ __align__(16) u16 ks[BN][D + 8];
  __shared__ __align__(16) u16 vt[D][BN + 8];
  __shared__ unsigned kc[BN];
  __shared__ float ab[BN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int bi = blockIdx.z, hi = blockIdx.y, kvi = hi / (a.h / a.kvh);
  const int i0 = blockIdx.x * 64 + warp * 16;
  const long long qbase = ((long long)bi * a.h + hi) * a.s;
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t;
  unsigned qa[KS][4];
  load_a<D>(qa, q + qbase * D, i0, a.s, g, c);
  int row[2] = {i0 + g, i0 + g + 8};
  unsigned qcode[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    qcode[r] = row[r] < a.s ? codes[((long long)a.b + bi) * a.t + a.past + row[r]] : 0u;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  const int last = min(a.s - 1, (int)blockIdx.x * 64 + 63);
  const int kend = min(a.t, a.past + last + 1);
  const int wlast = min(a.s - 1, i0 + 15);
  for (int j0 = 0; j0 < kend; j0 += BN) {
    __syncthreads();
    tile_rows<BN, D>(ks, k + kvbase * D, j0, kend);
    tile_cols<BN, D>(vt, v + kvbase * D, j0, kend);
    const bool uniform = load_codes<BN>(kc, ab, codes, alibi, bi, hi, j0, kend, a);
    // The whole warp's rows precede the tile (or are past s): nothing to add.
    if (i0 >= a.s || j0 > a.past + wlast) continue;
    // Every key of the tile visible to every row of the warp: no per-score test.
    const bool full = uniform && j0 + BN - 1 <= a.past + i0 &&
                      __all_sync(0xffffffffu, row[1] < a.s && qcode[0] == kc[0] &&
                                                  qcode[1] == kc[0]);
    float sc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
    mma_rows<BF16, KS, NT, D + 8>(sc, qa, ks, g, c);
    float mt[2] = {m[0], m[1]};
    scale_scores<NT>(sc, mt, full, kc, ab, j0, row, qcode, a);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mt[r] = quad_max(mt[r]);
      const float corr = mt[r] == NEG_INF ? 1.f : exp2f(m[r] - mt[r]);
      m[r] = mt[r];
      l[r] *= corr;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * r] *= corr;
        o[dt][2 * r + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float p = (full || sc[nt][e] != NEG_INF) ? exp2f(sc[nt][e] - m[r]) : 0.f;
        l[r] += p;
        sc[nt][e] = p;
      }
    }
    mma_scores<BF16, BN / 16, DT, BN + 8>(o, sc, vt, g, c);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lr = quad_sum(l[r]);
    if (row[r] >= a.s) continue;
    const float inv = lr > 0.f ? 1.f / lr : 0.f;
    u16* dst = out + (qbase + row[r]) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *(unsigned*)(dst + dt * 8) = H::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (c == 0) lse[qbase + row[r]] = lr > 0.f ? m[r] * LN2 + __logf(lr) : POS_INF;
  }
}

// dQ [b, h, s, D] and delta = rowsum(dO * O) [b, h, s] (which the dK/dV kernel reads). Grid and
// block as the forward; keys in tiles of BN.
template <bool BF16, int D, int BN>
__device__ void flash_mma_bwd_dq(const u16* __restrict__ q, const u16* __restrict__ k,
                                 const u16* __restrict__ v, const u16* __restrict__ o,
                                 const u16* __restrict__ dout, const float* __restrict__ lse,
                                 const unsigned* __restrict__ codes,
                                 const float* __restrict__ alibi, u16* __restrict__ dq,
                                 float* __restrict__ delta, Dims a) {
  typedef Half<BF16> H;
  typedef typename H::E E;
  constexpr int KS = D / 16, NT = BN / 8, DT = D / 8;
  __shared__ __align__(16) u16 ks[BN][D + 8];
  __shared__ __align__(16) u16 vs[BN][D + 8];
  __shared__ __align__(16) u16 kt[D][BN + 8];
  __shared__ unsigned kc[BN];
  __shared__ float ab[BN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int bi = blockIdx.z, hi = blockIdx.y, kvi = hi / (a.h / a.kvh);
  const int i0 = blockIdx.x * 64 + warp * 16;
  const long long qbase = ((long long)bi * a.h + hi) * a.s;
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t;
  unsigned qa[KS][4], ga[KS][4];
  load_a<D>(qa, q + qbase * D, i0, a.s, g, c);
  load_a<D>(ga, dout + qbase * D, i0, a.s, g, c);
  // delta from the lane's columns of dO (its fragments) and the same columns of O.
  unsigned oa[KS][4];
  load_a<D>(oa, o + qbase * D, i0, a.s, g, c);
  float dl[2] = {0.f, 0.f};
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const unsigned gw = ga[kk][e], ow = oa[kk][e];
      const float lo = E::ld((u16)(gw & 0xffffu)) * E::ld((u16)(ow & 0xffffu));
      const float hi2 = E::ld((u16)(gw >> 16)) * E::ld((u16)(ow >> 16));
      dl[e & 1] += lo + hi2;
    }
  }
  int row[2] = {i0 + g, i0 + g + 8};
  unsigned qcode[2];
  float li2[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    dl[r] = quad_sum(dl[r]);
    const bool in = row[r] < a.s;
    qcode[r] = in ? codes[((long long)a.b + bi) * a.t + a.past + row[r]] : 0u;
    li2[r] = in ? lse[qbase + row[r]] * LOG2E : POS_INF;
    if (in && c == 0) delta[qbase + row[r]] = dl[r];
  }
  float acc[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  const int last = min(a.s - 1, (int)blockIdx.x * 64 + 63);
  const int kend = min(a.t, a.past + last + 1);
  const int wlast = min(a.s - 1, i0 + 15);
  for (int j0 = 0; j0 < kend; j0 += BN) {
    __syncthreads();
    tile_rows<BN, D>(ks, k + kvbase * D, j0, kend);
    tile_rows<BN, D>(vs, v + kvbase * D, j0, kend);
    tile_cols<BN, D>(kt, k + kvbase * D, j0, kend);
    const bool uniform = load_codes<BN>(kc, ab, codes, alibi, bi, hi, j0, kend, a);
    if (i0 >= a.s || j0 > a.past + wlast) continue;
    const bool full = uniform && j0 + BN - 1 <= a.past + i0 &&
                      __all_sync(0xffffffffu, row[1] < a.s && qcode[0] == kc[0] &&
                                                  qcode[1] == kc[0]);
    float sc[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] = dp[nt][e] = 0.f;
    }
    mma_rows<BF16, KS, NT, D + 8>(sc, qa, ks, g, c);
    mma_rows<BF16, KS, NT, D + 8>(dp, ga, vs, g, c);
    float unused[2] = {NEG_INF, NEG_INF};
    scale_scores<NT>(sc, unused, full, kc, ab, j0, row, qcode, a);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        // (A row that sees no key, lse +inf, has every score -inf here: p = 0.)
        const float p = (full || sc[nt][e] != NEG_INF) ? exp2f(sc[nt][e] - li2[r]) : 0.f;
        sc[nt][e] = p * (dp[nt][e] - dl[r]) * a.scale;
      }
    }
    mma_scores<BF16, BN / 16, DT, BN + 8>(acc, sc, kt, g, c);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= a.s) continue;
    u16* dst = dq + (qbase + row[r]) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *(unsigned*)(dst + dt * 8) = H::pack(acc[dt][2 * r], acc[dt][2 * r + 1]);
  }
}

// dK and dV, f32 [b, kvh * chunks, t, D] each: a block sums the gradients of heads_per query
// heads of one KV head's group (chunk blockIdx.y % chunks of it) in registers, and the host
// adds the chunks in order. (One query head a block left a multi-query model's 71 heads to a
// host-side sum of 71 strided rows per element, slower than the kernel itself.) Grid
// (ceil(t / 64), kvh * chunks, b), 128 threads, each warp 16 keys; queries in tiles of BQ, from
// the first that may see the block's first key.
template <bool BF16, int D, int BQ>
__device__ void flash_mma_bwd_dkv(const u16* __restrict__ q, const u16* __restrict__ k,
                                  const u16* __restrict__ v, const u16* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const unsigned* __restrict__ codes,
                                  const float* __restrict__ alibi, float* __restrict__ dk,
                                  float* __restrict__ dv, Dims a, int heads_per) {
  constexpr int KS = D / 16, NT = BQ / 8, DT = D / 8;
  __shared__ __align__(16) u16 qs[BQ][D + 8];
  __shared__ __align__(16) u16 qt[D][BQ + 8];
  __shared__ __align__(16) u16 gs[BQ][D + 8];
  __shared__ __align__(16) u16 gt[D][BQ + 8];
  __shared__ float ls[BQ], dls[BQ];  // ls: the log-sum-exps in base-2 units
  __shared__ unsigned qc[BQ];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int group = a.h / a.kvh, chunks = gridDim.y / a.kvh;
  const int bi = blockIdx.z, kvi = blockIdx.y / chunks;
  const int h0 = kvi * group + (blockIdx.y % chunks) * heads_per;
  const int h1 = min(h0 + heads_per, (kvi + 1) * group);
  const int j0 = blockIdx.x * 64 + warp * 16;
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t;
  unsigned ka[KS][4], va[KS][4];
  load_a<D>(ka, k + kvbase * D, j0, a.t, g, c);
  load_a<D>(va, v + kvbase * D, j0, a.t, g, c);
  int key[2] = {j0 + g, j0 + g + 8};
  unsigned kcode[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) kcode[r] = key[r] < a.t ? codes[(long long)bi * a.t + key[r]] : 0u;
  float gk[DT][4], gv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) gk[dt][e] = gv[dt][e] = 0.f;
  }
  const float sl2 = a.scale * LOG2E;
  // Queries at absolute positions >= the block's first key: i >= first key - past.
  const int first = max(0, (int)blockIdx.x * 64 - a.past);
  for (int hi = h0; hi < h1; ++hi) {
    const long long qbase = ((long long)bi * a.h + hi) * a.s;
    float al[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      al[r] = (key[r] < a.t && a.has_alibi) ? alibi[((long long)bi * a.h + hi) * a.t + key[r]]
                                            : 0.f;
    for (int i0 = first; i0 < a.s; i0 += BQ) {
      __syncthreads();
      tile_rows<BQ, D>(qs, q + qbase * D, i0, a.s);
      tile_cols<BQ, D>(qt, q + qbase * D, i0, a.s);
      tile_rows<BQ, D>(gs, dout + qbase * D, i0, a.s);
      tile_cols<BQ, D>(gt, dout + qbase * D, i0, a.s);
      const unsigned first_code = codes[((long long)a.b + bi) * a.t + a.past + i0];
      bool same = first_code != 0u;
      for (int ii = threadIdx.x; ii < BQ; ii += blockDim.x) {
        const int i = i0 + ii;
        const bool in = i < a.s;
        ls[ii] = in ? lse[qbase + i] * LOG2E : POS_INF;
        dls[ii] = in ? delta[qbase + i] : 0.f;
        qc[ii] = in ? codes[((long long)a.b + bi) * a.t + a.past + i] : 0u;
        same = same && qc[ii] == first_code;
      }
      // Every query of the tile real and of one example.
      const bool uniform = __syncthreads_and(same);
      // The warp's keys are past the tile's last query (or past t): nothing to add.
      if (j0 >= a.t || j0 > a.past + min(a.s - 1, i0 + BQ - 1)) continue;
      // Every query of the tile sees every key of the warp.
      const bool full = uniform && j0 + 15 <= a.past + i0 &&
                        __all_sync(0xffffffffu, key[1] < a.t && kcode[0] == first_code &&
                                                    kcode[1] == first_code);
      float st[NT][4], dpt[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
      }
      mma_rows<BF16, KS, NT, D + 8>(st, ka, qs, g, c);
      mma_rows<BF16, KS, NT, D + 8>(dpt, va, gs, g, c);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, ii = nt * 8 + 2 * c + (e & 1), i = i0 + ii;
          const bool vis = full || (key[r] <= a.past + i && kcode[r] != 0u &&
                                    kcode[r] == qc[ii] && ls[ii] != POS_INF);
          const float p = vis ? exp2f(fmaf(st[nt][e] + al[r], sl2, -ls[ii])) : 0.f;
          st[nt][e] = p;
          dpt[nt][e] = p * (dpt[nt][e] - dls[ii]) * a.scale;
        }
      }
      mma_scores<BF16, BQ / 16, DT, BQ + 8>(gv, st, gt, g, c);
      mma_scores<BF16, BQ / 16, DT, BQ + 8>(gk, dpt, qt, g, c);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= a.t) continue;
    const long long orow = (((long long)bi * gridDim.y + blockIdx.y) * a.t + key[r]) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *(float2*)(dk + orow + dt * 8) = make_float2(gk[dt][2 * r], gk[dt][2 * r + 1]);
      *(float2*)(dv + orow + dt * 8) = make_float2(gv[dt][2 * r], gv[dt][2 * r + 1]);
    }
  }
}

// The entry points, bf16 and f16, the parameters of flash.cu's of the same name.
#define FLASH_MMA_ENTRIES(SUFFIX, BF16, D, BN, BQ)                                              \
  extern "C" __global__ void __launch_bounds__(128)                                             \
      flash_mma_fwd_##SUFFIX##_##D(const u16* q, const u16* k, const u16* v,                    \
                                   const unsigned* codes, const float* alibi, u16* out,          \
                                   float* lse, DIMS_PARAMS) {                                    \
    flash_mma_fwd<BF16, D, 64>(q, k, v, codes, alibi, out, lse, DIMS_VALUE);                    \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(128) flash_mma_bwd_dq_##SUFFIX##_##D(           \
      const u16* q, const u16* k, const u16* v, const u16* o, const u16* dout, const float* lse, \
      const unsigned* codes, const float* alibi, u16* dq, float* delta, DIMS_PARAMS) {          \
    flash_mma_bwd_dq<BF16, D, BN>(q, k, v, o, dout, lse, codes, alibi, dq, delta, DIMS_VALUE);  \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(128) flash_mma_bwd_dkv_##SUFFIX##_##D(          \
      const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse,              \
      const float* delta, const unsigned* codes, const float* alibi, float* dk, float* dv,      \
      DIMS_PARAMS, int heads_per) {                                                             \
    flash_mma_bwd_dkv<BF16, D, BQ>(q, k, v, dout, lse, delta, codes, alibi, dk, dv,             \
                                   DIMS_VALUE, heads_per);                                      \
  }

// Per head size: the dQ kernel's key tile BN and the dK/dV kernel's query tile BQ, kept under
// 48 KB of static shared memory (the forward's key tile is 64 for both).
#if FLASH_DMAX == 64
FLASH_MMA_ENTRIES(bf16, true, 64, 64, 64)
FLASH_MMA_ENTRIES(f16, false, 64, 64, 64)
#elif FLASH_DMAX == 128
FLASH_MMA_ENTRIES(bf16, true, 128, 32, 32)
FLASH_MMA_ENTRIES(f16, false, 128, 32, 32)
#else
#error "the tensor-core flash kernels serve FLASH_DMAX 64 or 128"
#endif
