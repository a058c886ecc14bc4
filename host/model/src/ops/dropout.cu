// Seeded dropout (ops/dropout.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// The mask is in the prelude: the LoRA training kernels draw the same one. A thread takes a quad
// of elements, the four the mask draws from one hash.
#define DROPOUT(NAME, T, LOAD, STORE)                                                          \
extern "C" __global__ void NAME(const T* x, T* y, long long n, unsigned long long key,         \
    float p, float scale) {                                                                   \
  long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x, i = 4 * j;                   \
  if (i >= n) return;                                                                         \
  unsigned int below = drop_below(p);                                                         \
  unsigned long long bits = mask_bits(mask_state(key, j));                                    \
  _Pragma("unroll") for (int t = 0; t < 4; ++t)                                               \
    if (i + t < n)                                                                            \
      y[i + t] = STORE(__fmul_rn(LOAD(x[i + t]), dropped_in(bits, t, below) ? 0.0f : scale));  \
}
DROPOUT(seeded_dropout_f32, float, f32_id, f32_id)
DROPOUT(seeded_dropout_bf16, u16, bf16_to_f32, f32_to_bf16)
DROPOUT(seeded_dropout_f16, u16, f16_to_f32, f32_to_f16)
