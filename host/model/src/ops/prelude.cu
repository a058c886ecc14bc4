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

// Seeded dropout's mask (crate::ops::dropout::keep_scale, element for element): elements 4j ..
// 4j + 3 share one splitmix64 value of key + (j + 1) * golden ratio, element 4j + t taking its
// 16 bits 48 - 16t .. 63 - 16t; an element is dropped when those bits, as u in [0, 1) at 2^-16,
// are below p. One hash draws four decisions: splitmix64's two 64-bit multiplies were what the
// LoRA training kernels spent most of their time on (on an H100, h and dA at 4,096 x 18,176
// took 105 and 132 us with the mask drawn two decisions a hash, 69 and 69 without dropout,
// 2026-12-07). The kernels that walk consecutive quads take the state of the first (mask_state)
// and step it by MASK_STEP, an add instead of a 64-bit multiply; the comparisons are integer
// ones with ceil(p * 2^16), which is u < p exactly (p * 2^16 is exact in f32).
#define MASK_STEP 0x9E3779B97F4A7C15ull
// The state of quad j (elements 4j .. 4j + 3).
__device__ __forceinline__ unsigned long long mask_state(unsigned long long key, long long j) {
  return key + (unsigned long long)(j + 1) * MASK_STEP;
}
__device__ __forceinline__ unsigned int drop_below(float p) {
  return (unsigned int)ceilf(p * 65536.0f);
}
// splitmix64's output for a quad's state.
__device__ __forceinline__ unsigned long long mask_bits(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// Whether element t (0 .. 3) of the quad whose hash is `bits` is dropped.
__device__ __forceinline__ bool dropped_in(unsigned long long bits, int t, unsigned int below) {
  return (unsigned int)((bits >> (48 - 16 * t)) & 0xffffull) < below;
}
// Element i's mask value alone (a kernel that does not walk quads).
__device__ __forceinline__ bool dropped_at(unsigned long long key, long long i, unsigned int below) {
  return dropped_in(mask_bits(mask_state(key, i >> 2)), (int)(i & 3), below);
}
__device__ __forceinline__ float keep_scale(unsigned long long key, long long i, float p, float scale) {
  return dropped_at(key, i, drop_below(p)) ? 0.0f : scale;
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
