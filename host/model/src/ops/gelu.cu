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

// The same map as a table: gelu16 of every 16-bit code, rounded to the type, as gelu_fwd16
// computes it (one element a thread, 65,536 of them), built once a device and type.
#define GELU_TABLE(NAME, BF16)                                                                 \
extern "C" __global__ void NAME(u16* table) {                                                 \
  int i = blockIdx.x * blockDim.x + threadIdx.x;                                               \
  if (i < 65536) table[i] = round16<BF16>(gelu16<BF16>(load16<BF16>((u16)i)));               \
}
GELU_TABLE(gelu_table_bf16, true)
GELU_TABLE(gelu_table_f16, false)

// gelu_erf of a large tensor through the table, staged in shared memory (128 KB, dynamic: a
// block a multiprocessor, walking the tensor in strides): a lookup an element where gelu16
// costs normcdff and two roundings, so the pass is bound by memory (on an H100 gelu_fwd16 took
// ~0.28 ms for Falcon-7B's [4096, 18176] activation, ~2.8x what its reads and writes take).
// Two 16-byte groups a thread in flight; x and y start 16-byte aligned (the host checks).
extern "C" __global__ void __launch_bounds__(1024) gelu_fwd_table(const u16* table,
    const u16* x, u16* y, long long n) {
  extern __shared__ __align__(16) u16 ts[];
  for (int i = threadIdx.x; i < 65536 / 8; i += blockDim.x)
    ((uint4*)ts)[i] = __ldg((const uint4*)table + i);
  __syncthreads();
  long long groups = n / 8, stride = (long long)gridDim.x * blockDim.x;
  auto map = [&](uint4 v) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
    _Pragma("unroll") for (int q = 0; q < 4; ++q)
      w[q] = (unsigned int)ts[w[q] & 0xffffu] | ((unsigned int)ts[w[q] >> 16] << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  };
  long long gi = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; gi + stride < groups; gi += 2 * stride) {
    uint4 a = __ldg((const uint4*)x + gi), b = __ldg((const uint4*)x + gi + stride);
    ((uint4*)y)[gi] = map(a);
    ((uint4*)y)[gi + stride] = map(b);
  }
  if (gi < groups) ((uint4*)y)[gi] = map(__ldg((const uint4*)x + gi));
  if (blockIdx.x == 0)
    for (long long i = groups * 8 + threadIdx.x; i < n; i += blockDim.x) y[i] = ts[x[i]];
}
