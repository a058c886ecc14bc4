// LoRA adapters' kernels (lora/kernels.rs): unmerged adapters at inference, and the training
// node's forward and input gradient (lora/train_node.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// An unmerged LoRA adapter at inference (crate::lora::LoraLayer::add_to): h = x A^T, on a few
// rows with lora_h (a block of DOT16_THREADS threads per row and rank, f32, block_dot16 in
// ops/dot16.cu: the NF4 decoding kernel computes h with it too, in blocks of its own launch, and
// the two give the same bits), on a prefill's with lora_h_rows (ranks 8 and 16) or cuBLAS
// (lora/kernels.rs); then lora_out. The kernels computing h take the same arguments
// (x, A, h, k, r, m), each reading those it needs.
template <bool BF16>
__device__ __forceinline__ void lora_h_block(const u16* x, const float* a, float* h, int k, int r) {
  __shared__ float red[DOT16_THREADS / 32];
  int row = blockIdx.x / r, j = blockIdx.x % r;
  float s = block_dot16<BF16>(x + (long long)row * k, a + (long long)j * k, k, red);
  if (threadIdx.x == 0) h[blockIdx.x] = s;
}
extern "C" __global__ void lora_h_bf16(const u16* x, const float* a, float* h, int k, int r, int m) {
  lora_h_block<true>(x, a, h, k, r);
}
extern "C" __global__ void lora_h_f16(const u16* x, const float* a, float* h, int k, int r, int m) {
  lora_h_block<false>(x, a, h, k, r);
}
// h = x A^T for a prefill's many rows (rank R of 8 or 16, k a multiple of 8): a block takes
// 512 / R rows and every rank, walking its slice of k (blockIdx.y's, all of k at inference) in
// chunks of LH_KC columns staged in shared memory as f32 (rows padded by one float, so the 8
// rows and 4 ranks a warp reads at one column fall in distinct banks), the next chunk's loads
// issued before the current one is used. A lane holds a 4-row by 4-rank tile of sums; the
// block's 8 warps split each chunk's columns and add their tiles through shared memory at the
// end, into h (f32, [m, R]) or, where k is split, into slice blockIdx.y's partial sums, which
// lora_h_sum (lora_h_sum_f32 at inference) adds in slice order. What it replaced at inference, x
// converted to f32 and cuBLAS's f32 product, took 45 of a 159 ms prefill of 16 x 200 tokens on
// an H100 (2026-12-06). Inference splits k as training does: unsplit, a batch-1 prefill of 200
// rows ran 7 blocks, 44 us a Falcon-7B projection and 164 us its down projection (ncu, H100,
// 2026-12-07), 9 of that prefill's 29 ms.
// TRAIN is the training node's h = dropout(z) A^T (lora/train_node.rs): A in z's 16-bit type,
// each element of z dropped (keep_scale, index row * k + column, when p > 0) and rounded to
// that type as the dropout op writes it, so the sums are those of the op-by-op graph's product.
#define LH_KC 128
#define LORA_OUT_ROWS 32
// Eight 16-bit values (one 16-byte load; e the element index of the first) as f32 into
// out[0..8]: with GELU, through the exact GELU as its op writes it (the node's input is the
// pre-activation); with drop, dropped and rounded to the 16-bit type as the dropout op writes
// them, so the training kernels' sums take the op-by-op graph's operand.
template <bool BF16, bool GELU = false>
__device__ __forceinline__ void stage8(uint4 v, long long e, bool drop, unsigned long long key,
    float p, float scale, float* out) {
  unsigned int w[4] = {v.x, v.y, v.z, v.w};
  // e is a multiple of 8 (a 16-byte load): words 0, 1 are quad e / 4 and words 2, 3 the next.
  unsigned long long z0 = drop ? mask_state(key, e >> 2) : 0ull;
  unsigned long long bits[2] = {drop ? mask_bits(z0) : 0ull, drop ? mask_bits(z0 + MASK_STEP) : 0ull};
  unsigned int below = drop_below(p);
  _Pragma("unroll") for (int q = 0; q < 4; ++q) {
    float lo = load16<BF16>((u16)(w[q] & 0xffffu)), hi = load16<BF16>((u16)(w[q] >> 16));
    if (GELU) {
      lo = gelu16<BF16>(lo);
      hi = gelu16<BF16>(hi);
    }
    if (drop) {
      float klo = dropped_in(bits[q >> 1], 2 * (q & 1), below) ? 0.0f : scale;
      float khi = dropped_in(bits[q >> 1], 2 * (q & 1) + 1, below) ? 0.0f : scale;
      lo = load16<BF16>(round16<BF16>(__fmul_rn(lo, klo)));
      hi = load16<BF16>(round16<BF16>(__fmul_rn(hi, khi)));
    }
    out[2 * q] = lo;
    out[2 * q + 1] = hi;
  }
}
template <int R, bool BF16, bool TRAIN>
__device__ __forceinline__ void lora_h_rows(const u16* x, const float* af, const u16* a16,
    float* h, int m, int k, int k_per, unsigned long long key, float p, float scale) {
  constexpr int RG = R / 4, ROWG = 32 / RG, ROWS = 4 * ROWG;
  constexpr int XL = ROWS * (LH_KC / 8) / 256, AL = R * (LH_KC / 4) / 256;
  __shared__ float xs[ROWS][LH_KC + 1];
  __shared__ float as[R][LH_KC + 1];
  float* part = &xs[0][0];  // 8 warps' tiles at the end: 8 * ROWS * R <= ROWS * (LH_KC + 1)
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int rg = lane / RG, jg = lane % RG;
  int row0 = blockIdx.x * ROWS;
  int kb = blockIdx.y * k_per, ke = min(k, kb + k_per);
  bool drop = TRAIN && p > 0.f;
  float acc[4][4];
  _Pragma("unroll") for (int i = 0; i < 4; ++i)
    _Pragma("unroll") for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  uint4 xr[XL];
  float4 ar[AL];
  auto fetch = [&](int c0) {
    _Pragma("unroll") for (int l = 0; l < XL; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (LH_KC / 8), c = c0 + (t % (LH_KC / 8)) * 8;
      xr[l] = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < m && c < ke) xr[l] = __ldg((const uint4*)(x + (long long)(row0 + r) * k + c));
    }
    _Pragma("unroll") for (int l = 0; l < AL; ++l) {
      int t = threadIdx.x + 256 * l, j = t / (LH_KC / 4), c = c0 + (t % (LH_KC / 4)) * 4;
      ar[l] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (c < ke) {
        if (TRAIN) {
          uint2 v = __ldg((const uint2*)(a16 + (long long)j * k + c));
          ar[l] = make_float4(load16<BF16>((u16)(v.x & 0xffffu)), load16<BF16>((u16)(v.x >> 16)),
                              load16<BF16>((u16)(v.y & 0xffffu)), load16<BF16>((u16)(v.y >> 16)));
        } else {
          ar[l] = __ldg((const float4*)(af + (long long)j * k + c));
        }
      }
    }
  };
  fetch(kb);
  for (int c0 = kb; c0 < ke; c0 += LH_KC) {
    _Pragma("unroll") for (int l = 0; l < XL; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (LH_KC / 8), c = (t % (LH_KC / 8)) * 8;
      stage8<BF16>(xr[l], (long long)(row0 + r) * k + c0 + c, drop, key, p, scale, &xs[r][c]);
    }
    _Pragma("unroll") for (int l = 0; l < AL; ++l) {
      int t = threadIdx.x + 256 * l, j = t / (LH_KC / 4), c = (t % (LH_KC / 4)) * 4;
      as[j][c] = ar[l].x; as[j][c + 1] = ar[l].y; as[j][c + 2] = ar[l].z; as[j][c + 3] = ar[l].w;
    }
    __syncthreads();
    if (c0 + LH_KC < ke) fetch(c0 + LH_KC);
    _Pragma("unroll 4") for (int cc = 0; cc < LH_KC / 8; ++cc) {
      int c = warp * (LH_KC / 8) + cc;
      float xa[4], aa[4];
      _Pragma("unroll") for (int i = 0; i < 4; ++i) xa[i] = xs[rg * 4 + i][c];
      _Pragma("unroll") for (int j = 0; j < 4; ++j) aa[j] = as[jg * 4 + j][c];
      _Pragma("unroll") for (int i = 0; i < 4; ++i)
        _Pragma("unroll") for (int j = 0; j < 4; ++j) acc[i][j] += xa[i] * aa[j];
    }
    __syncthreads();
  }
  _Pragma("unroll") for (int i = 0; i < 4; ++i)
    _Pragma("unroll") for (int j = 0; j < 4; ++j)
      part[(warp * ROWS + rg * 4 + i) * R + jg * 4 + j] = acc[i][j];
  __syncthreads();
  float* hs = h + (long long)blockIdx.y * m * R;
  for (int o = threadIdx.x; o < ROWS * R; o += 256) {
    int r = o / R;
    if (row0 + r >= m) continue;
    float sum = 0.f;
    _Pragma("unroll") for (int w = 0; w < 8; ++w) sum += part[w * ROWS * R + o];
    hs[(long long)row0 * R + o] = sum;
  }
}
#define LORA_H_ROWS(R)                                                                         \
extern "C" __global__ void __launch_bounds__(256) lora_h_rows_bf16_r##R(const u16* x,         \
    const float* a, float* h, int k, int k_per, int m) {                                      \
  lora_h_rows<R, true, false>(x, a, nullptr, h, m, k, k_per, 0ull, 0.f, 1.f);                  \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(256) lora_h_rows_f16_r##R(const u16* x,          \
    const float* a, float* h, int k, int k_per, int m) {                                      \
  lora_h_rows<R, false, false>(x, a, nullptr, h, m, k, k_per, 0ull, 0.f, 1.f);                 \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(256) lora_train_h_bf16_r##R(const u16* z,        \
    const u16* a, float* part, int k, int k_per, int m, unsigned long long key, float p,       \
    float scale) {                                                                            \
  lora_h_rows<R, true, true>(z, nullptr, a, part, m, k, k_per, key, p, scale);                 \
}                                                                                             \
extern "C" __global__ void __launch_bounds__(256) lora_train_h_f16_r##R(const u16* z,         \
    const u16* a, float* part, int k, int k_per, int m, unsigned long long key, float p,       \
    float scale) {                                                                            \
  lora_h_rows<R, false, true>(z, nullptr, a, part, m, k, k_per, key, p, scale);                \
}
LORA_H_ROWS(8)
LORA_H_ROWS(16)

// Element i of `splits` slices of n partial sums, added in slice order (the kernels below).
__device__ __forceinline__ float slice_sum(const float* part, int splits, int n, int i) {
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += part[(long long)s * n + i];
  return sum;
}
// The training node's h (and dA): the slices' partial sums of lora_train_h (lora_train_da) added
// in slice order and rounded once to the 16-bit type, as cuBLAS writes its product.
#define LORA_H_SUM(NAME, BF16)                                                                 \
extern "C" __global__ void NAME(const float* part, u16* h, int splits, int n) {               \
  int i = blockIdx.x * blockDim.x + threadIdx.x;                                               \
  if (i >= n) return;                                                                          \
  h[i] = round16<BF16>(slice_sum(part, splits, n, i));                                         \
}
LORA_H_SUM(lora_h_sum_bf16, true)
LORA_H_SUM(lora_h_sum_f16, false)
// Inference's h from lora_h_rows' slices: added in slice order and kept in f32, as lora_out and
// the NF4 kernels' epilogue read it.
extern "C" __global__ void lora_h_sum_f32(const float* part, float* h, int splits, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  h[i] = slice_sum(part, splits, n, i);
}

// The same sums for a gradient that goes to an f32 weight: rounded to the 16-bit type as above,
// then (scaled != 0) multiplied by the scaling in that type and rounded again, plus zero, as
// candle's affine op computes `x * mul + add` in it, and widened to f32, as its to_dtype op
// does: the bits of the graph that cast the f32 weight to 16 bits (and scaled B) in forward,
// at no launch of their own. dA takes it unscaled, dB scaled by the adapter's scaling.
#define LORA_H_SUM_F32(NAME, BF16)                                                             \
extern "C" __global__ void NAME(const float* part, float* out, int splits, int n, float s,     \
    int scaled) {                                                                             \
  int i = blockIdx.x * blockDim.x + threadIdx.x;                                               \
  if (i >= n) return;                                                                          \
  float v = load16<BF16>(round16<BF16>(slice_sum(part, splits, n, i)));                        \
  if (scaled) {                                                                                \
    v = load16<BF16>(round16<BF16>(__fmul_rn(v, load16<BF16>(round16<BF16>(s)))));             \
    v = load16<BF16>(round16<BF16>(__fadd_rn(v, 0.0f)));                                       \
  }                                                                                           \
  out[i] = v;                                                                                  \
}
LORA_H_SUM_F32(lora_h_sum_to_f32_bf16, true)
LORA_H_SUM_F32(lora_h_sum_to_f32_f16, false)

// The training node's 16-bit copies of an f32 adapter, one launch for both: A rounded to the
// 16-bit type, and scaling * B as candle's ops form it (B rounded, then its affine op in that
// type: times the rounded scaling, rounded, plus zero, rounded), where a to_dtype, a to_dtype
// and an affine op were three launches a layer.
#define LORA_WEIGHTS16(NAME, BF16)                                                             \
extern "C" __global__ void NAME(const float* a, const float* b, u16* a16, u16* bs16, int na,   \
    int nb, float s) {                                                                        \
  int i = blockIdx.x * blockDim.x + threadIdx.x;                                               \
  if (i < na) {                                                                                \
    a16[i] = round16<BF16>(a[i]);                                                              \
  } else if (i < na + nb) {                                                                    \
    int j = i - na;                                                                            \
    float v = __fmul_rn(load16<BF16>(round16<BF16>(b[j])), load16<BF16>(round16<BF16>(s)));   \
    v = load16<BF16>(round16<BF16>(v));                                                        \
    bs16[j] = round16<BF16>(__fadd_rn(v, 0.0f));                                               \
  }                                                                                           \
}
LORA_WEIGHTS16(lora_weights16_bf16, true)
LORA_WEIGHTS16(lora_weights16_f16, false)

// The training node's dA = gh^T dropout(z) ([R, k], gh = the gradient of h, [m, R]), from z
// itself (with GELU, from its pre-activation, z = gelu(x) computed as staged: backward never
// writes z again): a block takes DA_COLS columns of one slab of rows (blockIdx.y's), walking it in
// DA_ROWS-row chunks staged in shared memory as f32, z dropped and rounded as the dropout op
// writes it (the graph's operand; the next chunk's loads issued before the current one is
// used). A warp takes R / 8 ranks, a lane 4 columns. The slabs' partial sums go to
// part[slab][R][k], which lora_h_sum adds in slab order and rounds, as for h.
#define DA_COLS 128
#define DA_ROWS 32
template <int R, bool BF16, bool GELU>
__device__ __forceinline__ void lora_train_da(const u16* z, const u16* gh, float* part, int m,
    int k, int rows_per, unsigned long long key, float p, float scale) {
  constexpr int RPT = R / 8, GL = DA_ROWS * R / 256 > 0 ? DA_ROWS * R / 256 : 1;
  __shared__ __align__(16) float zs[DA_ROWS][DA_COLS];
  __shared__ float gs[DA_ROWS][R];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int c0 = blockIdx.x * DA_COLS;
  int rb = blockIdx.y * rows_per, re = min(m, rb + rows_per);
  bool drop = p > 0.f;
  float acc[4][RPT];
  _Pragma("unroll") for (int q = 0; q < 4; ++q)
    _Pragma("unroll") for (int t = 0; t < RPT; ++t) acc[q][t] = 0.f;
  uint4 zr[2];
  u16 gr[GL];
  auto fetch = [&](int r0) {
    _Pragma("unroll") for (int l = 0; l < 2; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (DA_COLS / 8), c = c0 + (t % (DA_COLS / 8)) * 8;
      zr[l] = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + r < re && c < k) zr[l] = __ldg((const uint4*)(z + (long long)(r0 + r) * k + c));
    }
    _Pragma("unroll") for (int l = 0; l < GL; ++l) {
      int t = threadIdx.x + 256 * l;
      gr[l] = 0;
      if (t < DA_ROWS * R && r0 + t / R < re) gr[l] = __ldg(gh + (long long)r0 * R + t);
    }
  };
  fetch(rb);
  for (int r0 = rb; r0 < re; r0 += DA_ROWS) {
    _Pragma("unroll") for (int l = 0; l < 2; ++l) {
      int t = threadIdx.x + 256 * l, r = t / (DA_COLS / 8), c = (t % (DA_COLS / 8)) * 8;
      stage8<BF16, GELU>(zr[l], (long long)(r0 + r) * k + c0 + c, drop, key, p, scale,
                         &zs[r][c]);
    }
    _Pragma("unroll") for (int l = 0; l < GL; ++l) {
      int t = threadIdx.x + 256 * l;
      if (t < DA_ROWS * R) gs[t / R][t % R] = load16<BF16>(gr[l]);
    }
    __syncthreads();
    if (r0 + DA_ROWS < re) fetch(r0 + DA_ROWS);
    _Pragma("unroll 4") for (int i = 0; i < DA_ROWS; ++i) {
      float4 zv = *(const float4*)&zs[i][4 * lane];
      float zq[4] = {zv.x, zv.y, zv.z, zv.w};
      _Pragma("unroll") for (int t = 0; t < RPT; ++t) {
        float g = gs[i][warp * RPT + t];
        _Pragma("unroll") for (int q = 0; q < 4; ++q) acc[q][t] += g * zq[q];
      }
    }
    __syncthreads();
  }
  _Pragma("unroll") for (int t = 0; t < RPT; ++t) {
    float* out = part + ((long long)blockIdx.y * R + warp * RPT + t) * k;
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      int c = c0 + 4 * lane + q;
      if (c < k) out[c] = acc[q][t];
    }
  }
}
#define LORA_TRAIN_DA(NAME, R, BF16, GELU)                                                     \
extern "C" __global__ void __launch_bounds__(256) NAME(const u16* z, const u16* gh,           \
    float* part, int k, int rows_per, int m, unsigned long long key, float p, float scale) {   \
  lora_train_da<R, BF16, GELU>(z, gh, part, m, k, rows_per, key, p, scale);                    \
}
LORA_TRAIN_DA(lora_train_da_bf16_r8, 8, true, false)
LORA_TRAIN_DA(lora_train_da_bf16_r16, 16, true, false)
LORA_TRAIN_DA(lora_train_da_f16_r8, 8, false, false)
LORA_TRAIN_DA(lora_train_da_f16_r16, 16, false, false)
LORA_TRAIN_DA(lora_train_da_gelu_bf16_r8, 8, true, true)
LORA_TRAIN_DA(lora_train_da_gelu_bf16_r16, 16, true, true)
LORA_TRAIN_DA(lora_train_da_gelu_f16_r8, 8, false, true)
LORA_TRAIN_DA(lora_train_da_gelu_f16_r16, 16, false, true)

// The training node's adapter term added to y (lora/train_node.rs), with every rounding of the
// op-by-op graph: out = y + v, v = keep * round16(h F(col)^T), each step rounded to the 16-bit
// type. Forward: y the base's product, h = dropout(z) A^T, F = scaling * B ([n, R]: fs_col = R,
// fs_j = 1), no dropout. Backward's input gradient: y the base's, h the gradient of h, F = A^T
// (A [R, n]: fs_col = 1, fs_j = n), the dropout's mask at index row * n + col. A block takes
// LORA_OUT_ROWS rows (their h staged in shared memory as f32) and 512 columns, a thread two
// adjacent ones (their factor rows in registers), issuing LT_ROWS rows' loads of y before it
// uses them: with one row's 4 bytes a thread in flight the first version moved ~0.9 TB/s on an
// H100. The [m, n] product, its dropped copy and the sum the graph made are never stored.
#define LT_ROWS 8
template <int R, bool BF16, bool DROP>
__device__ __forceinline__ void lora_train_add(const u16* y, const u16* h, const u16* f,
    long long fs_col, long long fs_j, u16* out, int n, int m, unsigned long long key, float p,
    float scale) {
  __shared__ __align__(16) float hs[LORA_OUT_ROWS][R];
  int row0 = blockIdx.y * LORA_OUT_ROWS;
  int rows = min(LORA_OUT_ROWS, m - row0);
  for (int t = threadIdx.x; t < rows * R; t += blockDim.x)
    hs[t / R][t % R] = load16<BF16>(h[(long long)row0 * R + t]);
  __syncthreads();
  int col = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (col >= n) return;
  bool two = col + 1 < n;
  bool pair = two && (n & 1) == 0;  // the two columns one aligned 4-byte word
  unsigned int below = drop_below(p);
  float f0[R], f1[R];
  _Pragma("unroll") for (int j = 0; j < R; ++j) {
    f0[j] = load16<BF16>(f[col * fs_col + j * fs_j]);
    f1[j] = two ? load16<BF16>(f[(col + 1) * fs_col + j * fs_j]) : 0.f;
  }
  for (int i0 = 0; i0 < rows; i0 += LT_ROWS) {
    unsigned int yw[LT_ROWS];
    auto word = [&](const u16* t, long long e) {
      if (pair) return __ldg((const unsigned int*)(t + e));
      return (unsigned int)__ldg(t + e) | (two ? (unsigned int)__ldg(t + e + 1) << 16 : 0u);
    };
    _Pragma("unroll") for (int u = 0; u < LT_ROWS; ++u) {
      long long e = (long long)(row0 + i0 + u) * n + col;
      yw[u] = i0 + u < rows ? word(y, e) : 0u;
    }
    _Pragma("unroll") for (int u = 0; u < LT_ROWS; ++u) {
      int i = i0 + u;
      if (i >= rows) break;
      float d0 = 0.f, d1 = 0.f;
      _Pragma("unroll") for (int j = 0; j < R; ++j) {
        d0 += hs[i][j] * f0[j];
        d1 += hs[i][j] * f1[j];
      }
      long long e = (long long)(row0 + i) * n + col;
      float v0 = load16<BF16>(round16<BF16>(d0)), v1 = load16<BF16>(round16<BF16>(d1));
      if (DROP) {
        bool d0, d1;
        if ((e & 1) == 0) {  // both in one quad, one hash
          unsigned long long bits = mask_bits(mask_state(key, e >> 2));
          d0 = dropped_in(bits, (int)(e & 3), below);
          d1 = dropped_in(bits, (int)(e & 3) + 1, below);
        } else {
          d0 = dropped_at(key, e, below);
          d1 = dropped_at(key, e + 1, below);
        }
        v0 = load16<BF16>(round16<BF16>(__fmul_rn(v0, d0 ? 0.0f : scale)));
        v1 = load16<BF16>(round16<BF16>(__fmul_rn(v1, d1 ? 0.0f : scale)));
      }
      unsigned int o0 = round16<BF16>(__fadd_rn(load16<BF16>((u16)(yw[u] & 0xffffu)), v0));
      unsigned int o1 = round16<BF16>(__fadd_rn(load16<BF16>((u16)(yw[u] >> 16)), v1));
      if (pair) {
        *(unsigned int*)(out + e) = o0 | (o1 << 16);
      } else {
        out[e] = (u16)o0;
        if (two) out[e + 1] = (u16)o1;
      }
    }
  }
}
#define LORA_TRAIN_ADD(NAME, R, BF16, DROP)                                                    \
extern "C" __global__ void NAME(const u16* y, const u16* h, const u16* f, long long fs_col,   \
    long long fs_j, u16* out, int n, int m, unsigned long long key, float p, float scale) {    \
  lora_train_add<R, BF16, DROP>(y, h, f, fs_col, fs_j, out, n, m, key, p, scale);             \
}
LORA_TRAIN_ADD(lora_train_add_bf16_r8, 8, true, false)
LORA_TRAIN_ADD(lora_train_add_bf16_r16, 16, true, false)
LORA_TRAIN_ADD(lora_train_add_f16_r8, 8, false, false)
LORA_TRAIN_ADD(lora_train_add_f16_r16, 16, false, false)
LORA_TRAIN_ADD(lora_train_add_drop_bf16_r8, 8, true, true)
LORA_TRAIN_ADD(lora_train_add_drop_bf16_r16, 16, true, true)
LORA_TRAIN_ADD(lora_train_add_drop_f16_r8, 8, false, true)
LORA_TRAIN_ADD(lora_train_add_drop_f16_r16, 16, false, true)

// One element: the term dropped out (d) or scaled, added to y, GELU's backward at gx.
template <bool BF16, bool DROP>
__device__ __forceinline__ u16 add_term_gelu_one(u16 y, u16 t, u16 gx, bool d, float scale) {
  float v = load16<BF16>(t);
  if (DROP) v = load16<BF16>(round16<BF16>(__fmul_rn(v, d ? 0.0f : scale)));
  float sum = load16<BF16>(round16<BF16>(__fadd_rn(load16<BF16>(y), v)));
  return round16<BF16>(gelu_grad(load16<BF16>(gx), sum));
}

// The input gradient of a node whose input went through the exact GELU: GELU's backward (against
// the pre-activation gx) of y + dropout(t), t the adapter's term as cuBLAS wrote it
// (train_term's product, before its mask), with the roundings of lora_train_add's sum. Where
// lora_train_add spent 2R f32 multiply-adds an element rebuilding the term, this reads it: at
// Falcon-7B's widest layer (18176 columns) the rebuilt form took ~0.43 ms a layer on an H100
// (2026-12-07). Eight elements a thread, as 16-byte words where `vec` says all four tensors start
// on one.
// The eight elements are words of registers, never an array whose address is taken: the earlier
// form reinterpreted its uint4s as u16 arrays, which the scalar tail indexed, so every element
// went through local memory (64 bytes of stack, 48 LDL a thread by SASS; 331 us a launch at
// 4096 x 18176 on an H100, ncu 2026-12-07).
template <bool BF16, bool DROP>
__device__ __forceinline__ void lora_add_term_gelu(const u16* y, const u16* t, const u16* gx,
    u16* out, long long n, unsigned long long key, float p, float scale, int vec,
    const unsigned char* stored) {
  long long e0 = 8 * ((long long)blockIdx.x * blockDim.x + threadIdx.x);
  if (e0 >= n) return;
  unsigned int below = drop_below(p);
  // e0 is a multiple of 8: elements 4q .. 4q + 3 of the eight are quad e0 / 4 + q.
  // With `stored`, the decisions h's kernel kept (bit i of byte e0 / 8) instead of the hash.
  unsigned long long z = mask_state(key, e0 >> 2);
  unsigned int byte = DROP && stored ? (unsigned int)stored[e0 >> 3] : 0u;
  auto dropped = [&](int i, unsigned long long bits) {
    return stored ? ((byte >> i) & 1u) != 0u : dropped_in(bits, i & 3, below);
  };
  if (vec && e0 + 8 <= n) {
    uint4 yv = __ldg((const uint4*)(y + e0)), tv = __ldg((const uint4*)(t + e0)),
          xv = __ldg((const uint4*)(gx + e0));
    unsigned int yw[4] = {yv.x, yv.y, yv.z, yv.w}, tw[4] = {tv.x, tv.y, tv.z, tv.w},
                 xw[4] = {xv.x, xv.y, xv.z, xv.w}, ow[4];
    unsigned long long bits = 0ull;
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      if (DROP && !stored && (q & 1) == 0) bits = mask_bits(z + (q >> 1) * MASK_STEP);
      bool d0 = DROP && dropped(2 * q, bits), d1 = DROP && dropped(2 * q + 1, bits);
      unsigned int lo = add_term_gelu_one<BF16, DROP>((u16)(yw[q] & 0xffffu),
          (u16)(tw[q] & 0xffffu), (u16)(xw[q] & 0xffffu), d0, scale);
      unsigned int hi = add_term_gelu_one<BF16, DROP>((u16)(yw[q] >> 16), (u16)(tw[q] >> 16),
          (u16)(xw[q] >> 16), d1, scale);
      ow[q] = lo | (hi << 16);
    }
    *(uint4*)(out + e0) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
  } else {
    unsigned long long bits = 0ull;
    for (int i = 0; i < 8 && e0 + i < n; ++i) {
      if (DROP && !stored && (i & 3) == 0) bits = mask_bits(z + (i >> 2) * MASK_STEP);
      out[e0 + i] = add_term_gelu_one<BF16, DROP>(y[e0 + i], t[e0 + i], gx[e0 + i],
                                                  DROP && dropped(i, bits), scale);
    }
  }
}
#define LORA_ADD_TERM_GELU(NAME, BF16, DROP)                                                   \
extern "C" __global__ void NAME(const u16* y, const u16* t, const u16* gx, u16* out,          \
    long long n, unsigned long long key, float p, float scale, int vec,                       \
    const unsigned char* bits, int stored) {                                                  \
  lora_add_term_gelu<BF16, DROP>(y, t, gx, out, n, key, p, scale, vec,                         \
                                 stored ? bits : nullptr);                                     \
}
LORA_ADD_TERM_GELU(lora_add_term_gelu_bf16, true, false)
LORA_ADD_TERM_GELU(lora_add_term_gelu_f16, false, false)
LORA_ADD_TERM_GELU(lora_add_term_gelu_drop_bf16, true, true)
LORA_ADD_TERM_GELU(lora_add_term_gelu_drop_f16, false, true)

// out = y + h (B * scaling)^T, summed in f32 and rounded once, as PEFT computes it with f32
// adapter weights. A thread takes two adjacent columns (their rows of B * scaling held in
// registers) down its block's rows, reading each row's h once for both (the same address
// across the block: broadcast loads, 16 bytes at a time where the rank is a multiple of 4), so a
// prefill of thousands of rows reads y once and writes out once; the [m, n] f32 products and
// sums the op-by-op version stored (three times y's size) are never made. R is the rank where
// an instance has it, 0 for any (B read from memory instead). A column's sum runs over j in
// order, the same operations as the NF4 kernels' epilogue (STORE_OUT), so the two agree.
template <int R>
__device__ __forceinline__ void lora_h_row(const float* hr, float* hv) {
  if (R % 4 == 0) {
    _Pragma("unroll") for (int j = 0; j < R; j += 4) {
      float4 v = *(const float4*)(hr + j);
      hv[j] = v.x; hv[j + 1] = v.y; hv[j + 2] = v.z; hv[j + 3] = v.w;
    }
  } else {
    _Pragma("unroll") for (int j = 0; j < R; ++j) hv[j] = hr[j];
  }
}
// A block takes 512 columns and `rows` rows (the host picks enough blocks to fill the GPU: a
// thread's rows are a chain of dependent loads, and at 32 rows a block a batch-1 prefill of 200
// rows ran 63 blocks, 26 us a projection; ncu, H100, 2026-12-07). An output's bits do not
// depend on `rows`.
template <int R, bool BF16>
__device__ __forceinline__ void lora_out(const u16* y, const float* h, const float* b,
    float scaling, u16* out, int n, int r, int m, int rows_per) {
  int col = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (col >= n) return;
  bool two = col + 1 < n;
  const float* br0 = b + (long long)col * r;
  const float* br1 = two ? br0 + r : br0;
  float bs0[R > 0 ? R : 1], bs1[R > 0 ? R : 1];
  if (R > 0) {
    _Pragma("unroll") for (int j = 0; j < R; ++j) {
      bs0[j] = __fmul_rn(br0[j], scaling);
      bs1[j] = __fmul_rn(br1[j], scaling);
    }
  }
  int row0 = blockIdx.y * rows_per;
  int rows = min(rows_per, m - row0);
  _Pragma("unroll 4") for (int i = 0; i < rows; ++i) {
    long long row = row0 + i;
    const float* hr = h + row * r;
    float d0 = 0.f, d1 = 0.f;
    if (R > 0) {
      float hv[R > 0 ? R : 1];
      lora_h_row<R>(hr, hv);
      _Pragma("unroll") for (int j = 0; j < R; ++j) {
        d0 += hv[j] * bs0[j];
        d1 += hv[j] * bs1[j];
      }
    } else {
      for (int j = 0; j < r; ++j) {
        d0 += hr[j] * __fmul_rn(br0[j], scaling);
        d1 += hr[j] * __fmul_rn(br1[j], scaling);
      }
    }
    long long e = row * n + col;
    if (BF16) {
      out[e] = f32_to_bf16(__fadd_rn(bf16_to_f32(y[e]), d0));
      if (two) out[e + 1] = f32_to_bf16(__fadd_rn(bf16_to_f32(y[e + 1]), d1));
    } else {
      out[e] = f32_to_f16(__fadd_rn(f16_to_f32(y[e]), d0));
      if (two) out[e + 1] = f32_to_f16(__fadd_rn(f16_to_f32(y[e + 1]), d1));
    }
  }
}
#define LORA_OUT(R)                                                                            \
extern "C" __global__ void lora_out_bf16_r##R(const u16* y, const float* h, const float* b,   \
    float scaling, u16* out, int n, int r, int m, int rows_per) {                             \
  lora_out<R, true>(y, h, b, scaling, out, n, r, m, rows_per);                                 \
}                                                                                             \
extern "C" __global__ void lora_out_f16_r##R(const u16* y, const float* h, const float* b,    \
    float scaling, u16* out, int n, int r, int m, int rows_per) {                             \
  lora_out<R, false>(y, h, b, scaling, out, n, r, m, rows_per);                                \
}
LORA_OUT(0)
LORA_OUT(8)
LORA_OUT(16)
LORA_OUT(32)
LORA_OUT(64)

// The dropout op's value (dropout.cu: round(t * (dropped ? 0 : scale))) from the decisions the
// training node's h kernel stored (bit i of byte e / 8 for element e), eight elements a thread:
// the backward term's mask without drawing it again. n % 8 == 0 and t, out 16-byte aligned
// (the host checks).
#define APPLY_MASK_BITS(NAME, BF16)                                                            \
extern "C" __global__ void NAME(const uint4* t, const unsigned char* bits, uint4* out,         \
    long long words, float scale) {                                                           \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= words) return;                                                                     \
  uint4 v = __ldg(t + i);                                                                      \
  unsigned int byte = bits[i], w[4] = {v.x, v.y, v.z, v.w};                                    \
  _Pragma("unroll") for (int q = 0; q < 4; ++q) {                                             \
    float lo = load16<BF16>((u16)(w[q] & 0xffffu)), hi = load16<BF16>((u16)(w[q] >> 16));     \
    lo = __fmul_rn(lo, (byte >> (2 * q)) & 1u ? 0.0f : scale);                                 \
    hi = __fmul_rn(hi, (byte >> (2 * q + 1)) & 1u ? 0.0f : scale);                             \
    w[q] = (unsigned int)round16<BF16>(lo) | ((unsigned int)round16<BF16>(hi) << 16);          \
  }                                                                                           \
  out[i] = make_uint4(w[0], w[1], w[2], w[3]);                                                 \
}
APPLY_MASK_BITS(lora_apply_mask_bits_bf16, true)
APPLY_MASK_BITS(lora_apply_mask_bits_f16, false)
