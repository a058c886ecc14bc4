// Cross-entropy forward and backward (ops/cross_entropy.rs).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// Cross-entropy over rows of `v` logits (crate::engine::loss::cross_entropy_sum): one block a row.
// Forward: lse = log(sum(exp(x - max))) + max and nll = lse - x[label] (NaN for a label out of
// range). Backward: (exp(x - lse) - onehot(label)) * g, g the gradient of the summed loss.
#define CE_FWD(NAME, T, LOAD)                                                                  \
extern "C" __global__ void NAME(const T* x, const unsigned int* labels, float* lse,           \
    float* nll, int v) {                                                                      \
  __shared__ float red[32];                                                                    \
  long long row = blockIdx.x;                                                                  \
  const T* xr = x + row * (long long)v;                                                        \
  float mx = NEG_INF;                                                                          \
  for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, LOAD(xr[j]));               \
  mx = block_reduce(mx, red, 1);                                                               \
  float sum = 0.f;                                                                             \
  for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(LOAD(xr[j]) - mx);             \
  sum = block_reduce(sum, red, 0);                                                             \
  if (threadIdx.x == 0) {                                                                     \
    float l = logf(sum) + mx;                                                                  \
    unsigned int lab = labels[row];                                                            \
    lse[row] = l;                                                                              \
    nll[row] = lab < (unsigned int)v ? l - LOAD(xr[lab]) : __int_as_float(0x7fc00000);         \
  }                                                                                           \
}
#define CE_BWD(NAME, T, LOAD, STORE)                                                           \
extern "C" __global__ void NAME(const T* x, const unsigned int* labels, const float* lse,     \
    const float* g, T* out, int v) {                                                          \
  long long row = blockIdx.x;                                                                  \
  const T* xr = x + row * (long long)v;                                                        \
  float l = lse[row], gg = g[0];                                                               \
  unsigned int lab = labels[row];                                                              \
  for (int j = threadIdx.x; j < v; j += blockDim.x) {                                         \
    float p = expf(LOAD(xr[j]) - l);                                                           \
    if ((unsigned int)j == lab) p -= 1.f;                                                      \
    out[row * (long long)v + j] = STORE(p * gg);                                               \
  }                                                                                           \
}
CE_FWD(ce_fwd_f32, float, f32_id)
CE_FWD(ce_fwd_bf16, u16, bf16_to_f32)
CE_FWD(ce_fwd_f16, u16, f16_to_f32)
CE_BWD(ce_bwd_f32, float, f32_id, f32_id)
CE_BWD(ce_bwd_bf16, u16, bf16_to_f32, f32_to_bf16)
CE_BWD(ce_bwd_f16, u16, f16_to_f32, f32_to_f16)
