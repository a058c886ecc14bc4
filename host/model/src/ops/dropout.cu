// Seeded dropout (ops/dropout.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// crate::ops::dropout::keep_scale, element for element (splitmix64 of key + (i + 1) * golden ratio).
__device__ __forceinline__ float keep_scale(unsigned long long key, long long i, float p, float scale) {
  unsigned long long z = key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  float u = (float)(z >> 40) * (1.0f / 16777216.0f);
  return u < p ? 0.0f : scale;
}
#define DROPOUT(NAME, T, LOAD, STORE)                                                          \
extern "C" __global__ void NAME(const T* x, T* y, long long n, unsigned long long key,         \
    float p, float scale) {                                                                   \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i < n) y[i] = STORE(__fmul_rn(LOAD(x[i]), keep_scale(key, i, p, scale)));                \
}
DROPOUT(seeded_dropout_f32, float, f32_id, f32_id)
DROPOUT(seeded_dropout_bf16, u16, bf16_to_f32, f32_to_bf16)
DROPOUT(seeded_dropout_f16, u16, f16_to_f32, f32_to_f16)
