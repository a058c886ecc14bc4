// Unmerged LoRA adapters at inference (lora/kernels.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// An unmerged LoRA adapter at inference on a few rows (crate::lora::LoraLayer::add_to):
// h = x A^T (one block of 1024 threads per row and rank, f32: at batch 1 there are only 16
// blocks, so each must cover its row in few rounds of loads: 16-byte loads, 8 columns a
// thread, where the rows are 16-byte aligned), then y + (h (B * scaling)^T), summed in f32 and rounded once, as
// PEFT computes it with f32 adapter weights.
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
#define LORA_OUT(NAME, LOAD, STORE)                                                            \
extern "C" __global__ void NAME(const u16* y, const float* h, const float* b, float scaling,  \
    u16* out, int n, int r, long long total) {                                                \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= total) return;                                                                      \
  long long row = i / n;                                                                       \
  int col = (int)(i - row * n);                                                                \
  const float* hr = h + row * r;                                                               \
  const float* br = b + (long long)col * r;                                                    \
  float d = 0.f;                                                                               \
  for (int j = 0; j < r; ++j) d += hr[j] * __fmul_rn(br[j], scaling);                          \
  out[i] = STORE(__fadd_rn(LOAD(y[i]), d));                                                    \
}
LORA_H(lora_h_bf16, bf16_to_f32)
LORA_H(lora_h_f16, f16_to_f32)
LORA_OUT(lora_out_bf16, bf16_to_f32, f32_to_bf16)
LORA_OUT(lora_out_f16, f16_to_f32, f32_to_f16)
