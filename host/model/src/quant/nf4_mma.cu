// The tensor-core NF4 GEMM for batched decoding (host side in quant/kernels.rs), after
// nf4_common.cu. Its own module, compiled for compute_80 (mma.sync with bf16 needs sm_80): a
// card that cannot run it keeps every other NF4 kernel.
// y = x W^T for up to 16 rows (batched decoding) on the tensor cores: mma.sync m16n8k16 with x
// as the 16 x 16 A operand (rows past m are zeros) and 8 output features of W as B, each weight
// dequantized in registers to the 16-bit value the dequantize kernel writes (so the products are
// those of dequantize + cuBLAS, summed in f32 in another order) and never stored. The dot
// product over k does not care which column goes in which of an mma's 16 k slots, as long as
// x and W agree: lane (g, c) (g = lane / 4, c = lane % 4) takes columns 32c .. 32c + 31 of a
// 128-column chunk, one 16-byte load of codes for feature g (one absmax block, as the 32-column
// GEMV), and step s of the chunk's 8 mma steps gives its k slots {2c, 2c + 1, 2c + 8, 2c + 9}
// columns 32c + 4s + {0, 1, 2, 3}. A block's MMA_WARPS warps split the chunks of the same 8
// features (each issuing MMA_UNROLL chunks' loads of codes before using them) and add their
// partial sums through shared memory. The caller guarantees k % 32 == 0, a blocksize that is
// a power of two of at least 32, a nested blocksize (nbs, 1 without nesting) that is a power of
// two, n % 8 == 0 and x contiguous from a 16-byte boundary. The weights are dequantized as
// nf4_values8 reads them, the absmax loads issued with the codes' (absmax_fetch), and each pair
// rounded to 16 bits in one instruction: per weight, ~3 instructions fewer than indexing by
// nibble and rounding in software.
// Two f32 rounded to nearest-even 16-bit values in one instruction, `lo` in the low half (the
// same bits as f32_to_bf16 / f32_to_f16 but for NaN, which comes out canonical).
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
  unsigned int d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ unsigned int pack_f16x2(float lo, float hi) {
  unsigned int d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
#define MMA_WARPS 8
#define MMA_UNROLL 2
#define MMA_GEMM(NAME, LOAD, STORE, PACK, MMA_TYPE)                                            \
extern "C" __global__ void NAME(const u8* codes, int n, int k, int bs, int nested,             \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,              \
    const u16* x, u16* y, int m, const float* lh, const float* lb, float lscale, int lr) {    \
  LOAD_TABLES                                                                                  \
  __shared__ float part[MMA_WARPS][16][8];                                                     \
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;                                        \
  int g = lane >> 2, c = lane & 3;                                                             \
  long long feature = (long long)blockIdx.x * 8 + g;                                           \
  const u8* wrow = codes + ((feature * (long long)k) >> 1);                                    \
  float d[4] = {0.f, 0.f, 0.f, 0.f};                                                           \
  int chunks = (k + 127) >> 7, lbs = __ffs(bs) - 1, lnbs = __ffs(nbs) - 1;                   \
  for (int ch0 = warp; ch0 < chunks; ch0 += MMA_WARPS * MMA_UNROLL) {                         \
    uint4 cw[MMA_UNROLL];                                                                      \
    unsigned int aqv[MMA_UNROLL];                                                              \
    float am[MMA_UNROLL];                                                                      \
    _Pragma("unroll") for (int u = 0; u < MMA_UNROLL; ++u) {                                  \
      int col = ((ch0 + u * MMA_WARPS) << 7) + (c << 5);                                       \
      cw[u] = make_uint4(0u, 0u, 0u, 0u);                                                      \
      aqv[u] = 0u;                                                                             \
      am[u] = 0.f;                                                                             \
      if (ch0 + u * MMA_WARPS < chunks && col < k) {                                          \
        cw[u] = __ldcs((const uint4*)(wrow + (col >> 1)));                                     \
        absmax_fetch((feature * (long long)k + col) >> lbs, absmax, aq, lnbs, &aqv[u], &am[u]); \
      }                                                                                       \
    }                                                                                         \
    _Pragma("unroll") for (int u = 0; u < MMA_UNROLL; ++u) {                                  \
      if (ch0 + u * MMA_WARPS >= chunks) break;                                                \
      int col = ((ch0 + u * MMA_WARPS) << 7) + (c << 5);                                       \
      bool valid = col < k;                                                                    \
      unsigned int xa[16], xb[16];                                                             \
      _Pragma("unroll") for (int q = 0; q < 4; ++q) {                                         \
        uint4 va = make_uint4(0u, 0u, 0u, 0u), vb = va;                                        \
        if (valid && g < m) va = __ldg((const uint4*)(x + (long long)g * k + col + 8 * q));    \
        if (valid && g + 8 < m) vb = __ldg((const uint4*)(x + (long long)(g + 8) * k + col + 8 * q)); \
        xa[4 * q] = va.x; xa[4 * q + 1] = va.y; xa[4 * q + 2] = va.z; xa[4 * q + 3] = va.w;    \
        xb[4 * q] = vb.x; xb[4 * q + 1] = vb.y; xb[4 * q + 2] = vb.z; xb[4 * q + 3] = vb.w;    \
      }                                                                                       \
      float a = absmax_value(aqv[u], am[u], nested, code_s, offset);                          \
      unsigned int cws[4] = {cw[u].x, cw[u].y, cw[u].z, cw[u].w};                              \
      float w[8];                                                                              \
      _Pragma("unroll") for (int s = 0; s < 8; ++s) {                                         \
        if ((s & 1) == 0) nf4_values8(nf4s, cws[s >> 1], w);                                   \
        const float* ws = w + 4 * (s & 1);                                                     \
        unsigned int r0 = PACK(__fmul_rn(ws[0], a), __fmul_rn(ws[1], a));                      \
        unsigned int r1 = PACK(__fmul_rn(ws[2], a), __fmul_rn(ws[3], a));                      \
        asm volatile(                                                                          \
          "mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "               \
          "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                  \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                     \
          : "r"(xa[2 * s]), "r"(xb[2 * s]), "r"(xa[2 * s + 1]), "r"(xb[2 * s + 1]),            \
            "r"(r0), "r"(r1));                                                                 \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  part[warp][g][2 * c] = d[0];                                                                 \
  part[warp][g][2 * c + 1] = d[1];                                                             \
  part[warp][g + 8][2 * c] = d[2];                                                             \
  part[warp][g + 8][2 * c + 1] = d[3];                                                         \
  __syncthreads();                                                                             \
  for (int e = threadIdx.x; e < 16 * 8; e += blockDim.x) {                                    \
    int r = e >> 3, f = e & 7;                                                                 \
    long long o = (long long)blockIdx.x * 8 + f;                                               \
    if (r >= m || o >= n) continue;                                                           \
    float sum = 0.f;                                                                           \
    _Pragma("unroll") for (int w = 0; w < MMA_WARPS; ++w) sum += part[w][r][f];               \
    STORE_OUT(LOAD, STORE, r, o, sum)                                                         \
  }                                                                                           \
}
MMA_GEMM(nf4_mma_bf16, bf16_to_f32, f32_to_bf16, pack_bf16x2, "bf16")
MMA_GEMM(nf4_mma_f16, f16_to_f32, f32_to_f16, pack_f16x2, "f16")
