// The first index of each row's maximum, as ops/argmax.rs's host twin computes it: a NaN never
// wins, except a NaN first element, which nothing beats in the host's scan (it compares each
// value against the best so far). Host side in ops/argmax.rs.
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu).

// Whether (v, i) beats (best, bi): larger, or equal and earlier. NaN compares false both ways.
__device__ __forceinline__ bool argmax_beats(float v, int i, float best, int bi) {
  return v > best || (v == best && i < bi);
}

// One block a row of n; 1024 threads, each scanning a strided slice, then a tree over the block.
#define ARGMAX(NAME, T, LOAD)                                                                  \
extern "C" __global__ void NAME(const T* x, unsigned int* out, int n) {                       \
  __shared__ float sv[1024];                                                                   \
  __shared__ int si[1024];                                                                     \
  const T* row = x + (long long)blockIdx.x * n;                                                \
  float best = NEG_INF;                                                                        \
  int bi = 0x7fffffff;                                                                         \
  for (int i = threadIdx.x; i < n; i += blockDim.x) {                                         \
    float v = LOAD(row[i]);                                                                    \
    if (argmax_beats(v, i, best, bi)) { best = v; bi = i; }                                    \
  }                                                                                           \
  sv[threadIdx.x] = best;                                                                      \
  si[threadIdx.x] = bi;                                                                        \
  __syncthreads();                                                                             \
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {                                              \
    if (threadIdx.x < s && argmax_beats(sv[threadIdx.x + s], si[threadIdx.x + s],             \
                                        sv[threadIdx.x], si[threadIdx.x])) {                   \
      sv[threadIdx.x] = sv[threadIdx.x + s];                                                   \
      si[threadIdx.x] = si[threadIdx.x + s];                                                   \
    }                                                                                         \
    __syncthreads();                                                                           \
  }                                                                                           \
  if (threadIdx.x == 0) {                                                                     \
    float first = LOAD(row[0]);                                                                \
    out[blockIdx.x] = (first != first || si[0] == 0x7fffffff) ? 0u : (unsigned int)si[0];     \
  }                                                                                           \
}
ARGMAX(argmax_f32, float, f32_id)
ARGMAX(argmax_bf16, u16, bf16_to_f32)
ARGMAX(argmax_f16, u16, f16_to_f32)
