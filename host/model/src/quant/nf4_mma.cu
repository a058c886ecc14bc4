// The tensor-core NF4 GEMM for batched decoding (host side in quant/kernels.rs), after
// nf4_common.cu and ops/mma.cu (the mma instruction and the operands' packing). Its own
// module, compiled for compute_80 (mma.sync with bf16 needs sm_80): a card that cannot run it
// keeps every other NF4 kernel.
// y = x W^T for up to 16 rows (batched decoding) on the tensor cores: mma.sync m16n8k16 with x
// as the 16 x 16 A operand (rows past m are zeros) and 8 output features of W as B, each weight
// dequantized in registers to the 16-bit value the dequantize kernel writes (so the products are
// those of dequantize + cuBLAS, summed in f32 in another order) and never stored. The dot
// product over k does not care which column goes in which of an mma's 16 k slots, as long as
// x and W agree: lane (g, c) (g = lane / 4, c = lane % 4) takes columns 32c .. 32c + 31 of a
// 128-column chunk, one 16-byte load of codes for feature g (one absmax block, as the 32-column
// GEMV), and step s of the chunk's 8 mma steps gives its k slots {2c, 2c + 1, 2c + 8, 2c + 9}
// columns 32c + 4s + {0, 1, 2, 3}. A block's warps split the chunks of the same features (see
// the tiling below) and add their partial sums through shared memory. The caller guarantees
// k % 32 == 0, a blocksize that is a power of two of at least 32, a nested blocksize (nbs, 1
// without nesting) that is a power of two, n % 8 == 0 and x contiguous from a 16-byte boundary. The weights are dequantized as
// nf4_values8 reads them, the absmax loads issued with the codes' (absmax_fetch), and each pair
// rounded to 16 bits in one instruction: per weight, ~3 instructions fewer than indexing by
// nibble and rounding in software.
// The kernel is a template over its tiling (`MmaTiling` on the host): WARPS warps a block
// split a row's 128-column chunks, each issuing UNROLL chunks' loads of codes before using any;
// a warp computes TILES tiles of 8 features from each A fragment it loads (x is loaded once for
// 8 * TILES features, not once for 8); HALVES says whether rows 8-15 exist (m > 8), so up to
// 8 rows never load or hold the A operand's second half. A feature's sum depends on WARPS alone:
// warp w adds chunks w, w + WARPS, w + 2 WARPS ... in that order whatever UNROLL, TILES and
// HALVES are.

// Programmatic dependent launch (ops/pdl.cu's GRID_WAIT and GRID_LAUNCH_DEPENDENTS, the module
// compiled with ADAPTERLAB_PDL): a block loads its tables and first codes (never written by a
// kernel) before it waits for the kernel before it, and then reads x, h's inputs or the
// residual, or writes anything.

// An adapter's h = x A^T computed in the decoding kernel's own launch (hb > 0): blocks 0 .. hb - 1
// (hb = m * lr, a block a row and rank) compute it with block_dot16 (ops/dot16.cu), the bits of
// lora_h's launch of its own, store it to lh and then set their flag to this launch's epoch (a
// value the host never passes twice running); the product's blocks, from hb on, wait for every
// flag before their epilogue reads h. Blocks start in index order (the assumption CUB's
// single-pass scan makes), so the h blocks are running or done before any product block waits,
// and by then they have long finished: a product block's own work is longer. At batch-1
// decoding this took lora_h's 128 launches a Falcon-7B token out of the launch count (0.47 ms of
// kernels, ncu on an H100, 2026-12-07, and the host's launching of each).
template <bool BF16>
__device__ __forceinline__ void lora_h_in_launch(const u16* x, const float* a, float* h, int k,
    int r, unsigned int* flags, unsigned int epoch) {
  __shared__ float red[DOT16_THREADS / 32];
  int row = blockIdx.x / r, j = blockIdx.x % r;
  GRID_WAIT();
  float s = block_dot16<BF16>(x + (long long)row * k, a + (long long)j * k, k, red);
  if (threadIdx.x == 0) {
    __stcg(h + blockIdx.x, s);
    __threadfence();
    atomicExch(flags + blockIdx.x, epoch);
  }
}
__device__ __forceinline__ void wait_for_h(unsigned int* flags, unsigned int epoch, int hb) {
  if (hb <= 0) return;
  for (int i = threadIdx.x; i < hb; i += blockDim.x)
    while (*(volatile unsigned int*)(flags + i) != epoch) __nanosleep(64);
  __threadfence();
}

// Every form's start: the h blocks (blockIdx.x < hb) compute h and leave; the product's blocks
// take bid, their index among themselves (PRODUCT_START), and load the tables (LOAD_TABLES,
// whose barrier also covers what a form writes to shared memory between the two).
#define PRODUCT_START                                                                          \
  GRID_LAUNCH_DEPENDENTS();                                                                    \
  if (blockIdx.x < hb) {                                                                      \
    lora_h_in_launch<BF16>(x, la, lh, k, lr, flags, epoch);                                    \
    return;                                                                                    \
  }                                                                                           \
  int bid = blockIdx.x - hb;
#define PRODUCT_PROLOGUE PRODUCT_START LOAD_TABLES

// x + (a + b) with the two 16-bit adds' roundings (ops/residual.cu's add3_one).
template <bool BF16>
__device__ __forceinline__ u16 residual3(u16 x, u16 a, u16 b) {
  float ab = load16<BF16>(round16<BF16>(__fadd_rn(load16<BF16>(a), load16<BF16>(b))));
  return round16<BF16>(__fadd_rn(load16<BF16>(x), ab));
}

// The block's outputs from the warps' partial sums part[warp][row][feature] (ROWS x FEATS a
// warp), each summed over the warps in order (a feature's sum depends on WARPS alone) and stored
// with the adapter's product (LORA_OUT); both forms below end with it. `act` (ops::epilogue's
// code) 1 stores the exact GELU of that 16-bit output as the GELU kernel computes it (gelu16,
// the same bits), so an MLP's up projection and its activation are one launch: decoding ran the
// GELU kernel 32 times a Falcon-7B token, 0.18 ms of ~5 (ncu, H100, 2026-12-07); 2 stores
// rx + (out + rb), a parallel layer's residual after its down projection, with the bits of
// residual.cu's add3 (its kernel ran 32 times a token too, 0.10 ms).
// Output (r, o) from its f32 sum s, as described above (the split pairs form's last slice ends
// with it too).
#define STORE_EPILOGUE(r, o, s)                                                                \
  {                                                                                           \
    LORA_OUT(load16<BF16>, round16<BF16>, r, o, s, out)                                        \
    long long i_ = (long long)(r) * n + (o);                                                   \
    if (act == 1) out = round16<BF16>(gelu16<BF16>(load16<BF16>(out)));                        \
    if (act == 2) out = residual3<BF16>(rx[i_], out, rb[i_]);                                  \
    y[i_] = out;                                                                               \
  }
#define STORE_WARP_SUMS(ROWS, FEATS)                                                           \
  GRID_WAIT();                                                                                 \
  wait_for_h(flags, epoch, hb);                                                                \
  __syncthreads();                                                                             \
  for (int e = threadIdx.x; e < (ROWS) * (FEATS); e += blockDim.x) {                          \
    int r = e / (FEATS), f = e % (FEATS);                                                      \
    long long o = first + f;                                                                   \
    if (r >= m || o >= n) continue;                                                           \
    float sum = 0.f;                                                                           \
    _Pragma("unroll") for (int w = 0; w < WARPS; ++w) sum += part[w][r][f];                    \
    STORE_EPILOGUE(r, o, sum)                                                                  \
  }

// The swapped forms' end (W as the A operand, x as B): the warp's accumulators into part
// (SWAPPED_PARTS: d[0], d[1]: feature g, rows 2c and 2c + 1; d[2], d[3]: feature g + 8), then
// the block's sums.
#define SWAPPED_PARTS                                                                          \
  part[warp][2 * c][g] = d[0];                                                                 \
  part[warp][2 * c + 1][g] = d[1];                                                             \
  part[warp][2 * c][g + 8] = d[2];                                                             \
  part[warp][2 * c + 1][g + 8] = d[3];
#define STORE_SWAPPED_SUMS                                                                     \
  SWAPPED_PARTS                                                                                \
  STORE_WARP_SUMS(8, 16)

template <int WARPS, int UNROLL, int TILES, bool HALVES, bool BF16>
__device__ __forceinline__ void nf4_mma(const u8* codes, int n, int k, int bs, int nested,
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,
    const u16* x, u16* y, int m, float* lh, const float* lb, float lscale, int lr, int act,
    const float* la, unsigned int* flags, unsigned int epoch, int hb, const u16* rx,
    const u16* rb) {
  PRODUCT_PROLOGUE
  __shared__ float part[WARPS][16][8 * TILES];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g = lane >> 2, c = lane & 3;
  long long first = (long long)bid * 8 * TILES;
  float d[TILES][4];
  _Pragma("unroll") for (int t = 0; t < TILES; ++t) d[t][0] = d[t][1] = d[t][2] = d[t][3] = 0.f;
  int chunks = (k + 127) >> 7, lbs = __ffs(bs) - 1, lnbs = __ffs(nbs) - 1;
  for (int ch0 = warp; ch0 < chunks; ch0 += WARPS * UNROLL) {
    uint4 cw[UNROLL][TILES];
    unsigned int aqv[UNROLL][TILES];
    float am[UNROLL][TILES];
    _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {
      int col = ((ch0 + u * WARPS) << 7) + (c << 5);
      _Pragma("unroll") for (int t = 0; t < TILES; ++t) {
        long long feature = first + 8 * t + g;
        cw[u][t] = make_uint4(0u, 0u, 0u, 0u);
        aqv[u][t] = 0u;
        am[u][t] = 0.f;
        if (ch0 + u * WARPS < chunks && col < k && feature < n) {
          long long e = feature * (long long)k + col;
          cw[u][t] = __ldcs((const uint4*)(codes + (e >> 1)));
          absmax_fetch(e >> lbs, absmax, aq, lnbs, &aqv[u][t], &am[u][t]);
        }
      }
    }
    if (ch0 == warp) GRID_WAIT();
    _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {
      if (ch0 + u * WARPS >= chunks) break;
      int col = ((ch0 + u * WARPS) << 7) + (c << 5);
      bool valid = col < k;
      unsigned int xa[16], xb[16];
      _Pragma("unroll") for (int q = 0; q < 4; ++q) {
        uint4 va = make_uint4(0u, 0u, 0u, 0u), vb = va;
        if (valid && g < m) va = __ldg((const uint4*)(x + (long long)g * k + col + 8 * q));
        if (HALVES && valid && g + 8 < m)
          vb = __ldg((const uint4*)(x + (long long)(g + 8) * k + col + 8 * q));
        xa[4 * q] = va.x; xa[4 * q + 1] = va.y; xa[4 * q + 2] = va.z; xa[4 * q + 3] = va.w;
        xb[4 * q] = vb.x; xb[4 * q + 1] = vb.y; xb[4 * q + 2] = vb.z; xb[4 * q + 3] = vb.w;
      }
      _Pragma("unroll") for (int t = 0; t < TILES; ++t) {
        float a = absmax_value(aqv[u][t], am[u][t], nested, code_s, offset);
        unsigned int cws[4] = {cw[u][t].x, cw[u][t].y, cw[u][t].z, cw[u][t].w};
        float w[8];
        _Pragma("unroll") for (int s = 0; s < 8; ++s) {
          if ((s & 1) == 0) nf4_values8(nf4s, cws[s >> 1], w);
          const float* ws = w + 4 * (s & 1);
          unsigned int r0, r1;
          if (BF16) {
            r0 = pack_bf16x2(__fmul_rn(ws[0], a), __fmul_rn(ws[1], a));
            r1 = pack_bf16x2(__fmul_rn(ws[2], a), __fmul_rn(ws[3], a));
          } else {
            r0 = pack_f16x2(__fmul_rn(ws[0], a), __fmul_rn(ws[1], a));
            r1 = pack_f16x2(__fmul_rn(ws[2], a), __fmul_rn(ws[3], a));
          }
          mma_16816<BF16>(d[t], xa[2 * s], HALVES ? xb[2 * s] : 0u, xa[2 * s + 1],
                          HALVES ? xb[2 * s + 1] : 0u, r0, r1);
        }
      }
    }
  }
  _Pragma("unroll") for (int t = 0; t < TILES; ++t) {
    part[warp][g][8 * t + 2 * c] = d[t][0];
    part[warp][g][8 * t + 2 * c + 1] = d[t][1];
    part[warp][g + 8][8 * t + 2 * c] = d[t][2];
    part[warp][g + 8][8 * t + 2 * c + 1] = d[t][3];
  }
  STORE_WARP_SUMS(16, 8 * TILES)
}

// The swapped form for up to 8 rows: W is the A operand (16 features: lane (g, c) dequantizes
// features g and g + 8) and x the B operand (rows as its 8 columns; lane (g, c) holds row g's,
// or zeros where g >= m, whose products land in columns no one reads). The k slots map to
// columns as above, and a warp adds its chunks in the same order. Where x is the A operand,
// rows 8-15 are zero registers the mma still needs beside x's, and every mma takes 8 features;
// here no operand is padding, a warp's mma takes 16 features, and x's fragments are the loaded
// registers as they are. By ncu (H100, 2026-12-07) the A-operand form issued ~9 instructions a
// weight at one row, at 65% of the issue slots and 21-31% of DRAM bandwidth: issue bound.
// A lane past the rows loads no x: at one row 28 lanes of 32 would load row 0 again, through
// the L1, which ncu had as this kernel's busiest unit (68-72% at Falcon-7B's shapes). Batch-1
// decoding ran 157 tokens/s with those loads and 183 without them (H100, 2026-12-07, two calls).
template <int WARPS, int UNROLL, bool BF16>
__device__ __forceinline__ void nf4_mma_swapped(const u8* codes, int n, int k, int bs, int nested,
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,
    const u16* x, u16* y, int m, float* lh, const float* lb, float lscale, int lr, int act,
    const float* la, unsigned int* flags, unsigned int epoch, int hb, const u16* rx,
    const u16* rb) {
  PRODUCT_PROLOGUE
  __shared__ float part[WARPS][8][16];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g = lane >> 2, c = lane & 3;
  long long first = (long long)bid * 16;
  long long fa = first + g, fb = first + g + 8;
  const u16* xr = g < m ? x + (long long)g * k : nullptr;
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  int chunks = (k + 127) >> 7, lbs = __ffs(bs) - 1, lnbs = __ffs(nbs) - 1;
  for (int ch0 = warp; ch0 < chunks; ch0 += WARPS * UNROLL) {
    uint4 ca[UNROLL], cb[UNROLL];
    unsigned int qa[UNROLL], qb[UNROLL];
    float ma[UNROLL], mb[UNROLL];
    _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {
      int col = ((ch0 + u * WARPS) << 7) + (c << 5);
      ca[u] = cb[u] = make_uint4(0u, 0u, 0u, 0u);
      qa[u] = qb[u] = 0u;
      ma[u] = mb[u] = 0.f;
      if (ch0 + u * WARPS < chunks && col < k) {
        if (fa < n) {
          long long e = fa * (long long)k + col;
          ca[u] = __ldcs((const uint4*)(codes + (e >> 1)));
          absmax_fetch(e >> lbs, absmax, aq, lnbs, &qa[u], &ma[u]);
        }
        if (fb < n) {
          long long e = fb * (long long)k + col;
          cb[u] = __ldcs((const uint4*)(codes + (e >> 1)));
          absmax_fetch(e >> lbs, absmax, aq, lnbs, &qb[u], &mb[u]);
        }
      }
    }
    if (ch0 == warp) GRID_WAIT();
    _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {
      if (ch0 + u * WARPS >= chunks) break;
      int col = ((ch0 + u * WARPS) << 7) + (c << 5);
      // Past k (a last chunk of fewer columns) x is zero, so the codes' zeros add nothing; the
      // lane must still join the warp's mma.
      bool valid = col < k;
      unsigned int xw[16];
      _Pragma("unroll") for (int q = 0; q < 4; ++q) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (valid && xr) v = __ldg((const uint4*)(xr + col + 8 * q));
        xw[4 * q] = v.x; xw[4 * q + 1] = v.y; xw[4 * q + 2] = v.z; xw[4 * q + 3] = v.w;
      }
      float aa = absmax_value(qa[u], ma[u], nested, code_s, offset);
      float ab = absmax_value(qb[u], mb[u], nested, code_s, offset);
      unsigned int wa4[4] = {ca[u].x, ca[u].y, ca[u].z, ca[u].w};
      unsigned int wb4[4] = {cb[u].x, cb[u].y, cb[u].z, cb[u].w};
      float wa[8], wb[8];
      _Pragma("unroll") for (int s = 0; s < 8; ++s) {
        if ((s & 1) == 0) {
          nf4_values8(nf4s, wa4[s >> 1], wa);
          nf4_values8(nf4s, wb4[s >> 1], wb);
        }
        const float* sa = wa + 4 * (s & 1);
        const float* sb = wb + 4 * (s & 1);
        unsigned int a0, a1, a2, a3;
        if (BF16) {
          a0 = pack_bf16x2(__fmul_rn(sa[0], aa), __fmul_rn(sa[1], aa));
          a1 = pack_bf16x2(__fmul_rn(sb[0], ab), __fmul_rn(sb[1], ab));
          a2 = pack_bf16x2(__fmul_rn(sa[2], aa), __fmul_rn(sa[3], aa));
          a3 = pack_bf16x2(__fmul_rn(sb[2], ab), __fmul_rn(sb[3], ab));
        } else {
          a0 = pack_f16x2(__fmul_rn(sa[0], aa), __fmul_rn(sa[1], aa));
          a1 = pack_f16x2(__fmul_rn(sb[0], ab), __fmul_rn(sb[1], ab));
          a2 = pack_f16x2(__fmul_rn(sa[2], aa), __fmul_rn(sa[3], aa));
          a3 = pack_f16x2(__fmul_rn(sb[2], ab), __fmul_rn(sb[3], ab));
        }
        mma_16816<BF16>(d, a0, a1, a2, a3, xw[2 * s], xw[2 * s + 1]);
      }
    }
  }
  STORE_SWAPPED_SUMS
}

// The gemv4bit form for one row (ADAPTERLAB_NF4_ONE_ROW=gemv4bit, quant/kernels.rs): the swapped
// form's layout, lanes, k slots and order of sums, with each weight formed as bitsandbytes'
// batch-1 GEMV (kgemm_4bit_inference_naive, what transformers runs for one token) forms it: the
// code's value rounded to 16 bits times the block's absmax rounded to 16 bits, one 16-bit
// multiply (RN; fma with -0 is its sm_80 form, as cuda_bf16's __hmul). That lets a weight pair
// come from one shared load: the 256 pairs of codes a byte can hold, as 16-bit pairs, in 32 copies,
// the copy of lane l at word l of a 256-byte row, so a byte permute makes the offset (the code
// byte as the row, the lane's 4 l as the column) and the 32 lanes of a load always hit 32
// different banks; one bf16x2 multiply scales the pair. A pair costs a permute, an add of the
// table's base (sm_90 shared addresses carry the block's cluster rank, so ptxas does not fold
// it), a load and a multiply: ~3.5 instructions a weight with the loads and the mma, by SASS,
// against the swapped form's ~6. The table takes 64 KB of dynamic shared memory, so blocks stay
// resident and loop over the feature groups (the host launches no more than fit at once)
// instead of filling it again for every 16 features. Offsets are 32-bit (the host guarantees
// n * k < 2^32). Measured on an H100 (2026-12-07, BENCHMARKS.md): 2.7-3.1% faster end to end
// than the swapped form, so instruction issue is not what bounds one row's product.
#define PAIR_ROW_WORDS 64
__constant__ unsigned int NF4_PAIRS_BF16_C[256] = { NF4_PAIRS_BF16 };
__constant__ unsigned int NF4_PAIRS_F16_C[256] = { NF4_PAIRS_F16 };
// Writes the table: row e holds pair e (the value of e's high nibble in the low half) in words
// 0-31; a thread stores 4 copies at once.
template <bool BF16>
__device__ __forceinline__ void fill_pairs(unsigned int* table) {
  for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
    int e = i >> 3, q = i & 7;
    unsigned int v = BF16 ? NF4_PAIRS_BF16_C[e] : NF4_PAIRS_F16_C[e];
    *(uint4*)(table + e * PAIR_ROW_WORDS + 4 * q) = make_uint4(v, v, v, v);
  }
}
// The pair of byte b of v for the lane whose 4 * lane is lane4: row v.byte[b], column lane4 of
// the table at shared address `base`.
__device__ __forceinline__ unsigned int pair_of(unsigned int base, unsigned int v,
    unsigned int lane4, int b) {
  unsigned int off = __byte_perm(v, lane4, 0x5504u | ((unsigned int)b << 4));
  unsigned int p;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(p) : "r"(base + off));
  return p;
}
template <bool BF16>
__device__ __forceinline__ unsigned int mul16x2(unsigned int p, unsigned int a) {
  unsigned int d;
  if (BF16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(p), "r"(a), "r"(0x80008000u));
  else asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(p), "r"(a));
  return d;
}
// One group of 16 features as a lane sees it: the first weight of its feature g (a 32-bit
// offset; feature g + 8's is 8k on), and whether feature g + 8 exists (g's does: n % 8 == 0).
struct PairsGroup {
  unsigned int ea;
  bool vb;
};
__device__ __forceinline__ PairsGroup pairs_group(int grp, int g, int c, int n, int k) {
  int fa = grp * 16 + g;
  return {(unsigned int)fa * (unsigned int)k + ((unsigned int)c << 5), fa + 8 < n};
}
// One round of a lane's codes and absmax loads: chunks ch0, ch0 + WARPS, ... (UNROLL of them).
template <int UNROLL>
struct PairsRound {
  uint4 ca[UNROLL], cb[UNROLL];
  unsigned int qa[UNROLL], qb[UNROLL];
  float ma[UNROLL], mb[UNROLL];
};
// A lane's loads of chunk ch: codes at ch * 64 bytes on, if the chunk is in the slice (ch < ce)
// and the lane has columns there (ch * 128 < kc, kc = k - 32 c, which also means ch < chunks).
// Codes not loaded are never used as more than a table row (any byte is one), their scale is
// zero and x is zero there.
template <int WARPS, int UNROLL>
__device__ __forceinline__ void pairs_load(PairsRound<UNROLL>& r, const u8* codes,
    PairsGroup q, int k, int ch0, int ce, int kc, int lbs, const float* absmax, const u8* aq,
    int lnbs) {
  unsigned int eb = q.ea + 8u * (unsigned int)k;
  const u8* ra = codes + (q.ea >> 1) + ((long long)ch0 << 6);
  const u8* rb = codes + (eb >> 1) + ((long long)ch0 << 6);
  _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {
    int ch = ch0 + u * WARPS;
    r.qa[u] = r.qb[u] = 0u;
    r.ma[u] = r.mb[u] = 0.f;
    if (ch < ce && (ch << 7) < kc) {
      unsigned int step = (unsigned int)ch << 7;
      r.ca[u] = __ldcs((const uint4*)(ra + u * WARPS * 64));
      absmax_fetch((q.ea + step) >> lbs, absmax, aq, lnbs, &r.qa[u], &r.ma[u]);
      if (q.vb) {
        r.cb[u] = __ldcs((const uint4*)(rb + u * WARPS * 64));
        absmax_fetch((eb + step) >> lbs, absmax, aq, lnbs, &r.qb[u], &r.mb[u]);
      }
    }
  }
}
// A round's products into the warp's accumulators d: x's columns of each chunk (from the L1),
// each pair of weights from the table scaled by its feature's absmax, an mma a 4 columns.
template <int WARPS, int UNROLL, bool BF16>
__device__ __forceinline__ void pairs_compute(const PairsRound<UNROLL>& r, float* d, bool vb,
    int ch0, int ce, int kc, int c, const u16* xr, int nested, const float* code_s,
    float offset, unsigned int tb, unsigned int lane4) {
  _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {
    int ch = ch0 + u * WARPS;
    if (ch >= ce) break;
    // Past k x is zero and the scale is zero; the lane must still join the warp's mma.
    bool valid = (ch << 7) < kc;
    int col = (ch << 7) + (c << 5);
    unsigned int xw[16];
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (valid && xr) v = __ldg((const uint4*)(xr + col + 8 * q));
      xw[4 * q] = v.x; xw[4 * q + 1] = v.y; xw[4 * q + 2] = v.z; xw[4 * q + 3] = v.w;
    }
    float aa = valid ? absmax_value(r.qa[u], r.ma[u], nested, code_s, offset) : 0.f;
    float ab = valid && vb ? absmax_value(r.qb[u], r.mb[u], nested, code_s, offset) : 0.f;
    unsigned int aa2 = BF16 ? pack_bf16x2(aa, aa) : pack_f16x2(aa, aa);
    unsigned int ab2 = BF16 ? pack_bf16x2(ab, ab) : pack_f16x2(ab, ab);
    unsigned int wa4[4] = {r.ca[u].x, r.ca[u].y, r.ca[u].z, r.ca[u].w};
    unsigned int wb4[4] = {r.cb[u].x, r.cb[u].y, r.cb[u].z, r.cb[u].w};
    _Pragma("unroll") for (int s = 0; s < 8; ++s) {
      // Step s takes columns 4s .. 4s + 3 of the lane's 32: bytes 2s and 2s + 1.
      unsigned int va4 = wa4[s >> 1], vb4 = wb4[s >> 1];
      int b0 = 2 * (s & 1);
      unsigned int a0 = mul16x2<BF16>(pair_of(tb, va4, lane4, b0), aa2);
      unsigned int a1 = mul16x2<BF16>(pair_of(tb, vb4, lane4, b0), ab2);
      unsigned int a2 = mul16x2<BF16>(pair_of(tb, va4, lane4, b0 + 1), aa2);
      unsigned int a3 = mul16x2<BF16>(pair_of(tb, vb4, lane4, b0 + 1), ab2);
      mma_16816<BF16>(d, a0, a1, a2, a3, xw[2 * s], xw[2 * s + 1]);
    }
  }
}
// Split over k (slices > 1, one row): a work item is a group and a slice of its chunks
// (slices of cps chunks, a group's items adjacent), and blocks loop over the items. An item's
// block sums its warps as the unsplit form does, stores the 16 sums to scratch (item * 16 on) and
// counts the slice in counts[grp]; the block that counts the last adds the group's slices in
// slice order and stores the outputs with the epilogue, then sets the count back to zero for the
// next launch (which touches it only after its GRID_WAIT, when this launch is done). Falcon-7B's
// down projection has 284 groups of 142 chunks for 396 places on an H100: unsplit, 112 places
// idle and every block 142 chunks long; in 4 slices, 1,136 items of 36 chunks, 3 at most a block.
#define STORE_SLICE_SUMS                                                                       \
  GRID_WAIT();                                                                                 \
  SWAPPED_PARTS                                                                                \
  __syncthreads();                                                                             \
  if (threadIdx.x < 16) {                                                                     \
    float sum = 0.f;                                                                           \
    _Pragma("unroll") for (int w = 0; w < WARPS; ++w) sum += part[w][0][threadIdx.x];          \
    __stcg(scratch + (long long)item * 16 + threadIdx.x, sum);                                 \
    __threadfence();                                                                           \
  }                                                                                           \
  __syncthreads();                                                                             \
  if (threadIdx.x == 0)                                                                        \
    last_slice = atomicAdd(counts + grp, 1u) == (unsigned int)(slices - 1);                    \
  __syncthreads();                                                                             \
  if (last_slice) {                                                                           \
    __threadfence();                                                                           \
    wait_for_h(flags, epoch, hb);                                                              \
    __syncthreads();                                                                           \
    long long o = first + threadIdx.x;                                                         \
    if (threadIdx.x < 16 && o < n) {                                                          \
      float sum = 0.f;                                                                         \
      for (int t = 0; t < slices; ++t)                                                        \
        sum += __ldcg(scratch + ((long long)grp * slices + t) * 16 + threadIdx.x);             \
      STORE_EPILOGUE(0, o, sum)                                                                \
    }                                                                                         \
    if (threadIdx.x == 0) counts[grp] = 0u;                                                    \
  }                                                                                           \
  __syncthreads();
template <int WARPS, int UNROLL, bool BF16>
__device__ __forceinline__ void nf4_mma_pairs(const u8* codes, int n, int k, int bs, int nested,
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,
    const u16* x, u16* y, int m, float* lh, const float* lb, float lscale, int lr, int act,
    const float* la, unsigned int* flags, unsigned int epoch, int hb, const u16* rx,
    const u16* rb, int slices, float* scratch, unsigned int* counts) {
  extern __shared__ __align__(16) unsigned int pair_table[];
  PRODUCT_START
  fill_pairs<BF16>(pair_table);
  LOAD_TABLES
  __shared__ float part[WARPS][8][16];
  __shared__ bool last_slice;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g = lane >> 2, c = lane & 3;
  unsigned int lane4 = (unsigned int)lane << 2;
  unsigned int tb = (unsigned int)__cvta_generic_to_shared(pair_table);
  const u16* xr = g < m ? x + (long long)g * k : nullptr;
  int chunks = (k + 127) >> 7, lbs = __ffs(bs) - 1, lnbs = __ffs(nbs) - 1;
  // Columns from the lane's first in a chunk to the row's end: chunk ch holds some if ch * 128 < kc.
  int kc = k - (c << 5);
  int groups = (n + 15) >> 4, stride = gridDim.x - hb;
  int cps = (chunks + slices - 1) / slices, items = groups * slices;
  for (int item = bid; item < items; item += stride) {
    int grp = item / slices, cb = (item - grp * slices) * cps, ce = min(chunks, cb + cps);
    PairsGroup q = pairs_group(grp, g, c, n, k);
    long long first = (long long)grp * 16;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    for (int ch0 = cb + warp; ch0 < ce; ch0 += WARPS * UNROLL) {
      PairsRound<UNROLL> r;
      pairs_load<WARPS, UNROLL>(r, codes, q, k, ch0, ce, kc, lbs, absmax, aq, lnbs);
      if (ch0 == cb + warp) GRID_WAIT();
      pairs_compute<WARPS, UNROLL, BF16>(r, d, q.vb, ch0, ce, kc, c, xr, nested, code_s, offset,
                                         tb, lane4);
    }
    if (slices > 1) {
      STORE_SLICE_SUMS
    } else {
      STORE_SWAPPED_SUMS
      // The next group writes part again.
      __syncthreads();
    }
  }
}

// Every form's parameters (the pairs form alone reads the last three: its slices of k, their
// partial sums and the groups' counts; the others take slices 1).
#define MMA_PARAMS                                                                             \
    const u8* codes, int n, int k, int bs, int nested, const float* absmax, const u8* aq,      \
    const float* acode, float offset, int nbs, const u16* x, u16* y, int m, float* lh,         \
    const float* lb, float lscale, int lr, int act, const float* la, unsigned int* flags,      \
    unsigned int epoch, int hb, const u16* rx, const u16* rb, int slices, float* scratch,      \
    unsigned int* counts
#define MMA_ARGS                                                                               \
    codes, n, k, bs, nested, absmax, aq, acode, offset, nbs, x, y, m, lh, lb, lscale, lr, act, \
    la, flags, epoch, hb, rx, rb
// One instance a tiling and 16-bit type, named nf4_mma_{bf16,f16}_w<WARPS>u<UNROLL>t<TILES>h<0|1>
// (MmaTiling::kernel_name builds the same names).
#define MMA_KERNEL(TYPE, IS_BF16, W, U, T, H)                                                 \
extern "C" __global__ void __launch_bounds__(W * 32) nf4_mma_##TYPE##_w##W##u##U##t##T##h##H( \
    MMA_PARAMS) {                                                                             \
  nf4_mma<W, U, T, (H != 0), IS_BF16>(MMA_ARGS);                                               \
}
#define MMA_INSTANCE(W, U, T, H)                                                               \
  MMA_KERNEL(bf16, true, W, U, T, H) MMA_KERNEL(f16, false, W, U, T, H)
// The swapped form's instances, nf4_mma_{bf16,f16}_s<WARPS>u<UNROLL> (up to 8 rows).
#define MMA_SWAPPED_KERNEL(TYPE, IS_BF16, W, U)                                                \
extern "C" __global__ void __launch_bounds__(W * 32) nf4_mma_##TYPE##_s##W##u##U(MMA_PARAMS) {  \
  nf4_mma_swapped<W, U, IS_BF16>(MMA_ARGS);                                                    \
}
#define MMA_SWAPPED_INSTANCE(W, U)                                                             \
  MMA_SWAPPED_KERNEL(bf16, true, W, U) MMA_SWAPPED_KERNEL(f16, false, W, U)
// The gemv4bit form's, nf4_mma_{bf16,f16}_p<WARPS>u<UNROLL>: registers for 3 blocks a
// multiprocessor, as many as the table's shared memory lets an sm_90 one hold (the grid is
// those that fit, and at 2 a multiprocessor Falcon-7B's 292 groups of 16 features of the fused
// QKV would need two rounds on some blocks).
#define MMA_PAIRS_KERNEL(TYPE, IS_BF16, W, U)                                                  \
extern "C" __global__ void __launch_bounds__(W * 32, 3) nf4_mma_##TYPE##_p##W##u##U(MMA_PARAMS) { \
  nf4_mma_pairs<W, U, IS_BF16>(MMA_ARGS, slices, scratch, counts);                             \
}
#define MMA_PAIRS_INSTANCE(W, U)                                                               \
  MMA_PAIRS_KERNEL(bf16, true, W, U) MMA_PAIRS_KERNEL(f16, false, W, U)
MMA_TILINGS
