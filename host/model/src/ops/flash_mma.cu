// Flash attention on the tensor cores (ops/flash.rs): the algorithm of flash.cu, with each
// tile's products (q k^T, p v and backward's five) as mma.sync m16n8k16 in 16-bit inputs and
// f32 sums, for 16-bit q, k, v and heads of exactly D (64 or 128). Compiled for compute_80
// after the prelude, ops/mma.cu (the instruction and its fragments' layout) and
// flash_common.cu.
//
// A block is four warps; each warp owns 16 rows of the side the block holds (queries in the
// forward and dQ kernels, keys in the dK/dV kernel), kept in registers as mma A fragments for
// the whole kernel, and the other side comes through shared memory in row-major tiles, two
// buffers of them: the next tile's asynchronous copies (cp.async) land while the warps compute
// on the current one. B operands are read with ldmatrix, transposed where a product reduces
// over the tile's rows, so no tile is stored twice. (The first form of these kernels loaded
// each tile synchronously and stored a transposed copy with 16-bit stores.) A score tile's
// f32 accumulators are laid out as the next product's A fragment wants them (lane (g, c) holds
// rows g and g + 8, columns 2c, 2c + 1 of each 8-column tile), so probabilities and dS go from one product to the next in registers, rounded to the
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

// Rows r0 .. r0 + ROWS of x ([n, D]) into dst[ROWS][D + 8] (zeros past n), 16 bytes a thread,
// as asynchronous copies (the caller commits and waits). The pad puts the 8 rows of each
// ldmatrix on distinct banks.
template <int ROWS, int D>
__device__ __forceinline__ void tile_rows(u16 (*dst)[D + 8], const u16* __restrict__ x, int r0,
                                          int n) {
  constexpr int V = D / 8;
  for (int e = threadIdx.x; e < ROWS * V; e += blockDim.x) {
    const int r = e / V, col = (e % V) * 8;
    const bool in = r0 + r < n;
    cp_async16(&dst[r][col], x + (long long)(in ? r0 + r : 0) * D + col, in);
  }
}

// words[i] = src[i] for i < n, zeros past it, as asynchronous copies: a tile's codes, biases,
// log-sum-exps or deltas.
template <int N>
__device__ __forceinline__ void tile_words(void* words, const void* src, int n) {
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const bool in = i < n;
    cp_async4((unsigned*)words + i, (const unsigned*)src + (in ? i : 0), in);
  }
}

// Whether a tile's N codes are all one example's (nonzero: every position real), for the warp.
template <int N>
__device__ __forceinline__ bool uniform_codes(const unsigned* codes) {
  const unsigned first = codes[0];
  bool same = first != 0u;
  for (int i = threadIdx.x & 31; i < N; i += 32) same = same && codes[i] == first;
  return __all_sync(0xffffffffu, same);
}

// acc[NT] (16 x 8 NT) += a (16 x 16 KS, as KS A fragments) times t^T, t[8 NT][16 KS + pad]
// row-major (a B operand whose reduction runs along t's rows: ldmatrix as stored).
template <bool BF16, int KS, int NT, int STRIDE>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const unsigned (*a)[4],
                                         const u16 (*t)[STRIDE], int lane) {
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      unsigned b[4];
      ldsm_x4(b, &t[(nt + (mi >> 1)) * 8 + r][kk * 16 + (mi & 1) * 8]);
      mma_16816<BF16>(acc[nt], a[kk][0], a[kk][1], a[kk][2], a[kk][3], b[0], b[1]);
      mma_16816<BF16>(acc[nt + 1], a[kk][0], a[kk][1], a[kk][2], a[kk][3], b[2], b[3]);
    }
  }
}

// acc[NT] (16 x 8 NT) += p (16 x 16 KS, f32 accumulators of a score tile: 2 KS tiles of 8
// columns) rounded to the 16-bit type, times s[16 KS][8 NT + pad] (row-major, the product
// reducing over its rows: ldmatrix transposed).
template <bool BF16, int KS, int NT, int STRIDE>
__device__ __forceinline__ void mma_scores(float (*acc)[4], const float (*p)[4],
                                           const u16 (*s)[STRIDE], int lane) {
  typedef Half<BF16> H;
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const unsigned a0 = H::pack(p[2 * kk][0], p[2 * kk][1]);
    const unsigned a1 = H::pack(p[2 * kk][2], p[2 * kk][3]);
    const unsigned a2 = H::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    const unsigned a3 = H::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      unsigned b[4];
      ldsm_x4_t(b, &s[kk * 16 + (mi & 1) * 8 + r][(nt + (mi >> 1)) * 8]);
      mma_16816<BF16>(acc[nt], a0, a1, a2, a3, b[0], b[1]);
      mma_16816<BF16>(acc[nt + 1], a0, a1, a2, a3, b[2], b[3]);
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

// The double-buffered walk each kernel makes over its tiles: fetch(it, buf) issues tile it's
// asynchronous copies into buffer buf and commits them; start() runs while tile 0 loads;
// body(it, buf) computes on tile it once every thread's copies of it have landed, while tile
// it + 1 loads into the other buffer.
template <class Fetch, class Start, class Body>
__device__ __forceinline__ void walk_tiles(int tiles, Fetch fetch, Start start, Body body) {
  if (tiles > 0) fetch(0, 0);
  start();
  for (int it = 0; it < tiles; ++it) {
    const int cur = it & 1;
    if (it + 1 < tiles) {
      fetch(it + 1, cur ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    body(it, cur);
    // The next round's copies go to the buffer this one read.
    __syncthreads();
  }
}

// The block's place in its grid. In launch order (the hardware starts blocks x fastest) the row
// block is x; in the order of most work first, the row block is the slowest index and the
// longest first: the causal grid's long blocks (the last queries in the dQ kernel, the first keys
// in the dK/dV kernel, which see the most of the other side, 2 blocks a multiprocessor there at
// 236 registers) no longer start in every wave and end the grid on a tail of them. The same
// blocks and sums either way; only when each starts changes. On an H100 (2026-12-07, 08:13 UTC,
// bench attention, Falcon-7B's layer at 8 x 512) most work first took a layer's forward and
// backward from 2,575.9 to 2,509.0 us but the forward alone from 195.9 to 213.6: the backward
// kernels take it, the forward keeps launch order.
struct BlockPlace {
  int row_block, y, z;
};
__device__ __forceinline__ BlockPlace block_place(bool longest_first, bool last_rows_longest) {
  BlockPlace p;
  if (!longest_first) {
    p.row_block = blockIdx.x;
    p.y = blockIdx.y;
    p.z = blockIdx.z;
    return p;
  }
  const unsigned per = gridDim.y * gridDim.z;
  const unsigned lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned rb = lin / per, rest = lin % per;
  p.row_block = last_rows_longest ? (int)(gridDim.x - 1 - rb) : (int)rb;
  p.y = (int)(rest % gridDim.y);
  p.z = (int)(rest / gridDim.y);
  return p;
}

// A forward or dQ block: 64 queries of one head (16 a warp, rows g and g + 8 of the lane) and
// the keys they may see, below kend.
struct QueryBlock {
  int lane, g, c, bi, hi, i0, wlast, kend;
  int row[2];
  unsigned qcode[2];
  long long qbase;
  const u16 *k, *v;        // the KV head's rows
  const unsigned* kcodes;  // the example's key codes
  const float* alibi;      // the head's biases
};

template <int D>
__device__ __forceinline__ QueryBlock query_block(const Dims& a, const u16* k, const u16* v,
                                                  const unsigned* codes, const float* alibi,
                                                  bool longest_first) {
  QueryBlock qb;
  qb.lane = threadIdx.x & 31;
  qb.g = qb.lane >> 2;
  qb.c = qb.lane & 3;
  const BlockPlace place = block_place(longest_first, true);
  qb.bi = place.z;
  qb.hi = place.y;
  qb.i0 = place.row_block * 64 + (threadIdx.x >> 5) * 16;
  qb.wlast = min(a.s - 1, qb.i0 + 15);
  qb.kend = min(a.t, a.past + min(a.s - 1, place.row_block * 64 + 63) + 1);
  qb.qbase = ((long long)qb.bi * a.h + qb.hi) * a.s;
  const long long kvbase = ((long long)qb.bi * a.kvh + qb.hi / (a.h / a.kvh)) * a.t;
  qb.k = k + kvbase * D;
  qb.v = v + kvbase * D;
  qb.kcodes = codes + (long long)qb.bi * a.t;
  qb.alibi = alibi + ((long long)qb.bi * a.h + qb.hi) * a.t;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    qb.row[r] = qb.i0 + qb.g + 8 * r;
    qb.qcode[r] =
        qb.row[r] < a.s ? codes[((long long)a.b + qb.bi) * a.t + a.past + qb.row[r]] : 0u;
  }
  return qb;
}

// A forward or dQ block's walk over its key tiles of BN (K and V rows, codes and ALiBi biases):
// start() runs while the first loads; body(j0, ks, vs, kc, ab, full) for each tile with a key
// the warp's rows may see, `full` when every key of it is visible to every row of the warp (no
// per-score test).
template <int BN, int D, class Start, class Body>
__device__ __forceinline__ void walk_keys(const QueryBlock& qb, const Dims& a, Start start,
                                          Body body) {
  __shared__ __align__(16) u16 ks[2][BN][D + 8];
  __shared__ __align__(16) u16 vs[2][BN][D + 8];
  __shared__ unsigned kc[2][BN];
  __shared__ float ab[2][BN];
  auto fetch = [&](int it, int buf) {
    const int j0 = it * BN;
    tile_rows<BN, D>(ks[buf], qb.k, j0, qb.kend);
    tile_rows<BN, D>(vs[buf], qb.v, j0, qb.kend);
    tile_words<BN>(kc[buf], qb.kcodes + j0, qb.kend - j0);
    if (a.has_alibi) tile_words<BN>(ab[buf], qb.alibi + j0, qb.kend - j0);
    cp_async_commit();
  };
  walk_tiles((qb.kend + BN - 1) / BN, fetch, start, [&](int it, int cur) {
    const int j0 = it * BN;
    // The whole warp's rows precede the tile (or are past s): nothing to add.
    if (qb.i0 >= a.s || j0 > a.past + qb.wlast) return;
    const unsigned first = kc[cur][0];
    const bool full = uniform_codes<BN>(kc[cur]) && j0 + BN - 1 <= a.past + qb.i0 &&
                      __all_sync(0xffffffffu, qb.row[1] < a.s && qb.qcode[0] == first &&
                                                  qb.qcode[1] == first);
    body(j0, ks[cur], vs[cur], kc[cur], ab[cur], full);
  });
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
  const QueryBlock qb = query_block<D>(a, k, v, codes, alibi, false);
  const int lane = qb.lane, c = qb.c;
  unsigned qa[KS][4];
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
  float o[DT][4];
  auto start = [&] {
    load_a<D>(qa, q + qb.qbase * D, qb.i0, a.s, qb.g, c);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  };
  walk_keys<BN, D>(qb, a, start, [&](int j0, const u16(*ks)[D + 8], const u16(*vs)[D + 8],
                                     const unsigned* kc, const float* ab, bool full) {
    float sc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
    mma_rows<BF16, KS, NT, D + 8>(sc, qa, ks, lane);
    float mt[2] = {m[0], m[1]};
    scale_scores<NT>(sc, mt, full, kc, ab, j0, qb.row, qb.qcode, a);
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
    mma_scores<BF16, BN / 16, DT, D + 8>(o, sc, vs, lane);
  });
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lr = quad_sum(l[r]);
    if (qb.row[r] >= a.s) continue;
    const float inv = lr > 0.f ? 1.f / lr : 0.f;
    u16* dst = out + (qb.qbase + qb.row[r]) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *(unsigned*)(dst + dt * 8) = H::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (c == 0) lse[qb.qbase + qb.row[r]] = lr > 0.f ? m[r] * LN2 + __logf(lr) : POS_INF;
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
  const QueryBlock qb = query_block<D>(a, k, v, codes, alibi, true);
  const int lane = qb.lane, c = qb.c;
  unsigned qa[KS][4], ga[KS][4];
  float dl[2] = {0.f, 0.f}, li2[2];
  float acc[DT][4];
  auto start = [&] {
    load_a<D>(qa, q + qb.qbase * D, qb.i0, a.s, qb.g, c);
    load_a<D>(ga, dout + qb.qbase * D, qb.i0, a.s, qb.g, c);
    // delta from the lane's columns of dO (its fragments) and the same columns of O.
    unsigned oa[KS][4];
    load_a<D>(oa, o + qb.qbase * D, qb.i0, a.s, qb.g, c);
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
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dl[r] = quad_sum(dl[r]);
      const bool in = qb.row[r] < a.s;
      li2[r] = in ? lse[qb.qbase + qb.row[r]] * LOG2E : POS_INF;
      if (in && c == 0) delta[qb.qbase + qb.row[r]] = dl[r];
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  };
  walk_keys<BN, D>(qb, a, start, [&](int j0, const u16(*ks)[D + 8], const u16(*vs)[D + 8],
                                     const unsigned* kc, const float* ab, bool full) {
    float sc[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] = dp[nt][e] = 0.f;
    }
    mma_rows<BF16, KS, NT, D + 8>(sc, qa, ks, lane);
    mma_rows<BF16, KS, NT, D + 8>(dp, ga, vs, lane);
    float unused[2] = {NEG_INF, NEG_INF};
    scale_scores<NT>(sc, unused, full, kc, ab, j0, qb.row, qb.qcode, a);
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
    mma_scores<BF16, BN / 16, DT, D + 8>(acc, sc, ks, lane);
  });
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (qb.row[r] >= a.s) continue;
    u16* dst = dq + (qb.qbase + qb.row[r]) * D + 2 * c;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *(unsigned*)(dst + dt * 8) = H::pack(acc[dt][2 * r], acc[dt][2 * r + 1]);
  }
}

// dK and dV, f32 [b, kvh * chunks, t, D] each: a block sums the gradients of heads_per query
// heads of one KV head's group (chunk y % chunks of it, y its place's) in registers, and the host
// adds the chunks in order. (One query head a block left a multi-query model's 71 heads to a
// host-side sum of 71 strided rows per element, slower than the kernel itself.) Grid
// (ceil(t / 64), kvh * chunks, b), 128 threads, each warp 16 keys; queries in tiles of BQ, from
// the first that may see the block's first key, head after head as one sequence of tiles whose
// next one loads while the warps compute on the current one.
template <bool BF16, int D, int BQ>
__device__ void flash_mma_bwd_dkv(const u16* __restrict__ q, const u16* __restrict__ k,
                                  const u16* __restrict__ v, const u16* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const unsigned* __restrict__ codes,
                                  const float* __restrict__ alibi, float* __restrict__ dk,
                                  float* __restrict__ dv, Dims a, int heads_per) {
  constexpr int KS = D / 16, NT = BQ / 8, DT = D / 8;
  __shared__ __align__(16) u16 qs[2][BQ][D + 8];
  __shared__ __align__(16) u16 gs[2][BQ][D + 8];
  // The tile's log-sum-exps (natural units), deltas and codes; zeros past s.
  __shared__ float ls[2][BQ], dls[2][BQ];
  __shared__ unsigned qc[2][BQ];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const BlockPlace place = block_place(true, false);
  const int group = a.h / a.kvh, chunks = gridDim.y / a.kvh;
  const int bi = place.z, kvi = place.y / chunks;
  const int h0 = kvi * group + (place.y % chunks) * heads_per;
  const int h1 = min(h0 + heads_per, (kvi + 1) * group);
  const int j0 = place.row_block * 64 + warp * 16;
  const long long kvbase = ((long long)bi * a.kvh + kvi) * a.t;
  const unsigned* qcodes = codes + ((long long)a.b + bi) * a.t + a.past;
  // Queries at absolute positions >= the block's first key: i >= first key - past.
  const int first = max(0, place.row_block * 64 - a.past);
  const int per_head = first < a.s ? (a.s - first + BQ - 1) / BQ : 0;
  const int tiles = max(0, h1 - h0) * per_head;
  auto fetch = [&](int it, int buf) {
    const int hi = h0 + it / per_head, i0 = first + (it % per_head) * BQ;
    const long long qbase = ((long long)bi * a.h + hi) * a.s;
    tile_rows<BQ, D>(qs[buf], q + qbase * D, i0, a.s);
    tile_rows<BQ, D>(gs[buf], dout + qbase * D, i0, a.s);
    tile_words<BQ>(ls[buf], lse + qbase + i0, a.s - i0);
    tile_words<BQ>(dls[buf], delta + qbase + i0, a.s - i0);
    tile_words<BQ>(qc[buf], qcodes + i0, a.s - i0);
    cp_async_commit();
  };
  unsigned ka[KS][4], va[KS][4];
  const int key[2] = {j0 + g, j0 + g + 8};
  unsigned kcode[2];
  float gk[DT][4], gv[DT][4];
  auto start = [&] {
    load_a<D>(ka, k + kvbase * D, j0, a.t, g, c);
    load_a<D>(va, v + kvbase * D, j0, a.t, g, c);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      kcode[r] = key[r] < a.t ? codes[(long long)bi * a.t + key[r]] : 0u;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) gk[dt][e] = gv[dt][e] = 0.f;
    }
  };
  const float sl2 = a.scale * LOG2E;
  walk_tiles(tiles, fetch, start, [&](int it, int cur) {
    const int hi = h0 + it / per_head, i0 = first + (it % per_head) * BQ;
    // The warp's keys are past the tile's last query (or past t): nothing to add.
    if (j0 >= a.t || j0 > a.past + min(a.s - 1, i0 + BQ - 1)) return;
    float al[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      al[r] = (key[r] < a.t && a.has_alibi) ? alibi[((long long)bi * a.h + hi) * a.t + key[r]]
                                            : 0.f;
    const unsigned first_code = qc[cur][0];
    // Every query of the tile sees every key of the warp.
    const bool full = uniform_codes<BQ>(qc[cur]) && j0 + 15 <= a.past + i0 &&
                      __all_sync(0xffffffffu, key[1] < a.t && kcode[0] == first_code &&
                                                  kcode[1] == first_code);
    float st[NT][4], dpt[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
    }
    mma_rows<BF16, KS, NT, D + 8>(st, ka, qs[cur], lane);
    mma_rows<BF16, KS, NT, D + 8>(dpt, va, gs[cur], lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, ii = nt * 8 + 2 * c + (e & 1), i = i0 + ii;
        const float li = ls[cur][ii];
        // (A query past s has code 0; one that sees no key has lse +inf.)
        const bool vis = full || (key[r] <= a.past + i && kcode[r] != 0u &&
                                  kcode[r] == qc[cur][ii] && li != POS_INF);
        const float p = vis ? exp2f(fmaf(st[nt][e] + al[r], sl2, -li * LOG2E)) : 0.f;
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - dls[cur][ii]) * a.scale;
      }
    }
    mma_scores<BF16, BQ / 16, DT, D + 8>(gv, st, gs[cur], lane);
    mma_scores<BF16, BQ / 16, DT, D + 8>(gk, dpt, qs[cur], lane);
  });
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= a.t) continue;
    const long long orow = (((long long)bi * gridDim.y + place.y) * a.t + key[r]) * D + 2 * c;
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
    flash_mma_fwd<BF16, D, BN>(q, k, v, codes, alibi, out, lse, DIMS_VALUE);                     \
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

// Per head size: the forward and dQ kernels' key tile BN and the dK/dV kernel's query tile BQ,
// their two buffers kept under 48 KB of static shared memory. (At 64, tiles of 32 with three
// blocks a multiprocessor were slower on an H100: 2,705 against 2,671 us for a layer's forward
// and backward, 2026-12-06.)
#if FLASH_DMAX == 64
FLASH_MMA_ENTRIES(bf16, true, 64, 64, 64)
FLASH_MMA_ENTRIES(f16, false, 64, 64, 64)
#elif FLASH_DMAX == 128
FLASH_MMA_ENTRIES(bf16, true, 128, 32, 32)
FLASH_MMA_ENTRIES(f16, false, 128, 32, 32)
#else
#error "the tensor-core flash kernels serve FLASH_DMAX 64 or 128"
#endif
