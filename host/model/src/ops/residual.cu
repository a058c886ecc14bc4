// A parallel decoder layer's residual, x + (mlp + attn), in one launch (ops/residual.rs), with
// the bits of candle's two 16-bit adds: each sum of two 16-bit values is rounded once, and an f32
// sum of two 16-bit values rounds to the same 16-bit value as the exact sum (24 >= 2 * 11 + 2
// bits), so rounding the f32 sum gives the 16-bit add.
#define RESIDUAL3(NAME, LOAD, STORE)                                                           \
extern "C" __global__ void NAME(const u16* x, const u16* a, const u16* b, u16* out,           \
    long long n) {                                                                            \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= n) return;                                                                          \
  float ab = LOAD(STORE(__fadd_rn(LOAD(a[i]), LOAD(b[i]))));                                   \
  out[i] = STORE(__fadd_rn(LOAD(x[i]), ab));                                                   \
}
RESIDUAL3(residual3_bf16, bf16_to_f32, f32_to_bf16)
RESIDUAL3(residual3_f16, f16_to_f32, f32_to_f16)
