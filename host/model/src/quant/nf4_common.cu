// What the NF4 modules (nf4.cu, nf4_mma.cu) share: the code book, its shared-memory copy, the
// per-block absmax (plain or double-quantized) and the decoding kernels' output store.
// Compiled before each of them, after the prelude and the host's defines.

__constant__ float NF4[16] = { NF4_TABLE };

// Shared copies of the lookup tables: constant memory serialises a warp's distinct addresses.
// nf4s is aligned to 256 bytes so that a code's entry is the table's address with its low byte
// replaced (nf4_values8: one byte permute a weight, no address add).
#define LOAD_TABLES                                                          \
  __shared__ __align__(256) float nf4s[16];                                  \
  __shared__ float code_s[256];                                              \
  if ((unsigned int)__cvta_generic_to_shared(nf4s) & 255u) __trap();       \
  if (threadIdx.x < 16) nf4s[threadIdx.x] = NF4[threadIdx.x];                \
  if (nested) for (int t = threadIdx.x; t < 256; t += blockDim.x) code_s[t] = acode[t]; \
  __syncthreads();

// e / d for d > 0, as a shift where d is a power of two (bitsandbytes' blocksizes all are): a
// 64-bit division is a long software routine on the GPU, and the decoding kernels divide for
// every few weights they read.
__device__ __forceinline__ long long div_pow2(long long e, int d) {
  return (d & (d - 1)) == 0 ? (e >> (__ffs(d) - 1)) : e / d;
}

// The NF4 values of the 8 codes of a 4-byte word of codes, w[2t] from byte t's high nibble and
// w[2t + 1] from its low one (element order), read from the shared table by byte offsets: the
// masks put each nibble times 4 in its own byte, so a value costs one byte extract (PRMT) and
// one load, where a shift and a mask per nibble cost one instruction more.
// The table is nf4s (LOAD_TABLES), 256-byte aligned: the permute that extracts a nibble times 4
// also copies bytes 1-3 of the table's shared address, which is then the entry's address as is
// (a generic pointer plus the offset cost an add a weight, ~1 of the A-operand tensor-core
// kernel's ~9 instructions a weight by SASS, 2026-12-07).
__device__ __forceinline__ float lds_f32(unsigned int a) {
  float v; asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a)); return v;
}
__device__ __forceinline__ void nf4_values8(const float* table, unsigned int v, float* w) {
  unsigned int hi = (v >> 2) & 0x3c3c3c3cu, lo = (v << 2) & 0x3c3c3c3cu;
  unsigned int t = (unsigned int)__cvta_generic_to_shared(table);
  _Pragma("unroll") for (int b = 0; b < 4; ++b) {
    w[2 * b] = lds_f32(__byte_perm(hi, t, 0x7650u | b));
    w[2 * b + 1] = lds_f32(__byte_perm(lo, t, 0x7650u | b));
  }
}

__device__ __forceinline__ float absmax_of(long long blk, int nested, const float* absmax,
    const u8* aq, const float* code_s, float offset, int nbs) {
  if (nested) return __fadd_rn(__fmul_rn(code_s[aq[blk]], absmax[div_pow2(blk, nbs)]), offset);
  return absmax[blk];
}

// The absmax of block `blk` in two steps, for kernels whose blocksizes are powers of two (lnbs:
// log2 of the nested one, 0 without nesting): absmax_fetch issues the loads, absmax_value
// combines them, so a kernel can issue the loads of several blocks before it waits for any (a
// lookup that needs a loaded byte as its index waits for it: one memory latency per block when
// the two steps are fused). Without nesting the host passes the codes as `aq` (any readable
// bytes: the value is not used) and the plain absmax as `absmax`.
__device__ __forceinline__ void absmax_fetch(long long blk, const float* absmax, const u8* aq,
    int lnbs, unsigned int* q, float* am) {
  *q = __ldg(aq + blk);
  *am = __ldg(absmax + (blk >> lnbs));
}
__device__ __forceinline__ float absmax_value(unsigned int q, float am, int nested,
    const float* code_s, float offset) {
  return nested ? __fadd_rn(__fmul_rn(code_s[q], am), offset) : am;
}

// An adapter's term for one output: sum over j of h[j] * (B[j] * lscale), in order j (the bits
// lora_out computes). h (written by this launch's h blocks, so read past the L1) and B's row
// are read 16 bytes at a time where the rank allows and unrolled, so an output's loads are in
// flight together: one load at a time, a rank-16 term was 16 round trips to the L2 in the
// epilogue of every group of features.
__device__ __forceinline__ float lora_term(const float* hr, const float* br, int lr, float lscale) {
  float d = 0.f;
  if ((lr & 3) == 0 && ((reinterpret_cast<unsigned long long>(hr) |
                         reinterpret_cast<unsigned long long>(br)) & 15ull) == 0) {
    _Pragma("unroll 4") for (int j = 0; j < lr; j += 4) {
      float4 h4 = __ldcg((const float4*)(hr + j));
      float4 b4 = __ldg((const float4*)(br + j));
      d += h4.x * __fmul_rn(b4.x, lscale);
      d += h4.y * __fmul_rn(b4.y, lscale);
      d += h4.z * __fmul_rn(b4.z, lscale);
      d += h4.w * __fmul_rn(b4.w, lscale);
    }
    return d;
  }
  for (int j = 0; j < lr; ++j) d += __ldcg(hr + j) * __fmul_rn(br[j], lscale);
  return d;
}

// The GEMVs' store of output (r, o) from its f32 sum s: rounded to 16 bits, and with lr > 0 an
// unmerged LoRA adapter's product added, given h = x A^T (lora_h in lora.cu, [m, lr] f32) and
// B ([n, lr] f32): the rounded base product plus h (B * lscale)^T summed in f32, rounded once,
// as lora_out computes it, so the result has the bits of the GEMV followed by lora_out, in one
// launch fewer a linear.
// LORA_OUT declares `out` (u16) as that value; STORE_OUT stores it.
#define LORA_OUT(LOAD, STORE, r, o, s, out)                                                    \
  u16 out = STORE(s);                                                                          \
  if (lr > 0)                                                                                  \
    out = STORE(__fadd_rn(LOAD(out), lora_term(lh + (long long)(r) * lr,                       \
                                              lb + (long long)(o) * lr, lr, lscale)));
#define STORE_OUT(LOAD, STORE, r, o, s) {                                                     \
  LORA_OUT(LOAD, STORE, r, o, s, out_)                                                         \
  y[(long long)(r) * n + (o)] = out_; }

