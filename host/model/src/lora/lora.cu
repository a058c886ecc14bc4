// Unmerged LoRA adapters at inference (lora/kernels.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// An unmerged LoRA adapter at inference (crate::lora::LoraLayer::add_to): h = x A^T, on a few
// rows with lora_h (one block of 1024 threads per row and rank, f32: at batch 1 there are only
// 16 blocks, so each must cover its row in few rounds of loads: 16-byte loads, 8 columns a
// thread, where the rows are 16-byte aligned), on more with cuBLAS; then lora_out.
#define LORA_H(NAME, LOAD)                                                                     \
extern "C" __global__ void NAME(const u16* x, const float* a, float* h, int k, int r) {       \
  __shared__ float red[32];                                                                    \
  int row = blockIdx.x / r, j = blockIdx.x % r;                                                \
  const u16* xr = x + (long long)row * k;                                                      \
  const float* ar = a + (long long)j * k;                                                      \
  float acc = 0.f;                                                                             \
  if ((k & 7) == 0 && (((unsigned long long)xr | (unsigned long long)ar) & 15) == 0) {       \
    const uint4* xv = (const uint4*)xr;                                                        \
    const float4* av = (const float4*)ar;                                                      \
    _Pragma("unroll 2")                                                                        \
    for (int t = threadIdx.x; t < (k >> 3); t += blockDim.x) {                                \
      uint4 p = __ldg(xv + t);                                                                 \
      float4 a0 = __ldg(av + 2 * t), a1 = __ldg(av + 2 * t + 1);                              \
      acc += LOAD((u16)(p.x & 0xffffu)) * a0.x + LOAD((u16)(p.x >> 16)) * a0.y                  \
           + LOAD((u16)(p.y & 0xffffu)) * a0.z + LOAD((u16)(p.y >> 16)) * a0.w                  \
           + LOAD((u16)(p.z & 0xffffu)) * a1.x + LOAD((u16)(p.z >> 16)) * a1.y                  \
           + LOAD((u16)(p.w & 0xffffu)) * a1.z + LOAD((u16)(p.w >> 16)) * a1.w;                 \
    }                                                                                         \
  } else {                                                                                    \
    _Pragma("unroll 4")                                                                        \
    for (int t = threadIdx.x; t < k; t += blockDim.x) acc += LOAD(xr[t]) * ar[t];              \
  }                                                                                           \
  acc = block_reduce(acc, red, 0);                                                             \
  if (threadIdx.x == 0) h[blockIdx.x] = acc;                                                   \
}
// out = y + h (B * scaling)^T, summed in f32 and rounded once, as PEFT computes it with f32
// adapter weights. A thread takes two adjacent columns (their rows of B * scaling held in
// registers) down LORA_OUT_ROWS rows, reading each row's h once for both (the same address
// across the block: broadcast loads, 16 bytes at a time where the rank is a multiple of 4), so a
// prefill of thousands of rows reads y once and writes out once; the [m, n] f32 products and
// sums the op-by-op version stored (three times y's size) are never made. R is the rank where
// an instance has it, 0 for any (B read from memory instead). A column's sum runs over j in
// order, the same operations as the NF4 kernels' epilogue (STORE_OUT), so the two agree.
#define LORA_OUT_ROWS 32
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
template <int R, bool BF16>
__device__ __forceinline__ void lora_out(const u16* y, const float* h, const float* b,
    float scaling, u16* out, int n, int r, int m) {
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
  int row0 = blockIdx.y * LORA_OUT_ROWS;
  int rows = min(LORA_OUT_ROWS, m - row0);
  for (int i = 0; i < rows; ++i) {
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
    float scaling, u16* out, int n, int r, int m) {                                           \
  lora_out<R, true>(y, h, b, scaling, out, n, r, m);                                           \
}                                                                                             \
extern "C" __global__ void lora_out_f16_r##R(const u16* y, const float* h, const float* b,    \
    float scaling, u16* out, int n, int r, int m) {                                           \
  lora_out<R, false>(y, h, b, scaling, out, n, r, m);                                          \
}
LORA_OUT(0)
LORA_OUT(8)
LORA_OUT(16)
LORA_OUT(32)
LORA_OUT(64)
LORA_H(lora_h_bf16, bf16_to_f32)
LORA_H(lora_h_f16, f16_to_f32)
