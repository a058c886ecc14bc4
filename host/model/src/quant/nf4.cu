// NF4 (bitsandbytes) dequantization and the decoding GEMVs, host side in quant/kernels.rs,
// after nf4_common.cu. GEMV_MAX_ROWS, GEMM_MAX_ROWS and NF4_TABLE are defined by the host
// before these sources. Quantization is in nf4_quantize.cu, its own module: a load-time kernel
// must not be able to break these; the tensor-core GEMM is in nf4_mma.cu, another module, since
// it needs a newer architecture than the rest.
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

#define DEQUANT(NAME, T, CONV)                                                                 \
extern "C" __global__ void NAME(const u8* codes, long long n, int bs, int nested,              \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs, T* out) {   \
  LOAD_TABLES                                                                                  \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= (n + 1) / 2) return;                                                                \
  u8 c = codes[i];                                                                             \
  long long e = 2 * i;                                                                         \
  out[e] = CONV(__fmul_rn(nf4s[c >> 4], absmax_of(div_pow2(e, bs), nested, absmax, aq, code_s, offset, nbs))); \
  if (e + 1 < n)                                                                               \
    out[e + 1] = CONV(__fmul_rn(nf4s[c & 15], absmax_of(div_pow2(e + 1, bs), nested, absmax, aq, code_s, offset, nbs))); \
}
DEQUANT(nf4_dequant_f32, float, f32_id)
DEQUANT(nf4_dequant_bf16, u16, f32_to_bf16)
DEQUANT(nf4_dequant_f16, u16, f32_to_f16)

// The same, 8 weights a thread: one 4-byte load of codes, one absmax (the caller guarantees
// n % 8 == 0 and bs % 8 == 0, so the 8 share a block), 16- or 32-byte stores. Indices are
// 32-bit (the caller guarantees n < 2^32): 64-bit divisions cost more than the memory traffic.
#define DEQUANT8(NAME, T, CONV, STORE8)                                                        \
extern "C" __global__ void NAME(const u8* codes, long long n, int bs, int nested,              \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs, T* out) {   \
  LOAD_TABLES                                                                                  \
  unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;                                      \
  if (i >= (unsigned int)(n / 8)) return;                                                      \
  unsigned int c = ((const unsigned int*)codes)[i];                                            \
  unsigned int blk = 8u * i / (unsigned int)bs;                                                \
  float a = nested ? __fadd_rn(__fmul_rn(code_s[aq[blk]], absmax[blk / (unsigned int)nbs]), offset) \
                   : absmax[blk];                                                              \
  float w[8];                                                                                  \
  _Pragma("unroll") for (int t = 0; t < 4; ++t) {                                             \
    unsigned int b = (c >> (8 * t)) & 255u;                                                    \
    w[2 * t] = __fmul_rn(nf4s[b >> 4], a);                                                     \
    w[2 * t + 1] = __fmul_rn(nf4s[b & 15], a);                                                 \
  }                                                                                           \
  STORE8(out, i, w, CONV)                                                                      \
}
#define STORE8_16(out, i, w, CONV) {                                                          \
  uint4 v;                                                                                     \
  v.x = (unsigned int)CONV(w[0]) | ((unsigned int)CONV(w[1]) << 16);                           \
  v.y = (unsigned int)CONV(w[2]) | ((unsigned int)CONV(w[3]) << 16);                           \
  v.z = (unsigned int)CONV(w[4]) | ((unsigned int)CONV(w[5]) << 16);                           \
  v.w = (unsigned int)CONV(w[6]) | ((unsigned int)CONV(w[7]) << 16);                           \
  ((uint4*)out)[i] = v; }
#define STORE8_32(out, i, w, CONV) {                                                          \
  ((float4*)out)[2 * i] = make_float4(w[0], w[1], w[2], w[3]);                                 \
  ((float4*)out)[2 * i + 1] = make_float4(w[4], w[5], w[6], w[7]); }
DEQUANT8(nf4_dequant8_f32, float, f32_id, STORE8_32)
DEQUANT8(nf4_dequant8_bf16, u16, f32_to_bf16, STORE8_16)
DEQUANT8(nf4_dequant8_f16, u16, f32_to_f16, STORE8_16)

// The same with WORDS 4-byte words of codes a thread, a warp's width apart (each load and each
// store a warp makes is contiguous), for power-of-two blocksizes (bitsandbytes' all are): block
// indices by shifts, every word's loads (codes, absmax) issued before the tables' barrier and
// before any is used. DEQUANT8 reads 4 bytes of codes a thread and pays a load of the tables
// and a barrier for every 1 KB of codes, two 32-bit divisions a word: it ran at ~240 GB/s of
// codes on an H100 (2026-12-07), a tenth of the card's bandwidth, where the prefill of a
// decoded prompt and every training step dequantize every weight.
#define DEQUANT_WIDE(NAME, T, CONV, STORE8)                                                    \
extern "C" __global__ void NAME(const u8* codes, long long n, int bs, int nested,              \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs, T* out) {   \
  unsigned int words = (unsigned int)(n / 8);                                                  \
  unsigned int first = (blockIdx.x * blockDim.x + (threadIdx.x & ~31u)) * DEQUANT_WORDS        \
                       + (threadIdx.x & 31u);                                                  \
  int lbs = __ffs(bs) - 1, lnbs = __ffs(nbs) - 1;                                              \
  unsigned int c[DEQUANT_WORDS], q[DEQUANT_WORDS];                                             \
  float am[DEQUANT_WORDS];                                                                     \
  _Pragma("unroll") for (int s = 0; s < DEQUANT_WORDS; ++s) {                                  \
    unsigned int i = first + 32u * s;                                                          \
    c[s] = 0u; q[s] = 0u; am[s] = 0.f;                                                         \
    if (i < words) {                                                                          \
      c[s] = __ldcs((const unsigned int*)codes + i);                                           \
      absmax_fetch((8u * i) >> lbs, absmax, aq, lnbs, &q[s], &am[s]);                          \
    }                                                                                         \
  }                                                                                           \
  LOAD_TABLES                                                                                  \
  _Pragma("unroll") for (int s = 0; s < DEQUANT_WORDS; ++s) {                                  \
    unsigned int i = first + 32u * s;                                                          \
    if (i >= words) break;                                                                     \
    float a = absmax_value(q[s], am[s], nested, code_s, offset);                               \
    float w[8];                                                                                \
    nf4_values8(nf4s, c[s], w);                                                                \
    _Pragma("unroll") for (int t = 0; t < 8; ++t) w[t] = __fmul_rn(w[t], a);                   \
    STORE8(out, i, w, CONV)                                                                    \
  }                                                                                           \
}
DEQUANT_WIDE(nf4_dequant_wide_f32, float, f32_id, STORE8_32)
DEQUANT_WIDE(nf4_dequant_wide_bf16, u16, f32_to_bf16, STORE8_16)
DEQUANT_WIDE(nf4_dequant_wide_f16, u16, f32_to_f16, STORE8_16)

// The 8 weights of one 4-byte word of codes (first code in the high nibble of each byte),
// scaled by their block's absmax; and their dot product with 8 16-bit inputs in a uint4.
#define DECODE8(w, v, a)                                                                       \
  _Pragma("unroll") for (int t = 0; t < 4; ++t) {                                             \
    unsigned int b_ = ((v) >> (8 * t)) & 255u;                                                 \
    (w)[2 * t] = nf4s[b_ >> 4] * (a);                                                          \
    (w)[2 * t + 1] = nf4s[b_ & 15] * (a);                                                      \
  }
#define DOT8(w, xv, LOAD)                                                                      \
  ((w)[0] * LOAD((u16)((xv).x & 0xffffu)) + (w)[1] * LOAD((u16)((xv).x >> 16))                 \
   + (w)[2] * LOAD((u16)((xv).y & 0xffffu)) + (w)[3] * LOAD((u16)((xv).y >> 16))               \
   + (w)[4] * LOAD((u16)((xv).z & 0xffffu)) + (w)[5] * LOAD((u16)((xv).z >> 16))               \
   + (w)[6] * LOAD((u16)((xv).w & 0xffffu)) + (w)[7] * LOAD((u16)((xv).w >> 16)))

// The GEMVs' start: the tables in shared memory, this warp's output feature (`row`, a warp
// each) and its first weight (`base`), and a zeroed f32 sum for each of up to R input rows.
#define GEMV_PROLOGUE(R)                                                                       \
  LOAD_TABLES                                                                                  \
  int lane = threadIdx.x & 31;                                                                 \
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);              \
  if (row >= n) return;                                                                        \
  float acc[R];                                                                                \
  _Pragma("unroll") for (int r = 0; r < R; ++r) acc[r] = 0.f;                                  \
  long long base = row * (long long)k;

// One warp per output feature; each lane walks the row's codes 4 bytes (8 weights) at a time.
#define GEMV(NAME, LOAD, STORE)                                                                \
extern "C" __global__ void NAME(const u8* codes, int n, int k, int bs, int nested,             \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,              \
    const u16* x, u16* y, int m, const float* lh, const float* lb, float lscale, int lr) {    \
  GEMV_PROLOGUE(GEMV_MAX_ROWS)                                                                 \
  if ((k & 7) == 0 && (bs & 7) == 0) {                                                        \
    const unsigned int* cw = (const unsigned int*)(codes + (base >> 1));                       \
    int nw = k >> 3;                                                                           \
    for (int j = lane; j < nw; j += 32) {                                                     \
      unsigned int v = cw[j];                                                                  \
      float a = absmax_of(div_pow2(base + 8LL * j, bs), nested, absmax, aq, code_s, offset, nbs);     \
      float w[8];                                                                              \
      DECODE8(w, v, a);                                                                        \
      _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r) {                             \
        if (r < m) {                                                                          \
          uint4 xv = *(const uint4*)(x + (long long)r * k + 8 * j);                            \
          acc[r] += DOT8(w, xv, LOAD);                                                         \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
  } else {                                                                                   \
    for (int kk = lane; kk < k; kk += 32) {                                                   \
      long long e = base + kk;                                                                 \
      u8 c = codes[e >> 1];                                                                    \
      float wv = nf4s[(e & 1) ? (c & 15) : (c >> 4)]                                           \
               * absmax_of(div_pow2(e, bs), nested, absmax, aq, code_s, offset, nbs);                   \
      _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r)                                \
        if (r < m) acc[r] += wv * LOAD(x[(long long)r * k + kk]);                              \
    }                                                                                         \
  }                                                                                           \
  _Pragma("unroll") for (int r = 0; r < GEMV_MAX_ROWS; ++r) {                                 \
    if (r < m) {                                                                              \
      float s = acc[r];                                                                        \
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);        \
      if (lane == 0) STORE_OUT(LOAD, STORE, r, row, s)                                         \
    }                                                                                         \
  }                                                                                           \
}
GEMV(nf4_gemv_bf16, bf16_to_f32, f32_to_bf16)
GEMV(nf4_gemv_f16, f16_to_f32, f32_to_f16)

// The same GEMV where the row length is a multiple of 32, the blocksize a power of two of at
// least 32 and the nested blocksize (nbs, 1 without nesting) a power of two (every Falcon and
// Llama shape in bitsandbytes' format), for up to R rows (R = 1: batch-1 decoding, its own
// instance so that nothing is kept or tested for rows that are not there). Each lane loads 16
// bytes of codes (32 weights of one absmax block) at a time and issues GEMV32_UNROLL such loads
// before using any, so a warp keeps 2 KB in flight; the 32 products are summed before the
// block's absmax scales them (one multiply per 32 weights, not per weight), and the NF4 values
// come from nf4_values8's byte-offset loads: ~5 instructions a weight where the words GEMV above
// spends ~12. On an H100 (2026-12-06) it read 0.7-0.9 TB/s of codes at batch 1 where the words
// GEMV read 0.5-0.7. A software-pipelined form (the next round's loads issued before the
// current round's products) was slower (0.6-0.86 TB/s), and was dropped.
#define GEMV32_UNROLL 4
#define GEMV32(NAME, R, LOAD, STORE)                                                           \
extern "C" __global__ void __launch_bounds__(256) NAME(const u8* codes, int n, int k, int bs,  \
    int nested, const float* absmax, const u8* aq, const float* acode, float offset, int nbs,  \
    const u16* x, u16* y, int m, const float* lh, const float* lb, float lscale, int lr) {    \
  GEMV_PROLOGUE(R)                                                                             \
  const uint4* cw = (const uint4*)(codes + (base >> 1));                                       \
  int nw = k >> 5, lbs = __ffs(bs) - 1, lnbs = __ffs(nbs) - 1;                                \
  for (int j0 = lane; j0 < nw; j0 += 32 * GEMV32_UNROLL) {                                    \
    uint4 c[GEMV32_UNROLL];                                                                    \
    unsigned int aqv[GEMV32_UNROLL];                                                           \
    float am[GEMV32_UNROLL];                                                                   \
    _Pragma("unroll") for (int u = 0; u < GEMV32_UNROLL; ++u) {                               \
      int j = j0 + 32 * u;                                                                     \
      if (j < nw) {                                                                           \
        c[u] = __ldcs(cw + j);                                                                 \
        absmax_fetch((base + 32LL * j) >> lbs, absmax, aq, lnbs, &aqv[u], &am[u]);            \
      }                                                                                       \
    }                                                                                         \
    _Pragma("unroll") for (int u = 0; u < GEMV32_UNROLL; ++u) {                               \
      int j = j0 + 32 * u;                                                                     \
      if (j < nw) {                                                                           \
        float s[R];                                                                            \
        _Pragma("unroll") for (int r = 0; r < R; ++r) s[r] = 0.f;                              \
        _Pragma("unroll") for (int q = 0; q < 4; ++q) {                                       \
          unsigned int v = q == 0 ? c[u].x : q == 1 ? c[u].y : q == 2 ? c[u].z : c[u].w;       \
          float w[8];                                                                          \
          nf4_values8(nf4s, v, w);                                                             \
          _Pragma("unroll") for (int r = 0; r < R; ++r) {                                     \
            if (R == 1 || r < m) {                                                            \
              uint4 xv = __ldg((const uint4*)(x + (long long)r * k + 32 * j + 8 * q));         \
              s[r] += DOT8(w, xv, LOAD);                                                       \
            }                                                                                 \
          }                                                                                   \
        }                                                                                     \
        float a = absmax_value(aqv[u], am[u], nested, code_s, offset);                         \
        _Pragma("unroll") for (int r = 0; r < R; ++r) acc[r] += s[r] * a;                      \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  _Pragma("unroll") for (int r = 0; r < R; ++r) {                                             \
    if (R == 1 || r < m) {                                                                    \
      float s = warp_sum(acc[r]);                                                              \
      if (lane == 0) STORE_OUT(LOAD, STORE, r, row, s)                                         \
    }                                                                                         \
  }                                                                                           \
}
GEMV32(nf4_gemv32_1_bf16, 1, bf16_to_f32, f32_to_bf16)
GEMV32(nf4_gemv32_1_f16, 1, f16_to_f32, f32_to_f16)
GEMV32(nf4_gemv32_bf16, GEMV_MAX_ROWS, bf16_to_f32, f32_to_bf16)
GEMV32(nf4_gemv32_f16, GEMV_MAX_ROWS, f16_to_f32, f32_to_f16)

// y = x W^T for more rows than the GEMV holds (GEMV_MAX_ROWS < m <= GEMM_MAX_ROWS: batched
// decoding), still reading the 4-bit data once: a block of 8 warps serves 8 output features,
// and stages x through shared memory a tile of GEMM_TILE columns at a time, so the 8 warps
// share each read of x (the GEMV re-reads all of x per feature, which at 32 rows costs more than
// the weights). Each lane decodes one 4-byte word of codes (8 weights) per tile. The caller
// guarantees k % 8 == 0 and bs % 8 == 0, and x contiguous from a 16-byte boundary.
#define GEMM_TILE 256
#define GEMM(NAME, LOAD, STORE)                                                                \
extern "C" __global__ void NAME(const u8* codes, int n, int k, int bs, int nested,             \
    const float* absmax, const u8* aq, const float* acode, float offset, int nbs,              \
    const u16* x, u16* y, int m) {                                                            \
  LOAD_TABLES                                                                                  \
  __shared__ uint4 xs[GEMM_MAX_ROWS][GEMM_TILE / 8];                                           \
  int lane = threadIdx.x & 31;                                                                 \
  long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);              \
  bool active = row < n;                                                                       \
  float acc[GEMM_MAX_ROWS];                                                                    \
  _Pragma("unroll") for (int r = 0; r < GEMM_MAX_ROWS; ++r) acc[r] = 0.f;                      \
  long long base = row * (long long)k;                                                         \
  const unsigned int* cw = (const unsigned int*)(codes + (base >> 1));                         \
  for (int k0 = 0; k0 < k; k0 += GEMM_TILE) {                                                 \
    int words = min(GEMM_TILE, k - k0) >> 3;                                                   \
    __syncthreads();                                                                           \
    for (int e = threadIdx.x; e < m * (GEMM_TILE / 8); e += blockDim.x) {                     \
      int r = e / (GEMM_TILE / 8), c = e % (GEMM_TILE / 8);                                    \
      if (c < words) xs[r][c] = *(const uint4*)(x + (long long)r * k + k0 + 8 * c);            \
    }                                                                                         \
    __syncthreads();                                                                           \
    if (!active || lane >= words) continue;                                                   \
    int j = (k0 >> 3) + lane;                                                                  \
    unsigned int v = cw[j];                                                                    \
    float a = absmax_of(div_pow2(base + 8LL * j, bs), nested, absmax, aq, code_s, offset, nbs);       \
    float w[8];                                                                                \
    DECODE8(w, v, a);                                                                          \
    _Pragma("unroll") for (int r = 0; r < GEMM_MAX_ROWS; ++r) {                               \
      if (r < m) {                                                                            \
        acc[r] += DOT8(w, xs[r][lane], LOAD);                                                  \
      }                                                                                       \
    }                                                                                         \
  }                                                                                           \
  if (!active) return;                                                                        \
  _Pragma("unroll") for (int r = 0; r < GEMM_MAX_ROWS; ++r) {                                 \
    if (r < m) {                                                                              \
      float s = warp_sum(acc[r]);                                                              \
      if (lane == 0) y[(long long)r * n + row] = STORE(s);                                     \
    }                                                                                         \
  }                                                                                           \
}
GEMM(nf4_gemm_small_bf16, bf16_to_f32, f32_to_bf16)
GEMM(nf4_gemm_small_f16, f16_to_f32, f32_to_f16)
