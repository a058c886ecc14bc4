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

// Four 8 x 8 16-bit matrices from shared memory in one instruction (ldmatrix .x4): lanes 8i ..
// 8i + 7 give the addresses of matrix i's rows (16 bytes each, 16-byte aligned), and r[i] is
// the lane's part of matrix i as an mma fragment wants it: row lane / 4, columns 2 (lane % 4)
// and the next. `_t` loads each matrix transposed: rows 2 (lane % 4) and the next, column
// lane / 4, so a B operand stored with its reduction along the rows reads like one stored
// along the columns, and no transposed copy of a tile is needed.
__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// Asynchronous copies from global to shared memory (cp.async, sm_80): the copy proceeds while
// the thread computes, and lands once cp_async_wait<N> says at most N of the thread's later
// groups are still in flight (then a barrier makes every thread's copies visible). A copy with
// `in` false writes zeros and reads nothing (`src` must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(d), "l"(src), "r"(in ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool in) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               :: "r"(d), "l"(src), "r"(in ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}
