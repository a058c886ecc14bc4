// A parallel decoder layer's residual, x + (mlp + attn), in one launch (ops/residual.rs), with
// the bits of candle's two 16-bit adds: each sum of two 16-bit values is rounded once, and an f32
// sum of two 16-bit values rounds to the same 16-bit value as the exact sum (24 >= 2 * 11 + 2
// bits), so rounding the f32 sum gives the 16-bit add. Eight elements a thread, with 16-byte
// loads and stores where the host found all four tensors 16-byte aligned (`vec`).
template <bool BF16>
__device__ __forceinline__ u16 add3_one(u16 x, u16 a, u16 b) {
  float ab = load16<BF16>(round16<BF16>(__fadd_rn(load16<BF16>(a), load16<BF16>(b))));
  return round16<BF16>(__fadd_rn(load16<BF16>(x), ab));
}
template <bool BF16>
__device__ __forceinline__ void add3(const u16* x, const u16* a, const u16* b, u16* out,
                                     long long n, int vec) {
  long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (vec && e + 8 <= n) {
    uint4 xv = __ldg((const uint4*)(x + e)), av = __ldg((const uint4*)(a + e)),
          bv = __ldg((const uint4*)(b + e));
    unsigned int xw[4] = {xv.x, xv.y, xv.z, xv.w}, aw[4] = {av.x, av.y, av.z, av.w},
                 bw[4] = {bv.x, bv.y, bv.z, bv.w}, ow[4];
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      unsigned int lo = add3_one<BF16>((u16)(xw[q] & 0xffffu), (u16)(aw[q] & 0xffffu),
                                       (u16)(bw[q] & 0xffffu));
      unsigned int hi = add3_one<BF16>((u16)(xw[q] >> 16), (u16)(aw[q] >> 16), (u16)(bw[q] >> 16));
      ow[q] = lo | (hi << 16);
    }
    *(uint4*)(out + e) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
  } else {
    for (long long i = e; i < min(e + 8, n); ++i) out[i] = add3_one<BF16>(x[i], a[i], b[i]);
  }
}
extern "C" __global__ void residual3_bf16(const u16* x, const u16* a, const u16* b, u16* out,
                                          long long n, int vec) {
  add3<true>(x, a, b, out, n, vec);
}
extern "C" __global__ void residual3_f16(const u16* x, const u16* a, const u16* b, u16* out,
                                         long long n, int vec) {
  add3<false>(x, a, b, out, n, vec);
}

// a + b, one rounding an element (the bits of candle's 16-bit add, as add3_one's argument
// shows): the sum of a tensor's two gradients in backward (ops/residual.rs, gradient_add), where
// candle's binary kernel reads and writes two bytes a thread. Eight elements a thread, 16-byte
// loads and stores where the host found the three tensors 16-byte aligned (`vec`).
template <bool BF16>
__device__ __forceinline__ u16 add2_one(u16 a, u16 b) {
  return round16<BF16>(__fadd_rn(load16<BF16>(a), load16<BF16>(b)));
}
template <bool BF16>
__device__ __forceinline__ void add2(const u16* a, const u16* b, u16* out, long long n, int vec) {
  long long e = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (vec && e + 8 <= n) {
    uint4 av = __ldg((const uint4*)(a + e)), bv = __ldg((const uint4*)(b + e));
    unsigned int aw[4] = {av.x, av.y, av.z, av.w}, bw[4] = {bv.x, bv.y, bv.z, bv.w}, ow[4];
    _Pragma("unroll") for (int q = 0; q < 4; ++q) {
      unsigned int lo = add2_one<BF16>((u16)(aw[q] & 0xffffu), (u16)(bw[q] & 0xffffu));
      unsigned int hi = add2_one<BF16>((u16)(aw[q] >> 16), (u16)(bw[q] >> 16));
      ow[q] = lo | (hi << 16);
    }
    *(uint4*)(out + e) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
  } else {
    for (long long i = e; i < min(e + 8, n); ++i) out[i] = add2_one<BF16>(a[i], b[i]);
  }
}
extern "C" __global__ void add2_bf16(const u16* a, const u16* b, u16* out, long long n, int vec) {
  add2<true>(a, b, out, n, vec);
}
extern "C" __global__ void add2_f16(const u16* a, const u16* b, u16* out, long long n, int vec) {
  add2<false>(a, b, out, n, vec);
}
