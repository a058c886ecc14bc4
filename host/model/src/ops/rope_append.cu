// A fused query_key_value output split into heads, q and k rotated, q written out and k, v
// written into the KV cache, for decoding (ops/rope_append.rs): what the head split's copies,
// two `rope` launches and two cache writes did, in one launch. A thread takes one pair
// (i, i + d/2) of one head of one token. The fused row holds `kvh` groups of `r` query heads, a
// key head and a value head (Falcon's three layouts). The rotation rounds as candle's 16-bit
// `rope` kernel does, each product and each sum to the 16-bit type: the product of two 16-bit
// values is exact in f32 and an f32 sum of two is exact or rounds innocuously (24 >= 2 * 11 +
// 2 bits), so rounding each f32 result once gives the 16-bit operation's bits.
#define ROPE_APPEND(NAME, LOAD, STORE)                                                         \
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
    float x1 = LOAD(o1), x2 = LOAD(o2);                                                        \
    float c = LOAD(cosv[token * half + i]), sn = LOAD(sinv[token * half + i]);                 \
    o1 = STORE(__fsub_rn(LOAD(STORE(__fmul_rn(x1, c))), LOAD(STORE(__fmul_rn(x2, sn)))));     \
    o2 = STORE(__fadd_rn(LOAD(STORE(__fmul_rn(x1, sn))), LOAD(STORE(__fmul_rn(x2, c)))));     \
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
ROPE_APPEND(rope_append_bf16, bf16_to_f32, f32_to_bf16)
ROPE_APPEND(rope_append_f16, f16_to_f32, f32_to_f16)
