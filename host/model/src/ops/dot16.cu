// A 16-bit row times an f32 row, summed by a whole block in one fixed order whatever the
// block's size: the LoRA adapter's h = x A^T at inference (lora/lora.cu's lora_h, a block a
// row and rank) and the same h computed by extra blocks of the NF4 decoding kernel
// (quant/nf4_mma.cu) give the same bits. After the prelude.
//
// The order is that of DOT16_THREADS threads: virtual thread v adds its 16-byte slices
// v, v + DOT16_THREADS, ... (8 columns each, as fused multiply-adds in column order) where both
// rows are 16-byte aligned and k % 8 == 0, else its columns v, v + DOT16_THREADS, ...; then each
// virtual warp's sum by warp_sum's butterfly, and those 8 by the first warp's. A block of
// blockDim.x threads (a multiple of 32) takes virtual threads threadIdx.x, threadIdx.x +
// blockDim.x, ... `red` holds DOT16_THREADS / 32 floats of shared memory. Every thread of the
// block must call it; every thread gets the sum.
#define DOT16_THREADS 256
template <bool BF16>
__device__ __forceinline__ float block_dot16(const u16* xr, const float* ar, int k, float* red) {
  bool wide = (k & 7) == 0 && (((unsigned long long)xr | (unsigned long long)ar) & 15) == 0;
  for (int v = threadIdx.x; v < DOT16_THREADS; v += blockDim.x) {
    float acc = 0.f;
    if (wide) {
      const uint4* xv = (const uint4*)xr;
      const float4* av = (const float4*)ar;
      _Pragma("unroll 2")
      for (int t = v; t < (k >> 3); t += DOT16_THREADS) {
        uint4 p = __ldg(xv + t);
        float4 a0 = __ldg(av + 2 * t), a1 = __ldg(av + 2 * t + 1);
        acc = __fmaf_rn(load16<BF16>((u16)(p.x & 0xffffu)), a0.x, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.x >> 16)), a0.y, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.y & 0xffffu)), a0.z, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.y >> 16)), a0.w, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.z & 0xffffu)), a1.x, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.z >> 16)), a1.y, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.w & 0xffffu)), a1.z, acc);
        acc = __fmaf_rn(load16<BF16>((u16)(p.w >> 16)), a1.w, acc);
      }
    } else {
      _Pragma("unroll 4")
      for (int t = v; t < k; t += DOT16_THREADS) acc = __fmaf_rn(load16<BF16>(xr[t]), ar[t], acc);
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) red[v >> 5] = acc;
  }
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x < 32) {
    s = threadIdx.x < DOT16_THREADS / 32 ? red[threadIdx.x] : 0.f;
    s = warp_sum(s);
    if (threadIdx.x == 0) red[0] = s;
  }
  __syncthreads();
  s = red[0];
  __syncthreads();
  return s;
}
