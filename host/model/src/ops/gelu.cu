// The exact GELU's backward pass (ops/gelu.rs).
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
