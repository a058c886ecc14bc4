// A fused query_key_value output split into heads, q and k rotated, q written out and k, v
// written into the KV cache, for decoding (ops/rope_append.rs): what the head split's copies,
// two `rope` launches and two cache writes did, in one launch. A thread takes one pair
// (i, i + d/2) of one head of one token. The fused row holds `kvh` groups of `r` query heads, a
// key head and a value head (Falcon's three layouts).
// Decoding's chain (ops/pdl.cu): the forward form waits first, its launch the only overlap.
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
// One pair rotated as candle's `rope` rounds it: (x1 c - x2 s, x1 s + x2 c); backward passes
// -sin, as the rope op's backward (`rope` with -sin) does.
__device__ __forceinline__ void rotate16(u16& o1, u16& o2, u16 c, u16 sn, bool bf16) {
  u16 x1 = o1, x2 = o2;
  const u16 neg_zero = 0x8000;
  o1 = fma16(x1, c, fma16(x2, sn, neg_zero, bf16) ^ 0x8000, bf16);
  o2 = fma16(x1, sn, fma16(x2, c, neg_zero, bf16), bf16);
}
// Where pair w (i, i + d/2) of token `token` lives: its slot in the fused row, and in the split
// heads (q [b, kvh * r, s, d]; k then, vplane further, v [b, kvh, cap, d] from position len),
// the same decomposition for both directions. The launch is a block row per token (blockIdx.x)
// and the token's pairs across blockIdx.y: 32-bit divisions a pair, where a flat index took six
// 64-bit ones (a software routine each; the training step's two launches a layer moved ~0.8 TB/s
// on an H100, ncu 2026-12-07).
struct Pair {
  long long token;
  int i, slot, grp, j, bi, t;
};
__device__ __forceinline__ bool pair_of(int w, int token, int s, int kvh, int r, int d, Pair& p) {
  int half = d >> 1, slots = kvh * (r + 2);
  if (w >= slots * half) return false;
  p.i = w % half;
  p.slot = w / half;
  p.t = token % s;
  p.bi = token / s;
  p.token = token;
  p.grp = p.slot / (r + 2);
  p.j = p.slot % (r + 2);
  return true;
}
__device__ __forceinline__ long long head_offset(const Pair& p, int s, int kvh, int r, int d,
    long long cap, long long len, long long vplane, bool* is_q) {
  *is_q = p.j < r;
  if (p.j < r) return (((long long)p.bi * kvh * r + p.grp * r + p.j) * s + p.t) * d;
  return (p.j == r ? 0LL : vplane) + (((long long)p.bi * kvh + p.grp) * cap + len + p.t) * d;
}
#define ROPE_APPEND(NAME, BF16)                                                                \
extern "C" __global__ void NAME(const u16* fused, const u16* cosv, const u16* sinv, int rope, \
    u16* q, u16* kv, int b, int s, int kvh, int r, int d, long long cap, long long len,       \
    long long vplane) {                                                                       \
  GRID_LAUNCH_DEPENDENTS();                                                                    \
  GRID_WAIT();                                                                                 \
  Pair p;                                                                                      \
  if (!pair_of(blockIdx.y * blockDim.x + threadIdx.x, blockIdx.x, s, kvh, r, d, p)) return;   \
  int half = d >> 1;                                                                           \
  const u16* src = fused + (p.token * kvh * (r + 2) + p.slot) * d;                             \
  u16 o1 = src[p.i], o2 = src[p.i + half];                                                     \
  if (rope && p.j <= r)                                                                        \
    rotate16(o1, o2, cosv[p.token * half + p.i], sinv[p.token * half + p.i], BF16);           \
  bool is_q;                                                                                   \
  long long at = head_offset(p, s, kvh, r, d, cap, len, vplane, &is_q);                        \
  u16* dst = (is_q ? q : kv) + at;                                                             \
  dst[p.i] = o1;                                                                               \
  dst[p.i + half] = o2;                                                                        \
}
ROPE_APPEND(rope_append_bf16, true)
ROPE_APPEND(rope_append_f16, false)

// The training form's backward (ops/rope_append.rs, heads_for_flash): the gradients of the
// split heads (laid out as rope_append writes them, cap = s, len = 0) back into the fused row,
// q's and k's rotated back, each element written once: what the pieces' zero-padded gradients
// and their sum did.
#define ROPE_MERGE(NAME, BF16)                                                                 \
extern "C" __global__ void NAME(const u16* gq, const u16* gkv, const u16* cosv,               \
    const u16* sinv, int rope, u16* gfused, int b, int s, int kvh, int r, int d,              \
    long long vplane) {                                                                       \
  Pair p;                                                                                      \
  if (!pair_of(blockIdx.y * blockDim.x + threadIdx.x, blockIdx.x, s, kvh, r, d, p)) return;   \
  int half = d >> 1;                                                                           \
  bool is_q;                                                                                   \
  long long at = head_offset(p, s, kvh, r, d, s, 0, vplane, &is_q);                            \
  const u16* src = (is_q ? gq : gkv) + at;                                                     \
  u16 o1 = src[p.i], o2 = src[p.i + half];                                                     \
  if (rope && p.j <= r)                                                                        \
    rotate16(o1, o2, cosv[p.token * half + p.i], sinv[p.token * half + p.i] ^ 0x8000, BF16);  \
  u16* dst = gfused + (p.token * kvh * (r + 2) + p.slot) * d;                                  \
  dst[p.i] = o1;                                                                               \
  dst[p.i + half] = o2;                                                                        \
}
ROPE_MERGE(rope_merge_bf16, true)
ROPE_MERGE(rope_merge_f16, false)
