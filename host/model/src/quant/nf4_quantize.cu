// NF4 quantization at load, host side in quant/kernels.rs (`quantize`). NF4_THRESHOLD_BITS is
// defined by the host before this source. Compiled with NVRTC at first use, after the shared
// prelude (ops/prelude.cu), as a module of its own so that the decoding kernels in nf4.cu do not
// depend on it.
//
// Quantization, the GPU twin of quant::nf4::quantize_nf4_blocks, step for step: one warp per
// block of `bs` elements; absmax = max |ftz(x)| (from 0, NaN ignored as fmaxf and f32::max both
// do, and a max is exact in any order); r = 1 / absmax correctly rounded (the CPU path's IEEE
// reciprocal); each element's index is the number of thresholds ftz(ftz(x) * r) exceeds; two
// indices a byte, the first in the high nibble; an odd last element is paired with the index of
// 0 * r, as the CPU path pads it. NVRTC compiles without fast math, so nothing here is flushed
// or approximated except where ftz says so.
__constant__ unsigned int NF4_THRESH[15] = { NF4_THRESHOLD_BITS };

// The CPU path's `ftz`: subnormals (not zeros, whose sign it keeps) become +0.
__device__ __forceinline__ float nf4_ftz(float x) {
  return (x != 0.f && fabsf(x) < __uint_as_float(0x00800000u)) ? 0.f : x;
}

__device__ __forceinline__ unsigned int nf4_index(float v, const float* th) {
  unsigned int k = 0;
  _Pragma("unroll") for (int t = 0; t < 15; ++t) k += v > th[t] ? 1u : 0u;
  return k;
}

#define QUANT(NAME, T, LOAD)                                                                   \
extern "C" __global__ void NAME(const T* x, long long n, int bs, u8* codes, float* absmax) {  \
  __shared__ float th[15];                                                                     \
  if (threadIdx.x < 15) th[threadIdx.x] = __uint_as_float(NF4_THRESH[threadIdx.x]);            \
  __syncthreads();                                                                             \
  int lane = threadIdx.x & 31;                                                                 \
  long long blk = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);              \
  long long nb = (n + bs - 1) / bs;                                                            \
  if (blk >= nb) return;                                                                       \
  long long start = blk * bs;                                                                  \
  long long len = n - start < bs ? n - start : bs;                                             \
  float a = 0.f;                                                                               \
  for (long long j = lane; j < len; j += 32) a = fmaxf(a, fabsf(nf4_ftz(LOAD(x[start + j])))); \
  for (int off = 16; off > 0; off >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));  \
  if (lane == 0) absmax[blk] = a;                                                              \
  float r = __frcp_rn(a);                                                                      \
  long long pairs = (len + 1) / 2;                                                             \
  for (long long p = lane; p < pairs; p += 32) {                                              \
    long long e = start + 2 * p;                                                               \
    float x0 = LOAD(x[e]);                                                                     \
    float x1 = e + 1 < start + len ? LOAD(x[e + 1]) : 0.f;                                     \
    unsigned int hi = nf4_index(nf4_ftz(__fmul_rn(nf4_ftz(x0), r)), th);                       \
    unsigned int lo = nf4_index(nf4_ftz(__fmul_rn(nf4_ftz(x1), r)), th);                       \
    codes[(start >> 1) + p] = (u8)((hi << 4) | lo);                                            \
  }                                                                                           \
}
QUANT(nf4_quantize_f32, float, f32_id)
QUANT(nf4_quantize_bf16, u16, bf16_to_f32)
QUANT(nf4_quantize_f16, u16, f16_to_f32)
