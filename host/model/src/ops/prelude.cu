// The prelude every kernel module is compiled with: 16-bit conversions (round to nearest
// even, NaN kept quiet), seeded dropout's mask and a block-wide reduction.
typedef unsigned char u8;
typedef unsigned short u16;

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f32_to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float f32_id(float f) { return f; }
template <bool BF16>
__device__ __forceinline__ float load16(u16 v) { return BF16 ? bf16_to_f32(v) : f16_to_f32(v); }
template <bool BF16>
__device__ __forceinline__ u16 round16(float v) { return BF16 ? f32_to_bf16(v) : f32_to_f16(v); }
// The exact GELU of a 16-bit value as candle's gelu_erf kernel computes it in that type:
// x * normcdf(x), normcdf's f32 value rounded to the type, then the 16-bit product (exact in f32,
// rounded once). The GELU forward kernel (gelu.cu) and the LoRA training kernels' input share it.
template <bool BF16>
__device__ __forceinline__ float gelu16(float x) {
  return load16<BF16>(round16<BF16>(__fmul_rn(x, load16<BF16>(round16<BF16>(normcdff(x))))));
}
// g times GELU's derivative at v: crate::ops::gelu::gelu_grad (gelu.cu's expression), for the
// LoRA training kernels that fuse GELU's backward (lora.cu, lora_mma.cu).
__device__ __forceinline__ float gelu_grad(float v, float g) {
  float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
  float pdf = 0.3989423f * expf(-0.5f * v * v);
  return g * (cdf + v * pdf);
}

// Seeded dropout's mask value of element i (crate::ops::dropout::keep_scale, element for
// element: splitmix64 of key + (i + 1) * golden ratio), here for every module that drops out.
// The kernels that walk consecutive elements take the state of the first (mask_state) and step
// it by MASK_STEP, an add instead of a 64-bit multiply; `dropped` compares the hash's top 24 bits
// with ceil(p * 2^24) as integers, which is u < p exactly (u = those bits * 2^-24, and p * 2^24
// is exact in f32) without a 64-bit conversion to float.
#define MASK_STEP 0x9E3779B97F4A7C15ull
__device__ __forceinline__ unsigned long long mask_state(unsigned long long key, long long i) {
  return key + (unsigned long long)(i + 1) * MASK_STEP;
}
__device__ __forceinline__ unsigned int drop_below(float p) {
  return (unsigned int)ceilf(p * 16777216.0f);
}
__device__ __forceinline__ bool dropped(unsigned long long z, unsigned int below) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  // splitmix64's last step, z ^= z >> 31, leaves the top 24 bits as they are.
  return (unsigned int)(z >> 40) < below;
}
__device__ __forceinline__ float keep_scale(unsigned long long key, long long i, float p, float scale) {
  return dropped(mask_state(key, i), drop_below(p)) ? 0.0f : scale;
}

#define NEG_INF __int_as_float(0xff800000)

// A warp-wide max and sum, every lane getting the result.
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// A block-wide max or sum (is_max), through warp shuffles and one shared word per warp;
// `red` holds 32 floats of shared memory.
__device__ __forceinline__ float block_reduce(float v, float* red, int is_max) {
  for (int off = 16; off > 0; off >>= 1) {
    float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = threadIdx.x < nw ? red[threadIdx.x] : (is_max ? NEG_INF : 0.f);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) {
      float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}
