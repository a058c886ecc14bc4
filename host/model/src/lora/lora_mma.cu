// The LoRA training node's h and dA on the tensor cores (lora/kernels.rs picks them on sm_80 and
// later; lora.cu's are the others'). The operands are the ones lora.cu's kernels form, z dropped
// (and, for dA, through GELU) and rounded to the 16-bit type as the op-by-op graph's dropout
// writes it; only the order of the f32 sums differs. lora.cu's kernels spent most of their time
// multiplying on the CUDA cores from shared memory (on an H100, h of 4096 x 4544 took 65 µs,
// ~5x the time its 37 MB take to read); here that work is a few mma instructions a 32-column
// chunk, and what is left is reading z and drawing the mask.

// The dropout decisions of eight elements (e the index of the first, a multiple of 8), bit t
// for element e + t: two quads of the mask, one hash each. The node's h kernel can store them
// (one byte for eight elements) for dA to read instead of hashing again.
__device__ __forceinline__ unsigned int mask_byte(long long e, unsigned long long key,
    unsigned int below) {
  unsigned long long z0 = mask_state(key, e >> 2);
  unsigned long long b0 = mask_bits(z0), b1 = mask_bits(z0 + MASK_STEP);
  unsigned int byte = 0u;
  _Pragma("unroll") for (int t = 0; t < 4; ++t) {
    byte |= (unsigned int)dropped_in(b0, t, below) << t;
    byte |= (unsigned int)dropped_in(b1, t, below) << (t + 4);
  }
  return byte;
}

// Eight 16-bit values (one 16-byte word) as the op-by-op graph's dropout writes them (lora.cu's
// stage8), packed back into a word, given their decisions (bit t: element t dropped): with GELU
// (for dA) through the exact GELU first, then dropped; cvt.rn rounds as the op does but for a
// NaN's payload, which no sum keeps.
template <bool BF16, bool GELU>
__device__ __forceinline__ uint4 apply8(uint4 v, unsigned int byte, bool drop, float scale) {
  if (!drop && !GELU) return v;
  unsigned int w[4] = {v.x, v.y, v.z, v.w};
  _Pragma("unroll") for (int q = 0; q < 4; ++q) {
    float lo = load16<BF16>((u16)(w[q] & 0xffffu)), hi = load16<BF16>((u16)(w[q] >> 16));
    if (GELU) {
      lo = gelu16<BF16>(lo);
      hi = gelu16<BF16>(hi);
    }
    if (drop) {
      lo = __fmul_rn(lo, (byte >> (2 * q)) & 1u ? 0.0f : scale);
      hi = __fmul_rn(hi, (byte >> (2 * q + 1)) & 1u ? 0.0f : scale);
    }
    w[q] = BF16 ? pack_bf16x2(lo, hi) : pack_f16x2(lo, hi);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ unsigned int word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// h = dropout(z) A^T, the partial sums of slice blockIdx.y of k (part[slice][m][R], f32; lora.cu's
// lora_h_sum adds the slices in order). A block takes LHM_MT * 16 rows; its 8 warps take the
// slice's 32-column chunks in turn. The product needs no shared memory: the sum over k does not
// care which column pairs with which position of an mma's k, so lane (g, c) loads 16 bytes of
// z's rows g and g + 8 at columns 8c .. 8c + 7 of a chunk, and of A's rows g and g + 8 at the
// same columns, and the chunk's two k-steps take columns 8c + 4s .. 8c + 4s + 3 as the
// fragment's positions 2c, 2c + 1, 2c + 8, 2c + 9: A's operand and B's pair the same columns.
#define LHM_MT 2
template <int R, bool BF16>
__device__ __forceinline__ void lora_train_h_mma(const u16* z, const u16* a, float* part, int m,
    int k, int k_per, unsigned long long key, float p, float scale, unsigned char* bits,
    int store) {
  constexpr int NT = R / 8, ROWS = 16 * LHM_MT;
  __shared__ float red[8][ROWS][R];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g = lane >> 2, c = lane & 3;
  int row0 = blockIdx.x * ROWS;
  int kb = blockIdx.y * k_per, ke = min(k, kb + k_per);
  bool drop = p > 0.f;
  unsigned int below = drop_below(p);
  float acc[LHM_MT][NT][4];
  _Pragma("unroll") for (int i = 0; i < LHM_MT; ++i)
    _Pragma("unroll") for (int j = 0; j < NT; ++j)
      _Pragma("unroll") for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
  uint4 zw[LHM_MT][2], aw[NT];
  auto fetch = [&](int c0) {
    int col = c0 + 8 * c;
    bool in = col < ke;
    _Pragma("unroll") for (int i = 0; i < LHM_MT; ++i)
      _Pragma("unroll") for (int hf = 0; hf < 2; ++hf) {
        int r = row0 + 16 * i + g + 8 * hf;
        zw[i][hf] = in && r < m ? __ldg((const uint4*)(z + (long long)r * k + col))
                                : make_uint4(0u, 0u, 0u, 0u);
      }
    _Pragma("unroll") for (int j = 0; j < NT; ++j)
      aw[j] = in ? __ldg((const uint4*)(a + (long long)(8 * j + g) * k + col))
                 : make_uint4(0u, 0u, 0u, 0u);
  };
  int c0 = kb + 32 * warp;
  if (c0 < ke) fetch(c0);
  for (; c0 < ke; c0 += 8 * 32) {
    uint4 zc[LHM_MT][2], ac[NT];
    _Pragma("unroll") for (int i = 0; i < LHM_MT; ++i)
      _Pragma("unroll") for (int hf = 0; hf < 2; ++hf) {
        int r = row0 + 16 * i + g + 8 * hf;
        long long e = (long long)r * k + c0 + 8 * c;
        unsigned int byte = drop ? mask_byte(e, key, below) : 0u;
        // Every element of z is in one lane's word of one block: each byte is written once.
        if (store && drop && r < m && c0 + 8 * c < ke) bits[e >> 3] = (unsigned char)byte;
        zc[i][hf] = apply8<BF16, false>(zw[i][hf], byte, drop, scale);
      }
    _Pragma("unroll") for (int j = 0; j < NT; ++j) ac[j] = aw[j];
    if (c0 + 8 * 32 < ke) fetch(c0 + 8 * 32);
    _Pragma("unroll") for (int s = 0; s < 2; ++s)
      _Pragma("unroll") for (int j = 0; j < NT; ++j)
        _Pragma("unroll") for (int i = 0; i < LHM_MT; ++i)
          mma_16816<BF16>(acc[i][j], word(zc[i][0], 2 * s), word(zc[i][1], 2 * s),
                          word(zc[i][0], 2 * s + 1), word(zc[i][1], 2 * s + 1),
                          word(ac[j], 2 * s), word(ac[j], 2 * s + 1));
  }
  // The warps' sums added in warp order, so the result does not depend on timing.
  _Pragma("unroll") for (int i = 0; i < LHM_MT; ++i)
    _Pragma("unroll") for (int j = 0; j < NT; ++j)
      _Pragma("unroll") for (int q = 0; q < 4; ++q)
        red[warp][16 * i + g + 8 * (q >> 1)][8 * j + 2 * c + (q & 1)] = acc[i][j][q];
  __syncthreads();
  float* hs = part + (long long)blockIdx.y * m * R;
  for (int o = threadIdx.x; o < ROWS * R; o += blockDim.x) {
    int r = o / R, j = o % R;
    if (row0 + r >= m) continue;
    float sum = 0.f;
    _Pragma("unroll") for (int w = 0; w < 8; ++w) sum += red[w][r][j];
    hs[(long long)(row0 + r) * R + j] = sum;
  }
}
#define LORA_TRAIN_H_MMA(R)                                                                    \
extern "C" __global__ void __launch_bounds__(256) lora_train_h_mma_bf16_r##R(const u16* z,    \
    const u16* a, float* part, int k, int k_per, int m, unsigned long long key, float p,       \
    float scale, unsigned char* bits, int store) {                                            \
  lora_train_h_mma<R, true>(z, a, part, m, k, k_per, key, p, scale, bits, store);              \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(256) lora_train_h_mma_f16_r##R(const u16* z,     \
    const u16* a, float* part, int k, int k_per, int m, unsigned long long key, float p,       \
    float scale, unsigned char* bits, int store) {                                            \
  lora_train_h_mma<R, false>(z, a, part, m, k, k_per, key, p, scale, bits, store);             \
}
LORA_TRAIN_H_MMA(8)
LORA_TRAIN_H_MMA(16)

// The staged kernels' loads (dA's and gh/dB's), 16 bytes each, zeros past the edges: word t of
// a chunk of COLS columns (from c0) of rows r0 .. (before re) of x ([.., width], row-major),
// and word t of the rows r0 .. of a rank-wide [.., R] matrix (R / 8 words a row).
template <int COLS>
__device__ __forceinline__ uint4 chunk_word(const u16* x, int t, int r0, int re, int c0,
    int width) {
  int r = t / (COLS / 8), col = c0 + (t % (COLS / 8)) * 8;
  return r0 + r < re && col < width ? __ldg((const uint4*)(x + (long long)(r0 + r) * width + col))
                                    : make_uint4(0u, 0u, 0u, 0u);
}
template <int R>
__device__ __forceinline__ uint4 rank_word(const u16* x, int t, int r0, int re) {
  int r = t / (R / 8);
  return r0 + r < re ? __ldg((const uint4*)(x + (long long)(r0 + r) * R) + t % (R / 8))
                     : make_uint4(0u, 0u, 0u, 0u);
}

// dA = gh^T dropout(z) ([R, k]; gh [m, R]), the partial sums of slab blockIdx.y of the rows
// (part[slab][R][k], added in slab order by lora_h_sum). The sum runs over z's rows, which are
// not contiguous, so a block stages DAM_ROWS rows of its DAM_COLS columns (dropped, 16-bit) and
// of gh in shared memory, and ldmatrix's transposing form hands both to the mma as operands
// whose k runs down the rows: A = gh^T (the ranks, 16, zero past R), B = the staged z. Each warp
// owns 16 columns. The next chunk's loads are issued before the current one is used. Rows are
// padded by 8 values so that ldmatrix's eight 16-byte rows fall in distinct banks.
#define DAM_COLS 128
#define DAM_ROWS 32
template <int R, bool BF16, bool GELU>
__device__ __forceinline__ void lora_train_da_mma(const u16* z, const u16* gh, float* part,
    int m, int k, int rows_per, unsigned long long key, float p, float scale,
    const unsigned char* bits, int stored) {
  __shared__ __align__(16) u16 zs[DAM_ROWS][DAM_COLS + 8];
  __shared__ __align__(16) u16 gs[DAM_ROWS][16 + 8];
  constexpr int GV = DAM_ROWS * R / 8;  // gh's 16-byte words a chunk
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g = lane >> 2, c = lane & 3;
  int c0 = blockIdx.x * DAM_COLS;
  int rb = blockIdx.y * rows_per, re = min(m, rb + rows_per);
  bool drop = p > 0.f;
  if (R < 16)
    for (int t = threadIdx.x; t < DAM_ROWS; t += blockDim.x)
      *(uint4*)&gs[t][8] = make_uint4(0u, 0u, 0u, 0u);
  float acc[2][4];
  _Pragma("unroll") for (int j = 0; j < 2; ++j)
    _Pragma("unroll") for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;
  uint4 zr[2], gr = make_uint4(0u, 0u, 0u, 0u);
  unsigned int mb[2] = {0u, 0u};
  unsigned int below = drop_below(p);
  auto fetch = [&](int r0) {
    _Pragma("unroll") for (int l = 0; l < 2; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (DAM_COLS / 8), col = c0 + (t % (DAM_COLS / 8)) * 8;
      zr[l] = chunk_word<DAM_COLS>(z, t, r0, re, c0, k);
      // The stored decisions where h kept them, loaded with the chunk.
      if (stored && drop)
        mb[l] = r0 + r < re && col < k ? (unsigned int)__ldg(bits + (((long long)(r0 + r) * k + col) >> 3)) : 0u;
    }
    if (threadIdx.x < GV) gr = rank_word<R>(gh, threadIdx.x, r0, re);
  };
  fetch(rb);
  int i8 = lane & 7, quad = lane >> 3;
  for (int r0 = rb; r0 < re; r0 += DAM_ROWS) {
    _Pragma("unroll") for (int l = 0; l < 2; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (DAM_COLS / 8), cc = (t % (DAM_COLS / 8)) * 8;
      unsigned int byte =
          !drop ? 0u : stored ? mb[l] : mask_byte((long long)(r0 + r) * k + c0 + cc, key, below);
      *(uint4*)&zs[r][cc] = apply8<BF16, GELU>(zr[l], byte, drop, scale);
    }
    if (threadIdx.x < GV)
      *(uint4*)&gs[threadIdx.x / (R / 8)][8 * (threadIdx.x % (R / 8))] = gr;
    __syncthreads();
    if (r0 + DAM_ROWS < re) fetch(r0 + DAM_ROWS);
    _Pragma("unroll") for (int ks = 0; ks < DAM_ROWS / 16; ++ks) {
      unsigned af[4], bf[4];
      // A = gh^T: matrices (ranks 0-7 | 8-15) x (rows 0-7 | 8-15), in a0..a3's order.
      ldsm_x4_t(af, &gs[16 * ks + i8 + 8 * (quad >> 1)][8 * (quad & 1)]);
      // B = z: (rows 0-7 | 8-15) of columns 0-7, then of columns 8-15, of the warp's 16.
      ldsm_x4_t(bf, &zs[16 * ks + i8 + 8 * (quad & 1)][16 * warp + 8 * (quad >> 1)]);
      mma_16816<BF16>(acc[0], af[0], af[1], af[2], af[3], bf[0], bf[1]);
      mma_16816<BF16>(acc[1], af[0], af[1], af[2], af[3], bf[2], bf[3]);
    }
    __syncthreads();
  }
  _Pragma("unroll") for (int j = 0; j < 2; ++j) {
    int col = c0 + 16 * warp + 8 * j + 2 * c;
    if (col >= k) continue;
    _Pragma("unroll") for (int hf = 0; hf < 2; ++hf) {
      int rank = g + 8 * hf;
      if (rank >= R) continue;
      float2 v = make_float2(acc[j][2 * hf], acc[j][2 * hf + 1]);
      *(float2*)(part + ((long long)blockIdx.y * R + rank) * k + col) = v;
    }
  }
}
#define LORA_TRAIN_DA_MMA(NAME, R, BF16, GELU)                                                 \
extern "C" __global__ void __launch_bounds__(256) NAME(const u16* z, const u16* gh,           \
    float* part, int k, int rows_per, int m, unsigned long long key, float p, float scale,     \
    const unsigned char* bits, int stored) {                                                  \
  lora_train_da_mma<R, BF16, GELU>(z, gh, part, m, k, rows_per, key, p, scale, bits, stored);  \
}
LORA_TRAIN_DA_MMA(lora_train_da_mma_bf16_r8, 8, true, false)
LORA_TRAIN_DA_MMA(lora_train_da_mma_bf16_r16, 16, true, false)
LORA_TRAIN_DA_MMA(lora_train_da_mma_f16_r8, 8, false, false)
LORA_TRAIN_DA_MMA(lora_train_da_mma_f16_r16, 16, false, false)
LORA_TRAIN_DA_MMA(lora_train_da_mma_gelu_bf16_r8, 8, true, true)
LORA_TRAIN_DA_MMA(lora_train_da_mma_gelu_bf16_r16, 16, true, true)
LORA_TRAIN_DA_MMA(lora_train_da_mma_gelu_f16_r8, 8, false, true)
LORA_TRAIN_DA_MMA(lora_train_da_mma_gelu_f16_r16, 16, false, true)

// The training node's gh = g bs ([m, R]) and dbs = g^T h ([n, R]) from one read of g ([m, n],
// the output's gradient; bs = scaling * B [n, R]; h [m, R]), where two cuBLAS products read g
// once each (Falcon-7B at 8 x 512: 8.4 GB a step, twice). A block takes GB_COLS columns of one
// slab of rows, walking it in GB_ROWS-row chunks staged in shared memory (the next chunk's loads
// issued into registers before the current one is used). Each warp owns 32 of the columns:
// - dbs: hs^T times the chunk (ldmatrix's transposing form for both, as lora_train_da_mma),
//   summed over the slab's rows in registers; written as slab blockIdx.y's partial sums
//   (dbp[slab][n][R]).
// - gh: the chunk's rows times the warp's 32 rows of bs (staged once, [GB_COLS][R]), then the
//   eight warps' sums added in warp order through shared memory (the chunk's buffer, no longer
//   read) and written as column block blockIdx.x's partial sums (ghp[block][m][R]).
// lora_h_sum adds both partials in order, so the result does not depend on timing.
#define GB_COLS 256
#define GB_ROWS 32
template <int R, bool BF16>
__device__ __forceinline__ void lora_grad_hb(const u16* g, const u16* bs, const u16* h,
    float* ghp, float* dbp, int m, int n, int rows_per) {
  __shared__ __align__(16) u16 gt[GB_ROWS][GB_COLS + 8];
  __shared__ __align__(16) u16 bst[GB_COLS][16 + 8];
  __shared__ __align__(16) u16 ht[GB_ROWS][16 + 8];
  static_assert(sizeof(gt) >= 8 * GB_ROWS * 16 * sizeof(float), "gh's reduction fits the tile");
  float (*red)[GB_ROWS][16] = (float (*)[GB_ROWS][16])&gt[0][0];
  constexpr int HV = GB_ROWS * R / 8;  // h's 16-byte words a chunk
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int g8 = lane >> 2, c = lane & 3, i8 = lane & 7, quad = lane >> 3;
  int c0 = blockIdx.x * GB_COLS;
  int rb = blockIdx.y * rows_per, re = min(m, rb + rows_per);
  // bs's rows of the block's columns, ranks past R zero.
  for (int t = threadIdx.x; t < GB_COLS * 2; t += blockDim.x) {
    int r = t >> 1, half = t & 1, col = c0 + r;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (col < n && 8 * half < R) v = __ldg((const uint4*)(bs + (long long)col * R) + half);
    *(uint4*)&bst[r][8 * half] = v;
  }
  if (R < 16)
    for (int t = threadIdx.x; t < GB_ROWS; t += blockDim.x)
      *(uint4*)&ht[t][8] = make_uint4(0u, 0u, 0u, 0u);
  float db[4][4], gh[2][2][4];
  _Pragma("unroll") for (int j = 0; j < 4; ++j)
    _Pragma("unroll") for (int q = 0; q < 4; ++q) db[j][q] = 0.f;
  uint4 gr[4], hr = make_uint4(0u, 0u, 0u, 0u);
  auto fetch = [&](int r0) {
    _Pragma("unroll") for (int l = 0; l < 4; ++l)
      gr[l] = chunk_word<GB_COLS>(g, threadIdx.x + 256 * l, r0, re, c0, n);
    if (threadIdx.x < HV) hr = rank_word<R>(h, threadIdx.x, r0, re);
  };
  fetch(rb);
  for (int r0 = rb; r0 < re; r0 += GB_ROWS) {
    _Pragma("unroll") for (int l = 0; l < 4; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (GB_COLS / 8), cc = (t % (GB_COLS / 8)) * 8;
      *(uint4*)&gt[r][cc] = gr[l];
    }
    if (threadIdx.x < HV) *(uint4*)&ht[threadIdx.x / (R / 8)][8 * (threadIdx.x % (R / 8))] = hr;
    __syncthreads();
    if (r0 + GB_ROWS < re) fetch(r0 + GB_ROWS);
    _Pragma("unroll") for (int i = 0; i < 2; ++i)
      _Pragma("unroll") for (int j = 0; j < 2; ++j)
        _Pragma("unroll") for (int q = 0; q < 4; ++q) gh[i][j][q] = 0.f;
    _Pragma("unroll") for (int ks = 0; ks < 2; ++ks) {
      // dbs^T += h^T (ranks x rows ks) times g (rows ks x the warp's 32 columns).
      unsigned af[4], bf[4];
      ldsm_x4_t(af, &ht[16 * ks + i8 + 8 * (quad >> 1)][8 * (quad & 1)]);
      _Pragma("unroll") for (int hf = 0; hf < 2; ++hf) {
        ldsm_x4_t(bf, &gt[16 * ks + i8 + 8 * (quad & 1)][32 * warp + 16 * hf + 8 * (quad >> 1)]);
        mma_16816<BF16>(db[2 * hf], af[0], af[1], af[2], af[3], bf[0], bf[1]);
        mma_16816<BF16>(db[2 * hf + 1], af[0], af[1], af[2], af[3], bf[2], bf[3]);
      }
      // gh += g (the chunk's rows x columns 32 warp + 16 ks ..) times bs (those rows x ranks).
      int kc = 32 * warp + 16 * ks;
      unsigned bb[4];
      ldsm_x4_t(bb, &bst[kc + 8 * (quad & 1) + i8][8 * (quad >> 1)]);
      _Pragma("unroll") for (int i = 0; i < 2; ++i) {
        unsigned aa[4];
        ldsm_x4(aa, &gt[16 * i + 8 * (quad & 1) + i8][kc + 8 * (quad >> 1)]);
        mma_16816<BF16>(gh[i][0], aa[0], aa[1], aa[2], aa[3], bb[0], bb[1]);
        if (R == 16) mma_16816<BF16>(gh[i][1], aa[0], aa[1], aa[2], aa[3], bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with the chunk: its buffer takes gh's sums
    _Pragma("unroll") for (int i = 0; i < 2; ++i)
      _Pragma("unroll") for (int j = 0; j < 2; ++j)
        _Pragma("unroll") for (int q = 0; q < 4; ++q)
          red[warp][16 * i + g8 + 8 * (q >> 1)][8 * j + 2 * c + (q & 1)] = gh[i][j][q];
    __syncthreads();
    for (int o = threadIdx.x; o < GB_ROWS * R; o += blockDim.x) {
      int r = o / R, j = o % R;
      if (r0 + r >= re) continue;
      float sum = 0.f;
      _Pragma("unroll") for (int w = 0; w < 8; ++w) sum += red[w][r][j];
      ghp[((long long)blockIdx.x * m + r0 + r) * R + j] = sum;
    }
    __syncthreads();  // before the next chunk is staged over the sums
  }
  // db[j]: ranks g8 (q < 2) and g8 + 8, columns 32 warp + 8 j + 2c (+1).
  _Pragma("unroll") for (int j = 0; j < 4; ++j) {
    int col = c0 + 32 * warp + 8 * j + 2 * c;
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      int rank = g8 + 8 * (q >> 1), cq = col + (q & 1);
      if (rank < R && cq < n) dbp[((long long)blockIdx.y * n + cq) * R + rank] = db[j][q];
    }
  }
}
#define LORA_GRAD_HB(R)                                                                        \
extern "C" __global__ void __launch_bounds__(256) lora_grad_hb_bf16_r##R(const u16* g,        \
    const u16* bs, const u16* h, float* ghp, float* dbp, int m, int n, int rows_per) {         \
  lora_grad_hb<R, true>(g, bs, h, ghp, dbp, m, n, rows_per);                                  \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(256) lora_grad_hb_f16_r##R(const u16* g,         \
    const u16* bs, const u16* h, float* ghp, float* dbp, int m, int n, int rows_per) {         \
  lora_grad_hb<R, false>(g, bs, h, ghp, dbp, m, n, rows_per);                                 \
}
LORA_GRAD_HB(8)
LORA_GRAD_HB(16)
