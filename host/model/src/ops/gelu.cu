// The exact GELU (ops/gelu.rs): the forward pass in 16-bit types, and the backward pass.
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// crate::ops::gelu::gelu_grad, element for element.
#define GELU_BWD(NAME, T, LOAD, STORE)                                                         \
extern "C" __global__ void NAME(const T* x, const T* g, T* out, long long n) {                 \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= n) return;                                                                          \
  float v = LOAD(x[i]);                                                                        \
  float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));                                  \
  float pdf = 0.3989423f * expf(-0.5f * v * v);                                                \
  out[i] = STORE(LOAD(g[i]) * (cdf + v * pdf));                                                \
}
GELU_BWD(gelu_bwd_f32, float, f32_id, f32_id)
GELU_BWD(gelu_bwd_bf16, u16, bf16_to_f32, f32_to_bf16)
GELU_BWD(gelu_bwd_f16, u16, f16_to_f32, f32_to_f16)

// gelu_erf in a 16-bit type with candle's roundings (gelu16, in the prelude): eight elements a
// thread, one 16-byte load and store, where the host checked that both start 16-byte aligned;
// the last few elements one at a time. candle's unary kernel moved ~0.8 TB/s of the
// [tokens, ffn] activation on an H100 (0.0117 s of a training step's profile, 2026-12-06).
template <bool BF16>
__device__ __forceinline__ void gelu_fwd16(const u16* x, u16* y, long long n) {
  long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (e + 8 <= n) {
    uint4 v = __ldg((const uint4*)(x + e));
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      unsigned int lo = round16<BF16>(gelu16<BF16>(load16<BF16>((u16)(w[q] & 0xffffu))));
      unsigned int hi = round16<BF16>(gelu16<BF16>(load16<BF16>((u16)(w[q] >> 16))));
      w[q] = lo | (hi << 16);
    }
    *(uint4*)(y + e) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    for (long long i = e; i < n; ++i) y[i] = round16<BF16>(gelu16<BF16>(load16<BF16>(x[i])));
  }
}
extern "C" __global__ void gelu_fwd_bf16(const u16* x, u16* y, long long n) { gelu_fwd16<true>(x, y, n); }
extern "C" __global__ void gelu_fwd_f16(const u16* x, u16* y, long long n) { gelu_fwd16<false>(x, y, n); }
