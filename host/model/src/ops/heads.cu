// Attention heads moved between [b, h, s, d] and [b, s, h, d] (ops/heads.rs): dst[z][j][i] =
// src[z][i][j] for src [b, n1, n2, d] of 16-bit elements, a thread one 16-byte vector of a
// destination row (the host checks d % 8 == 0 and both 16-byte aligned), so the writes are
// contiguous and each read a whole row segment. candle's strided copy of the same took ~240 us
// for a Falcon-7B layer's [8, 71, 512, 64] on an H100 (2026-12-06), ~0.3 TB/s.
extern "C" __global__ void swap_heads_u16(const uint4* src, uint4* dst, int n1, int n2, int vd,
                                          long long n) {
  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  int v = (int)(t % vd);
  long long rest = t / vd;
  int i = (int)(rest % n1);
  rest /= n1;
  int j = (int)(rest % n2);
  long long z = rest / n2;
  dst[t] = __ldg(src + ((z * n1 + i) * n2 + j) * vd + v);
}
