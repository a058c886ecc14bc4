// The AdamW update (the trainer's optimizer).
// Compiled with NVRTC at first use, after the shared prelude (ops/prelude.cu); the
// __fmul_rn/__fadd_rn intrinsics keep NVRTC from fusing a multiply and an add into an FMA,
// which would round differently from the CPU path.

// One AdamW update (torch.optim.AdamW, f32), with the roundings of the op-by-op version in
// the trainer: every product and sum rounded on its own, `/ bc2_sqrt` as a multiply by its
// inverse (candle's tensor / scalar), `sqrtf` and `/` exact. With has_scale, the gradient is
// first scaled by clip_grad_norm_'s coefficient (one rounded product, as the trainer's scaling
// of the gradient was), so clipping takes no launch of its own.
#define ADAMW_SCALARS float b1, float omb1, float b2, float omb2, float decay, int has_decay, \
    float inv_bc2, float eps, float step, float gscale, int has_scale
__device__ __forceinline__ void adamw_one(float p, float g, float m, float v, float* po,
    float* mo, float* vo, ADAMW_SCALARS) {
  float gi = has_scale ? __fmul_rn(g, gscale) : g;
  float mi = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(gi, omb1));
  float vi = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
  float pi = has_decay ? __fmul_rn(p, decay) : p;
  float denom = __fadd_rn(__fmul_rn(sqrtf(vi), inv_bc2), eps);
  *po = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step));
  *mo = mi;
  *vo = vi;
}
#define ADAMW_ARGS b1, omb1, b2, omb2, decay, has_decay, inv_bc2, eps, step, gscale, has_scale

extern "C" __global__ void adamw_f32(const float* p, const float* g, const float* m,
    const float* v, float* po, float* mo, float* vo, long long n, ADAMW_SCALARS) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  adamw_one(p[i], g[i], m[i], v[i], po + i, mo + i, vo + i, ADAMW_ARGS);
}

// The same update over many tensors in two launches and one of its own, for a step's every
// weight at once: a step's ~260 small tensors otherwise cost ~1,300 launches (the norm's three a
// gradient, the update's one and the copy into the weight), ~12 ms of an H100 step, where the
// work itself (reading 4 and writing 3 f32 arrays) is well under 1 ms.
//
// One table, uploaded once a step, describes the tensors: entries [0, T) hold the weights'
// addresses, [T, 2T) the gradients', [2T, 3T) exp_avg's, [3T, 4T) exp_avg_sq's, [4T, 5T) the
// element counts, then C chunk entries (tensor index << 40 | first element). A chunk is
// MT_CHUNK elements of one tensor (the last of a tensor fewer), one block's work; the
// last T + 1 entries are each tensor's first chunk and the chunk count.
#define MT_CHUNK 16384

__device__ __forceinline__ void mt_chunk(const unsigned long long* table, int tensors, int c,
    int* t, long long* s, long long* e) {
  unsigned long long entry = table[5 * tensors + c];
  *t = (int)(entry >> 40);
  *s = (long long)(entry & ((1ull << 40) - 1));
  long long n = (long long)table[4 * tensors + *t];
  *e = min(*s + (long long)MT_CHUNK, n);
}

// Each chunk's sum of squared gradient elements, in a fixed order (no atomics: the norm, and so
// the clipping coefficient, is the same every run).
extern "C" __global__ void mt_sq_sums_f32(const unsigned long long* table, int tensors,
    float* partial) {
  __shared__ float red[32];
  int t;
  long long s, e;
  mt_chunk(table, tensors, blockIdx.x, &t, &s, &e);
  const float* g = (const float*)table[tensors + t];
  float acc = 0.f;
  for (long long i = s + threadIdx.x; i < e; i += blockDim.x) acc = fmaf(g[i], g[i], acc);
  float sum = block_reduce(acc, red, 0);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// Each tensor's L2 norm from its chunks' sums (a warp a tensor, lanes in a fixed order); the
// table's last T + 1 entries give each tensor's first chunk, tensor t's being [first[t],
// first[t + 1]).
extern "C" __global__ void mt_norms_f32(const float* partial, const unsigned long long* table,
    int tensors, int chunks, float* norms) {
  int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (t >= tensors) return;
  const unsigned long long* first = table + 5 * tensors + chunks;
  float acc = 0.f;
  for (long long c = (long long)first[t] + lane; c < (long long)first[t + 1]; c += 32) acc += partial[c];
  acc = warp_sum(acc);
  if (lane == 0) norms[t] = sqrtf(acc);
}

// `adamw_f32` over every tensor of the table, in place (the weights, exp_avg and exp_avg_sq
// are overwritten; the gradients are read).
extern "C" __global__ void mt_adamw_f32(const unsigned long long* table, int tensors,
    ADAMW_SCALARS) {
  int t;
  long long s, e;
  mt_chunk(table, tensors, blockIdx.x, &t, &s, &e);
  float* p = (float*)table[t];
  const float* g = (const float*)table[tensors + t];
  float* m = (float*)table[2 * tensors + t];
  float* v = (float*)table[3 * tensors + t];
  for (long long i = s + threadIdx.x; i < e; i += blockDim.x)
    adamw_one(p[i], g[i], m[i], v[i], p + i, m + i, v + i, ADAMW_ARGS);
}
