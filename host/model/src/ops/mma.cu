// The tensor cores' 16-bit matrix product and the packing of its operands, for the modules
// compiled for compute_80 (mma.sync with bf16 needs sm_80): the NF4 decoding GEMM
// (quant/nf4_mma.cu) and flash attention's tensor-core kernels (ops/flash_mma.cu).
// Two f32 rounded to nearest-even 16-bit values in one instruction, `lo` in the low half (the
// same bits as f32_to_bf16 / f32_to_f16 but for NaN, which comes out canonical).
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
  unsigned int d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ unsigned int pack_f16x2(float lo, float hi) {
  unsigned int d; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
// d (16 x 8, f32) += a (16 x 16) b (16 x 8), the fragments as PTX's m16n8k16 lays them out:
// lane (g, c) = (lane / 4, lane % 4) holds a0 = a[g][2c, 2c + 1], a1 = a[g + 8][2c, 2c + 1],
// a2 = a[g][2c + 8, 2c + 9], a3 = a[g + 8][2c + 8, 2c + 9]; b0 = b[2c, 2c + 1][g],
// b1 = b[2c + 8, 2c + 9][g]; d[0], d[1] = d[g][2c, 2c + 1], d[2], d[3] = d[g + 8][2c, 2c + 1].
template <bool BF16>
__device__ __forceinline__ void mma_16816(float* d, unsigned int a0, unsigned int a1,
    unsigned int a2, unsigned int a3, unsigned int b0, unsigned int b1) {
  if (BF16) {
    asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
