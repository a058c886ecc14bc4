// The AdamW update (the trainer's optimizer).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// One AdamW update (torch.optim.AdamW, f32), with the roundings of the op-by-op version in
// the trainer: every product and sum rounded on its own, `/ bc2_sqrt` as a multiply by its
// inverse (candle's tensor / scalar), `sqrtf` and `/` exact. With has_scale, the gradient is
// first scaled by clip_grad_norm_'s coefficient (one rounded product, as the trainer's scaling
// of the gradient was), so clipping takes no launch of its own.
extern "C" __global__ void adamw_f32(const float* p, const float* g, const float* m,
    const float* v, float* po, float* mo, float* vo, long long n, float b1, float omb1,
    float b2, float omb2, float decay, int has_decay, float inv_bc2, float eps, float step,
    float gscale, int has_scale) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gi = has_scale ? __fmul_rn(g[i], gscale) : g[i];
  float mi = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, omb1));
  float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
  float pi = has_decay ? __fmul_rn(p[i], decay) : p[i];
  float denom = __fadd_rn(__fmul_rn(sqrtf(vi), inv_bc2), eps);
  po[i] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step));
  mo[i] = mi;
  vo[i] = vi;
}
