// What flash attention's two kernel modules share (ops/flash.rs): the element types, the
// shapes every kernel indexes by, and the entry points' scalar parameters. The SIMT kernels
// (flash.cu) and the tensor-core ones (flash_mma.cu) read the same Dims and visibility codes.

template <int KIND> struct Elem;
template <> struct Elem<0> {
  typedef float T;
  static __device__ __forceinline__ float ld(float x) { return x; }
  static __device__ __forceinline__ float st(float x) { return x; }
};
template <> struct Elem<1> {
  typedef u16 T;
  static __device__ __forceinline__ float ld(u16 x) { return bf16_to_f32(x); }
  static __device__ __forceinline__ u16 st(float x) { return f32_to_bf16(x); }
};
template <> struct Elem<2> {
  typedef u16 T;
  static __device__ __forceinline__ float ld(u16 x) { return f16_to_f32(x); }
  static __device__ __forceinline__ u16 st(float x) { return f32_to_f16(x); }
};

#define POS_INF __int_as_float(0x7f800000)

// The shapes every kernel indexes by.
struct Dims {
  int b, h, kvh, s, t, d, past;
  float scale;
  int has_alibi;
};

// The shapes come as scalars, not a struct, so the host passes plain integers.
#define DIMS_PARAMS int b, int h, int kvh, int s, int t, int d, int past, float scale, int has_alibi
#define DIMS_VALUE Dims{b, h, kvh, s, t, d, past, scale, has_alibi}

// A KV head's dK or dV (ops/flash.rs, backward): the dK/dV kernel's f32 sums per query head or
// chunk of heads (`parts` of `per` elements for each of the n / per KV heads), added in part
// order and rounded once to the inputs' type, into the packed gradient.
#define FLASH_SUM_PARTS(SUFFIX, KIND)                                                          \
extern "C" __global__ void flash_sum_parts_##SUFFIX(const float* part, Elem<KIND>::T* out,    \
    int parts, long long per, long long n) {                                                  \
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                              \
  if (i >= n) return;                                                                          \
  const float* src = part + (i / per) * parts * per + i % per;                                 \
  float sum = 0.f;                                                                             \
  for (int p = 0; p < parts; ++p) sum += src[p * per];                                         \
  out[i] = Elem<KIND>::st(sum);                                                                \
}
FLASH_SUM_PARTS(f32, 0)
FLASH_SUM_PARTS(bf16, 1)
FLASH_SUM_PARTS(f16, 2)
