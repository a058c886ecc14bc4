// A fused query_key_value output split into heads, q and k rotated, q written out and k, v
// written into the KV cache, for decoding (ops/rope_append.rs): what the head split's copies,
// two `rope` launches and two cache writes did, in one launch. A thread takes one pair
// (i, i + d/2) of one head of one token. The fused row holds `kvh` groups of `r` query heads, a
// key head and a value head (Falcon's three layouts).
// The rotation has the bits of candle's 16-bit `rope` kernel as it runs on sm_90: its PTX
// multiplies and subtracts with unrounded `mul.bf16`/`sub.bf16`, which ptxas contracts (SASS:
// one HMUL2, then HFMA2) into x1 c - rnd(x2 s) and x1 s + rnd(x2 c), each rounded once (seen
// with `ptxas -arch=sm_90a` on candle-kernels' reduce.ptx from the CUDA build's target dir, then
// `cuobjdump -sass -fun rope_bf16`; f16 the same). The same FMAs here, issued explicitly
// (fma.rn.bf16 needs sm_80; the module is compiled for it).
__device__ __forceinline__ u16 fma16(u16 a, u16 b, u16 c, bool bf16) {
  u16 d;
  if (bf16) asm("fma.rn.bf16 %0, %1, %2, %3;" : "=h"(d) : "h"(a), "h"(b), "h"(c));
  else asm("fma.rn.f16 %0, %1, %2, %3;" : "=h"(d) : "h"(a), "h"(b), "h"(c));
  return d;
}
#define ROPE_APPEND(NAME, BF16)                                                                \
extern "C" __global__ void NAME(const u16* fused, const u16* cosv, const u16* sinv, int rope, \
    u16* q, u16* kv, int b, int s, int kvh, int r, int d, long long cap, long long len,       \
    long long vplane) {                                                                       \
  long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;                            \
  int half = d >> 1, slots = kvh * (r + 2);                                                    \
  if (idx >= (long long)b * s * slots * half) return;                                          \
  int i = (int)(idx % half);                                                                   \
  long long rest = idx / half;                                                                 \
  int slot = (int)(rest % slots);                                                              \
  rest /= slots;                                                                               \
  int t = (int)(rest % s), bi = (int)(rest / s);                                               \
  long long token = (long long)bi * s + t;                                                     \
  const u16* src = fused + (token * slots + slot) * d;                                         \
  int grp = slot / (r + 2), j = slot % (r + 2);                                                \
  u16 o1 = src[i], o2 = src[i + half];                                                         \
  if (rope && j <= r) {                                                                       \
    u16 x1 = o1, x2 = o2, c = cosv[token * half + i], sn = sinv[token * half + i];             \
    const u16 neg_zero = 0x8000;                                                               \
    o1 = fma16(x1, c, fma16(x2, sn, neg_zero, BF16) ^ 0x8000, BF16);                           \
    o2 = fma16(x1, sn, fma16(x2, c, neg_zero, BF16), BF16);                                    \
  }                                                                                           \
  u16* dst;                                                                                    \
  if (j < r) {                                                                                \
    dst = q + (((long long)bi * kvh * r + grp * r + j) * s + t) * d;                           \
  } else {                                                                                    \
    dst = kv + (j == r ? 0LL : vplane) + (((long long)bi * kvh + grp) * cap + len + t) * d;    \
  }                                                                                           \
  dst[i] = o1;                                                                                 \
  dst[i + half] = o2;                                                                          \
}
ROPE_APPEND(rope_append_bf16, true)
ROPE_APPEND(rope_append_f16, false)
