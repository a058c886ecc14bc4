//! Flash attention: `softmax((q k^T + alibi) * scale)` over the keys each query may see, times
//! `v`, without the `[b, h, s, t]` scores ever being stored, forward or backward.
//!
//! The forward pass walks the keys in tiles keeping, per query, a running maximum, the running
//! sum of exponentials and the running output (the online softmax), and keeps only the
//! log-sum-exp per query for backward. Backward recomputes each probability from `q`, `k` and
//! that log-sum-exp: `dS = P * (dP - rowsum(dO * O)) * scale`, then `dQ = dS K`, `dK = dS^T Q`,
//! `dV = P^T dO`. Grouped and multi-query heads read their KV head without repeating it; a KV
//! head's `dK`/`dV` sum over its query group.
//!
//! Who may see whom is [`Visibility`]: causal (with a cache's offset), padding keys hidden,
//! and packed rows' examples kept apart, so packing needs no `[b, s, s]` mask either. Unlike
//! the masked path (whose fully masked rows, as transformers', average every value), a query
//! that may see no key at all gets a zero output: only padding queries are such, and nothing
//! reads them.
//!
//! Both devices run the same algorithm: the CPU twin here (the reference, tile for tile) and
//! `flash.cu` (whose decoding variant, for a few queries a head, splits the keys among a warp's
//! lanes and merges their partial softmaxes: the same result up to summation order). In bf16
//! and f16 with heads of 64 or 128 (Falcon's and Llama's), `flash_mma.cu` runs the same tiles
//! on the tensor cores. All sums are f32; inputs and outputs keep the model's dtype, and in a
//! 16-bit type each probability and each `dS` is rounded to it before the product it enters,
//! on every device and kernel (`Problem::operand`), as FlashAttention rounds them. The masked
//! path ([`crate::ops::attention::attend`]) rounds `q k^T` to the model's dtype before the
//! softmax as well; so the two agree to those roundings, and exactly in f32 but for summation
//! order.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Keys a tile of the online softmax holds (the CUDA kernels use 16 or 32 by head size; the
/// result does not depend on it beyond rounding).
const TILE: usize = 32;

/// Who may attend to whom, for `b` rows of `t` keys: key `j` is visible to the query at
/// absolute position `p` (`past + i`) when `j <= p`, key `j` is a real token, and both belong
/// to the same packed example.
#[derive(Debug, Clone)]
pub struct Visibility {
    /// Tokens cached before the queries.
    pub past: usize,
    /// `u32 [2, b, t]`: each key's code (0 for padding, else its example's number from 1),
    /// then each position's example number as a query. What the CUDA kernels read.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    codes: Tensor,
    /// The same, on the host, for the CPU twin and for tests.
    host: Vec<u32>,
    batch: usize,
    total: usize,
}

impl Visibility {
    /// `real[b][j]`: key `j` of row `b` is a real token. `examples[b][j]`: the example (any id;
    /// a change of id starts a new one) position `j` belongs to, `None` for unpacked rows.
    pub fn new(
        real: &[Vec<bool>],
        examples: Option<&[Vec<u32>]>,
        past: usize,
        device: &Device,
    ) -> Result<Self> {
        let batch = real.len();
        let total = real.first().map_or(0, Vec::len);
        let mut host = vec![0u32; 2 * batch * total];
        for (b, row) in real.iter().enumerate() {
            if row.len() != total {
                candle_core::bail!("visibility: row {b} has {} keys, not {total}", row.len());
            }
            let mut example = 1u32;
            for (j, &is_real) in row.iter().enumerate() {
                if let Some(ids) = examples
                    && j > 0
                    && ids[b][j] != ids[b][j - 1]
                {
                    example += 1;
                }
                host[b * total + j] = if is_real { example } else { 0 };
                host[(batch + b) * total + j] = example;
            }
        }
        let codes = Tensor::from_vec(host.clone(), (2, batch, total), device)?;
        Ok(Visibility {
            past,
            codes,
            host,
            batch,
            total,
        })
    }

    fn visible(&self, b: usize, query: usize, key: usize) -> bool {
        let code = self.host[b * self.total + key];
        key <= query && code != 0 && code == self.host[(self.batch + b) * self.total + query]
    }
}

/// The head sizes the CUDA kernels serve (each by the smallest of 32, 64, 128 that holds it).
pub const MAX_HEAD_DIM: usize = 128;

/// The shapes, checked once.
#[derive(Debug, Clone, Copy)]
struct Problem {
    b: usize,
    h: usize,
    kv: usize,
    s: usize,
    t: usize,
    d: usize,
    past: usize,
    scale: f32,
    /// The inputs' type: in a 16-bit one, probabilities and `dS` are rounded to it before
    /// the products they enter, on every device (see [`Problem::operand`]).
    dtype: DType,
}

impl Problem {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, vis: &Visibility, scale: f64) -> Result<Self> {
        let (b, h, s, d) = q.dims4()?;
        let (kb, kv, t, kd) = k.dims4()?;
        if k.dims() != v.dims() || kb != b || kd != d || kv == 0 || h % kv != 0 {
            candle_core::bail!(
                "flash attention: q {:?}, k {:?}, v {:?} (q [b, h, s, d], k and v [b, kv, t, d], h a multiple of kv)",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if vis.batch != b || vis.total != t || vis.past + s != t {
            candle_core::bail!(
                "flash attention: visibility for {} rows of {} keys after {} cached, queries [{b}, {s}] over {t} keys",
                vis.batch,
                vis.total,
                vis.past
            );
        }
        if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
            candle_core::bail!(
                "flash attention: q {:?}, k {:?}, v {:?} differ in dtype",
                q.dtype(),
                k.dtype(),
                v.dtype()
            );
        }
        Ok(Problem {
            b,
            h,
            kv,
            s,
            t,
            d,
            past: vis.past,
            scale: scale as f32,
            dtype: q.dtype(),
        })
    }

    /// A probability or `dS` as the products take it: rounded to the inputs' 16-bit type, as
    /// FlashAttention and the tensor-core kernels round the 16-bit operand of their next
    /// product; unchanged in f32.
    fn operand(&self, x: f32) -> f32 {
        match self.dtype {
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            DType::F16 => half::f16::from_f32(x).to_f32(),
            _ => x,
        }
    }

    /// The KV head query head `h` reads.
    fn kv_of(&self, h: usize) -> usize {
        h / (self.h / self.kv)
    }
}

/// ALiBi as the kernels read it: f32 `[b, h, t]`.
fn alibi_rows(alibi: Option<&Tensor>, p: &Problem) -> Result<Option<Tensor>> {
    alibi
        .map(|a| {
            let dims = a.dims();
            if dims != [p.b, p.h, 1, p.t] {
                candle_core::bail!(
                    "flash attention: ALiBi bias {dims:?}, expected [{}, {}, 1, {}]",
                    p.b,
                    p.h,
                    p.t
                );
            }
            a.to_dtype(DType::F32)?
                .reshape((p.b, p.h, p.t))?
                .contiguous()
        })
        .transpose()
}

/// Attention of `q` `[b, h, s, d]` over `k`, `v` `[b, kv, t, d]` as `vis` allows, scores
/// `(q k^T + alibi) * scale` with `alibi` `[b, h, 1, t]` (Falcon's RW variants). With a
/// gradient, one graph node keeping `q`, `k`, `v` and the log-sum-exp.
pub fn flash_attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    alibi: Option<&Tensor>,
    vis: &Visibility,
) -> Result<Tensor> {
    let p = Problem::of(q, k, v, vis, scale)?;
    let alibi = alibi_rows(alibi, &p)?;
    let (q0, k0, v0) = (
        q.detach().contiguous()?,
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    let (out, lse) = crate::ops::profile::scope("attn.flash", q.device(), || {
        forward(&p, &q0, &k0, &v0, vis, alibi.as_ref())
    })?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    // The graph keeps q, k, v and the log-sum-exp; backward recomputes the probabilities.
    let vis = vis.clone();
    crate::ops::handover::with_backward3(
        "flash-attention",
        [q, k, v],
        out,
        Box::new(move |[q, k, v], out, dout| {
            crate::ops::profile::scope("attn.flash.bwd", q.device(), || {
                let grads = node_backward(&p, [q, k, v], [out, dout, &lse], &vis, alibi.as_ref())?;
                let (dq, dk, dv) = unpack(&grads, (p.b, p.h, p.kv, p.d), p.s, p.t)?;
                Ok([Some(dq), Some(dk), Some(dv)])
            })
        }),
    )
}

/// A layer's query, key and value heads in one buffer: q `[b, h, s, d]`, then k and v, each
/// `[b, kv, s, d]`, one after the other. The training path's head split writes them so
/// (`crate::ops::rope_append::heads_for_flash`) and [`flash_attend_packed`]'s backward writes
/// their gradients so: between the fused query_key_value product and attention the graph has
/// one node, whose backward writes the fused gradient in one pass, instead of three narrowed
/// pieces each padded to the fused width with zeros and added.
#[derive(Debug, Clone)]
pub struct PackedHeads {
    /// 1-D, `b * (h + 2 kv) * s * d` elements.
    pub data: Tensor,
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub s: usize,
    pub d: usize,
}

impl PackedHeads {
    /// q, k and v of a packed buffer `t` laid out as this one's: views, no copy.
    fn parts(&self, t: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        unpack(t, (self.b, self.h, self.kv, self.d), self.s, self.s)
    }
}

/// q (or dQ) `[b, h, s, d]`, then k and v (or dK, dV) `[b, kv, t, d]` of a buffer packed as
/// [`PackedHeads`] lays them out: views, no copy.
fn unpack(
    x: &Tensor,
    (b, h, kv, d): (usize, usize, usize, usize),
    s: usize,
    t: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (nq, nk) = (b * h * s * d, b * kv * t * d);
    if x.dims() != [nq + 2 * nk] {
        candle_core::bail!(
            "packed heads: {:?} is not {b} rows of {h} query heads of {s} x {d} and 2 x {kv} KV heads of {t} x {d}",
            x.dims()
        );
    }
    Ok((
        x.narrow(0, 0, nq)?.reshape((b, h, s, d))?,
        x.narrow(0, nq, nk)?.reshape((b, kv, t, d))?,
        x.narrow(0, nq + nk, nk)?.reshape((b, kv, t, d))?,
    ))
}

/// [`flash_attend`] on heads packed in one buffer (self-attention without a cache: `t = s`):
/// the same kernels and values; with a gradient, one graph node whose backward is the packed
/// gradient of q, k and v.
pub fn flash_attend_packed(
    heads: &PackedHeads,
    scale: f64,
    alibi: Option<&Tensor>,
    vis: &Visibility,
) -> Result<Tensor> {
    let x = heads.data.detach();
    let (q, k, v) = heads.parts(&x)?;
    let p = Problem::of(&q, &k, &v, vis, scale)?;
    let alibi = alibi_rows(alibi, &p)?;
    let (out, lse) = crate::ops::profile::scope("attn.flash", q.device(), || {
        forward(&p, &q, &k, &v, vis, alibi.as_ref())
    })?;
    if !heads.data.track_op() {
        return Ok(out);
    }
    let (vis, layout) = (vis.clone(), heads.clone());
    crate::ops::handover::with_backward_out(
        "flash-attention",
        &heads.data,
        out,
        move |x, out, dout| {
            crate::ops::profile::scope("attn.flash.bwd", x.device(), || {
                let (q, k, v) = layout.parts(x)?;
                node_backward(&p, [&q, &k, &v], [out, dout, &lse], &vis, alibi.as_ref())
            })
        },
    )
}

/// `(out [b, h, s, d], lse f32 [b, h, s])`; inputs contiguous.
fn forward(
    p: &Problem,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    vis: &Visibility,
    alibi: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    match q.device() {
        Device::Cpu => {
            let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let alibi = alibi
                .map(|a| a.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            let (out, lse) =
                cpu::forward(p, &host(q)?, &host(k)?, &host(v)?, vis, alibi.as_deref());
            let out =
                Tensor::from_vec(out, (p.b, p.h, p.s, p.d), q.device())?.to_dtype(q.dtype())?;
            Ok((out, Tensor::from_vec(lse, (p.b, p.h, p.s), q.device())?))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(p, q, k, v, vis, alibi),
        other => candle_core::bail!("flash attention does not run on {other:?}"),
    }
}

/// What backward reads: the node's inputs, its output and log-sum-exp, and the output's
/// gradient, every one contiguous.
struct Saved<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    out: &'a Tensor,
    dout: &'a Tensor,
    lse: &'a Tensor,
}

/// [`backward`] for a graph node: its inputs q, k, v, then its output, the output's gradient
/// and the log-sum-exp its forward kept, each made contiguous.
fn node_backward(
    p: &Problem,
    [q, k, v]: [&Tensor; 3],
    [out, dout, lse]: [&Tensor; 3],
    vis: &Visibility,
    alibi: Option<&Tensor>,
) -> Result<Tensor> {
    let c = |t: &Tensor| t.contiguous();
    let (q, k, v, out, dout) = (c(q)?, c(k)?, c(v)?, c(out)?, c(dout)?);
    let saved = Saved {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        dout: &dout,
        lse,
    };
    backward(p, &saved, vis, alibi)
}

/// The gradients of q, k and v in the inputs' dtype, packed as [`PackedHeads`] lays them out.
fn backward(p: &Problem, x: &Saved, vis: &Visibility, alibi: Option<&Tensor>) -> Result<Tensor> {
    let Saved {
        q,
        k,
        v,
        out,
        dout,
        lse,
    } = *x;
    match q.device() {
        Device::Cpu => {
            let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            let alibi = alibi
                .map(|a| a.flatten_all()?.to_vec1::<f32>())
                .transpose()?;
            let lse = lse.flatten_all()?.to_vec1::<f32>()?;
            let g = cpu::backward(
                p,
                &cpu::Inputs {
                    q: &host(q)?,
                    k: &host(k)?,
                    v: &host(v)?,
                    out: &host(out)?,
                    dout: &host(dout)?,
                    lse: &lse,
                },
                vis,
                alibi.as_deref(),
            );
            // Each KV head's gradient is the sum over the query heads that read it.
            let dev = q.device();
            let per_kv = |x: Vec<f32>| -> Result<Tensor> {
                Tensor::from_vec(x, (p.b, p.kv, p.h / p.kv, p.t, p.d), dev)?
                    .sum(2)?
                    .to_dtype(q.dtype())?
                    .flatten_all()
            };
            let dq = Tensor::from_vec(g.dq, p.b * p.h * p.s * p.d, dev)?.to_dtype(q.dtype())?;
            Tensor::cat(&[dq, per_kv(g.dk)?, per_kv(g.dv)?], 0)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(p, x, vis, alibi),
        other => candle_core::bail!("flash attention does not run on {other:?}"),
    }
}

/// The CPU twin of the kernels: the same tiles, the same online softmax, f32 sums (with
/// [`Problem::operand`]'s rounding in 16-bit types).
mod cpu {
    use super::*;

    /// Inputs of backward, f32, row-major as the tensors.
    pub struct Inputs<'a> {
        pub q: &'a [f32],
        pub k: &'a [f32],
        pub v: &'a [f32],
        pub out: &'a [f32],
        pub dout: &'a [f32],
        pub lse: &'a [f32],
    }

    /// `dq [b, h, s, d]`, and `dk`, `dv` per query head `[b, h, t, d]`.
    pub struct Grads {
        pub dq: Vec<f32>,
        pub dk: Vec<f32>,
        pub dv: Vec<f32>,
    }

    /// In eight running sums, which the compiler keeps in one vector register. (A fused
    /// multiply-add would be a call to the C library's `fmaf` on a CPU target without FMA,
    /// the default, and one sum a chain the compiler may not reorder.)
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a8
            .remainder()
            .iter()
            .zip(b8.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in a8.zip(b8) {
            for i in 0..8 {
                lanes[i] += x[i] * y[i];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }

    /// The pre-softmax score of query `i` and key `j` of head `(b, h)`.
    struct Scorer<'a> {
        p: &'a Problem,
        alibi: Option<&'a [f32]>,
    }

    impl Scorer<'_> {
        fn score(&self, b: usize, h: usize, j: usize, qk: f32) -> f32 {
            let bias = self
                .alibi
                .map_or(0.0, |a| a[(b * self.p.h + h) * self.p.t + j]);
            (qk + bias) * self.p.scale
        }
    }

    pub fn forward(
        p: &Problem,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        vis: &Visibility,
        alibi: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (s, t, d) = (p.s, p.t, p.d);
        let scorer = Scorer { p, alibi };
        let mut out = vec![0f32; p.b * p.h * s * d];
        let mut lse = vec![0f32; p.b * p.h * s];
        out.par_chunks_mut(s * d)
            .zip(lse.par_chunks_mut(s))
            .enumerate()
            .for_each(|(bh, (out, lse))| {
                let (b, h) = (bh / p.h, bh % p.h);
                let kv = (b * p.kv + p.kv_of(h)) * t * d;
                let mut acc = vec![0f32; d];
                let mut scores = [0f32; TILE];
                for i in 0..s {
                    let query = p.past + i;
                    let qrow = &q[(bh * s + i) * d..][..d];
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                    let end = t.min(query + 1);
                    for j0 in (0..end).step_by(TILE) {
                        let n = TILE.min(end - j0);
                        let mut mt = m;
                        for (jj, sc) in scores[..n].iter_mut().enumerate() {
                            let j = j0 + jj;
                            *sc = if vis.visible(b, query, j) {
                                scorer.score(b, h, j, dot(qrow, &k[kv + j * d..][..d]))
                            } else {
                                f32::NEG_INFINITY
                            };
                            mt = mt.max(*sc);
                        }
                        if mt == f32::NEG_INFINITY {
                            continue;
                        }
                        let corr = (m - mt).exp();
                        l *= corr;
                        acc.iter_mut().for_each(|a| *a *= corr);
                        for (jj, &sc) in scores[..n].iter().enumerate() {
                            let pj = if sc == f32::NEG_INFINITY {
                                0.0
                            } else {
                                (sc - mt).exp()
                            };
                            l += pj;
                            let pj = p.operand(pj);
                            let vrow = &v[kv + (j0 + jj) * d..][..d];
                            for (a, x) in acc.iter_mut().zip(vrow) {
                                *a += pj * x;
                            }
                        }
                        m = mt;
                    }
                    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                    for (o, a) in out[i * d..][..d].iter_mut().zip(&acc) {
                        *o = a * inv;
                    }
                    lse[i] = if l > 0.0 { m + l.ln() } else { f32::INFINITY };
                }
            });
        (out, lse)
    }

    pub fn backward(p: &Problem, x: &Inputs, vis: &Visibility, alibi: Option<&[f32]>) -> Grads {
        let (s, t, d) = (p.s, p.t, p.d);
        let scorer = Scorer { p, alibi };
        // delta_i = rowsum(dO * O).
        let delta: Vec<f32> = x
            .dout
            .chunks(d)
            .zip(x.out.chunks(d))
            .map(|(g, o)| dot(g, o))
            .collect();
        let mut dq = vec![0f32; p.b * p.h * s * d];
        let mut dk = vec![0f32; p.b * p.h * t * d];
        let mut dv = vec![0f32; p.b * p.h * t * d];
        dq.par_chunks_mut(s * d)
            .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
            .enumerate()
            .for_each(|(bh, (dq, (dk, dv)))| {
                let (b, h) = (bh / p.h, bh % p.h);
                let kv = (b * p.kv + p.kv_of(h)) * t * d;
                for i in 0..s {
                    let row = bh * s + i;
                    let li = x.lse[row];
                    if li == f32::INFINITY {
                        continue;
                    }
                    let query = p.past + i;
                    let (qrow, grow) = (&x.q[row * d..][..d], &x.dout[row * d..][..d]);
                    for j in 0..t.min(query + 1) {
                        if !vis.visible(b, query, j) {
                            continue;
                        }
                        let (krow, vrow) = (&x.k[kv + j * d..][..d], &x.v[kv + j * d..][..d]);
                        let pij = (scorer.score(b, h, j, dot(qrow, krow)) - li).exp();
                        let ds = p.operand(pij * (dot(grow, vrow) - delta[row]) * p.scale);
                        let pij = p.operand(pij);
                        for (g, kx) in dq[i * d..][..d].iter_mut().zip(krow) {
                            *g += ds * kx;
                        }
                        for (g, qx) in dk[j * d..][..d].iter_mut().zip(qrow) {
                            *g += ds * qx;
                        }
                        for (g, gx) in dv[j * d..][..d].iter_mut().zip(grow) {
                            *g += pij * gx;
                        }
                    }
                }
            });
        Grads { dq, dk, dv }
    }
}

/// Flash attention's kernel modules (three head-size builds of `flash.cu`, two of
/// `flash_mma.cu`), for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_modules() -> [&'static crate::ops::kernels::CudaModule; 5] {
    cuda::modules()
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, wrap};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    fn dmax32() -> String {
        "#define FLASH_DMAX 32".into()
    }
    fn dmax64() -> String {
        "#define FLASH_DMAX 64".into()
    }
    fn dmax128() -> String {
        "#define FLASH_DMAX 128".into()
    }
    pub(super) fn modules() -> [&'static CudaModule; 5] {
        [&FLASH32, &FLASH64, &FLASH128, &FLASH_MMA64, &FLASH_MMA128]
    }

    const SIMT: &str = concat!(include_str!("flash_common.cu"), include_str!("flash.cu"));
    static FLASH32: CudaModule = CudaModule::new("adapterlab_flash32", SIMT, dmax32);
    static FLASH64: CudaModule = CudaModule::new("adapterlab_flash64", SIMT, dmax64);
    static FLASH128: CudaModule = CudaModule::new("adapterlab_flash128", SIMT, dmax128);

    /// The tensor-core kernels (flash_mma.cu), for the architecture their `mma.sync` needs.
    const MMA: &str = concat!(
        include_str!("mma.cu"),
        include_str!("flash_common.cu"),
        include_str!("flash_mma.cu")
    );
    static FLASH_MMA64: CudaModule =
        CudaModule::new("adapterlab_flash_mma64", MMA, dmax64).for_arch("compute_80");
    static FLASH_MMA128: CudaModule =
        CudaModule::new("adapterlab_flash_mma128", MMA, dmax128).for_arch("compute_80");

    /// The module and register width serving heads of `d`.
    fn module(d: usize) -> Result<(&'static CudaModule, usize)> {
        Ok(match d {
            0..=32 => (&FLASH32, 32),
            33..=64 => (&FLASH64, 64),
            65..=128 => (&FLASH128, 128),
            _ => candle_core::bail!("flash attention: heads of {d} (at most {MAX_HEAD_DIM})"),
        })
    }

    /// The tensor-core module serving `p` on `tensors` (q, k, v and, backward, the output and
    /// its gradient), if one does: a 16-bit type, heads of exactly 64 or 128, more queries a
    /// head than decoding's few, a card of compute capability 8.0 or later, and every tensor
    /// contiguous from a 16-byte boundary (the kernels load 16 bytes at a time).
    fn tensor_core_module(p: &Problem, tensors: &[&Tensor]) -> Result<Option<&'static CudaModule>> {
        let module = match p.d {
            64 => &FLASH_MMA64,
            128 => &FLASH_MMA128,
            _ => return Ok(None),
        };
        let dtype = tensors[0].dtype();
        let aligned = tensors
            .iter()
            .all(|t| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8));
        let serves = matches!(dtype, DType::BF16 | DType::F16)
            && p.s > DECODE_MAX_QUERIES
            && aligned
            && crate::ops::kernels::sm80_or_later(tensors[0].device())?;
        Ok(serves.then_some(module))
    }

    /// Up to this many queries a head, the forward pass runs `flash_decode` (a warp a query)
    /// instead of `flash_fwd` (a thread a query): the case of decoding after a cache.
    const DECODE_MAX_QUERIES: usize = 4;

    /// Query rows a forward or dQ block holds, and key rows a dK/dV block holds (flash.cu's
    /// TK), by register width.
    fn threads(dmax: usize) -> (u32, u32) {
        (64, if dmax == 128 { 32 } else { 64 })
    }

    fn dtype_name(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("flash attention on {other:?} is not supported"),
        })
    }

    /// An ALiBi stand-in the kernels never read when there is none.
    fn alibi_or_dummy(alibi: Option<&Tensor>, dev: &Device) -> Result<(Tensor, i32)> {
        Ok(match alibi {
            Some(a) => (a.clone(), 1),
            None => (crate::ops::softmax::no_mask(dev)?, 0),
        })
    }

    pub fn forward(
        p: &Problem,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        vis: &Visibility,
        alibi: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let dev = cuda_device(q)?;
        let (module, dmax) = module(p.d)?;
        let (rows, _) = threads(dmax);
        let (alibi, has_alibi) = alibi_or_dummy(alibi, q.device())?;
        let (qi, ki, vi) = (CudaInput::of(q)?, CudaInput::of(k)?, CudaInput::of(v)?);
        let (ci, ai) = (CudaInput::of(&vis.codes)?, CudaInput::of(&alibi)?);
        let codes = ci.view::<u32>(2 * p.b * p.t)?;
        let alibi_v = ai.view::<f32>(alibi.elem_count())?;
        let nq = p.b * p.h * p.s * p.d;
        let nk = p.b * p.kv * p.t * p.d;
        // A few queries a head (decoding): one warp a query, its lanes splitting the keys.
        let decode = p.s <= DECODE_MAX_QUERIES;
        let mma = tensor_core_module(p, &[q, k, v])?;
        let cfg = if decode {
            let warps = 4;
            LaunchConfig {
                grid_dim: ((p.b * p.h * p.s).div_ceil(warps) as u32, 1, 1),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: 0,
            }
        } else if mma.is_some() {
            per_64_rows(p.s, p)
        } else {
            LaunchConfig {
                grid_dim: (p.s.div_ceil(rows as usize) as u32, p.h as u32, p.b as u32),
                block_dim: (rows, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        let (module, kernel) = match mma {
            Some(m) => (m, "flash_mma_fwd"),
            None if decode => (module, "flash_decode"),
            None => (module, "flash_fwd"),
        };
        let dims = Dims::of(p, has_alibi);
        // SAFETY: every element is written by the kernel below.
        let lse = unsafe { dev.alloc::<f32>(p.b * p.h * p.s)? };
        macro_rules! launch {
            ($t:ty) => {{
                let name = format!("{kernel}_{}_{dmax}", dtype_name(q.dtype())?);
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(nq)? };
                let (qv, kv, vv) = (qi.view::<$t>(nq)?, ki.view::<$t>(nk)?, vi.view::<$t>(nk)?);
                crate::run_kernel!(module, dev, &name, cfg;
                    &qv, &kv, &vv, &codes,
                    &alibi_v, &out, &lse, &dims.b, &dims.h, &dims.kv, &dims.s, &dims.t, &dims.d,
                    &dims.past, &dims.scale, &dims.has_alibi,
                )?;
                wrap(out, &dev, (p.b, p.h, p.s, p.d))
            }};
        }
        let out = match q.dtype() {
            DType::F32 => launch!(f32),
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            other => candle_core::bail!("flash attention on {other:?} is not supported"),
        };
        Ok((out, wrap(lse, &dev, (p.b, p.h, p.s))))
    }

    /// The packed gradients (see [`PackedHeads`]): dQ straight from its kernel; dK and dV
    /// from the dK/dV kernel's f32 sums per query head (SIMT) or per chunk of a group's heads
    /// (tensor cores), `[b, kv * parts, t, d]`, added in part order and rounded once by
    /// `flash_sum_parts`.
    pub fn backward(
        p: &Problem,
        x: &Saved,
        vis: &Visibility,
        alibi: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Saved {
            q,
            k,
            v,
            out,
            dout,
            lse,
        } = *x;
        let dev = cuda_device(q)?;
        let (module, dmax) = module(p.d)?;
        let (rows, keys) = threads(dmax);
        let (alibi, has_alibi) = alibi_or_dummy(alibi, q.device())?;
        let (qi, ki, vi) = (CudaInput::of(q)?, CudaInput::of(k)?, CudaInput::of(v)?);
        let (oi, gi, li) = (
            CudaInput::of(out)?,
            CudaInput::of(dout)?,
            CudaInput::of(lse)?,
        );
        let (ci, ai) = (CudaInput::of(&vis.codes)?, CudaInput::of(&alibi)?);
        let codes = ci.view::<u32>(2 * p.b * p.t)?;
        let alibi_v = ai.view::<f32>(alibi.elem_count())?;
        let lse_v = li.view::<f32>(p.b * p.h * p.s)?;
        let nq = p.b * p.h * p.s * p.d;
        let nk = p.b * p.kv * p.t * p.d;
        let dims = Dims::of(p, has_alibi);
        let mma = tensor_core_module(p, &[q, k, v, out, dout])?;
        // The tensor-core dK/dV kernel sums `heads_per` query heads of a KV head's group a
        // block; the SIMT one writes each query head's.
        let group = p.h / p.kv;
        let heads_per = if mma.is_some() {
            dkv_heads_per_block(p)
        } else {
            1
        };
        let chunks = group.div_ceil(heads_per);
        let (module, prefix, per_query, per_key) = match mma {
            Some(m) => (
                m,
                "flash_mma",
                per_64_rows(p.s, p),
                LaunchConfig {
                    grid_dim: (p.t.div_ceil(64) as u32, (p.kv * chunks) as u32, p.b as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
            None => (
                module,
                "flash",
                LaunchConfig {
                    grid_dim: (p.s.div_ceil(rows as usize) as u32, p.h as u32, p.b as u32),
                    block_dim: (rows, 1, 1),
                    shared_mem_bytes: 0,
                },
                LaunchConfig {
                    grid_dim: (p.t.div_ceil(keys as usize) as u32, p.h as u32, p.b as u32),
                    block_dim: (keys, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
        };
        let dtype = dtype_name(q.dtype())?;
        let suffix = format!("{dtype}_{dmax}");
        // SAFETY: every element of each is written by the kernels below.
        let delta = unsafe { dev.alloc::<f32>(p.b * p.h * p.s)? };
        let nkh = p.b * p.kv * chunks * p.t * p.d;
        let dk = unsafe { dev.alloc::<f32>(nkh)? };
        let dv = unsafe { dev.alloc::<f32>(nkh)? };
        let heads_per = heads_per as i32;
        let (parts, per, n_kv) = (chunks as i32, (p.t * p.d) as i64, nk as i64);
        let sum_cfg = LaunchConfig::for_num_elems(nk as u32);
        let sum_name = format!("flash_sum_parts_{dtype}");
        macro_rules! launch {
            ($t:ty) => {{
                let (qv, kv, vv) = (qi.view::<$t>(nq)?, ki.view::<$t>(nk)?, vi.view::<$t>(nk)?);
                let (ov, gv) = (oi.view::<$t>(nq)?, gi.view::<$t>(nq)?);
                // SAFETY: every element is written by the kernels below: dQ's by the dQ
                // kernel, dK's and dV's by flash_sum_parts.
                let grads = unsafe { dev.alloc::<$t>(nq + 2 * nk)? };
                let dq = grads.slice(0..nq);
                // The kernels timed apart under ADAPTERLAB_PROFILE.
                let on = q.device();
                crate::ops::profile::scope("attn.flash.bwd.dq", on, || {
                    crate::run_kernel!(module, dev, &format!("{prefix}_bwd_dq_{suffix}"), per_query;
                        &qv, &kv, &vv, &ov, &gv, &lse_v, &codes,
                        &alibi_v, &dq, &delta, &dims.b, &dims.h, &dims.kv, &dims.s, &dims.t,
                        &dims.d, &dims.past, &dims.scale, &dims.has_alibi,
                    )
                })?;
                // Reads the deltas the launch above wrote (same stream).
                let name = format!("{prefix}_bwd_dkv_{suffix}");
                crate::ops::profile::scope("attn.flash.bwd.dkv", on, || {
                    if mma.is_some() {
                        crate::run_kernel!(module, dev, &name, per_key;
                            &qv, &kv, &vv, &gv, &lse_v, &delta, &codes, &alibi_v, &dk,
                            &dv, &dims.b, &dims.h, &dims.kv, &dims.s, &dims.t, &dims.d,
                            &dims.past, &dims.scale, &dims.has_alibi, &heads_per,
                        )
                    } else {
                        crate::run_kernel!(module, dev, &name, per_key;
                            &qv, &kv, &vv, &gv, &lse_v, &delta, &codes, &alibi_v, &dk,
                            &dv, &dims.b, &dims.h, &dims.kv, &dims.s, &dims.t, &dims.d,
                            &dims.past, &dims.scale, &dims.has_alibi,
                        )
                    }
                })?;
                crate::ops::profile::scope("attn.flash.bwd.sum", on, || {
                    for (part, at) in [(&dk, nq), (&dv, nq + nk)] {
                        let dst = grads.slice(at..at + nk);
                        crate::run_kernel!(module, dev, &sum_name, sum_cfg;
                            part, &dst, &parts, &per, &n_kv)?;
                    }
                    Ok(())
                })?;
                wrap(grads, &dev, nq + 2 * nk)
            }};
        }
        match q.dtype() {
            DType::F32 => Ok(launch!(f32)),
            DType::BF16 => Ok(launch!(half::bf16)),
            DType::F16 => Ok(launch!(half::f16)),
            other => candle_core::bail!("flash attention on {other:?} is not supported"),
        }
    }

    /// Query heads a tensor-core dK/dV block sums: enough blocks to fill an H100 twice or more
    /// (about 1,024 of 128 threads), each KV head's group cut into as few chunks as give that.
    fn dkv_heads_per_block(p: &Problem) -> usize {
        let group = p.h / p.kv;
        let blocks = p.b * p.kv * p.t.div_ceil(64);
        let chunks = 1024usize.div_ceil(blocks).clamp(1, group);
        group.div_ceil(chunks)
    }

    /// The tensor-core kernels' launch: four warps of 16 rows a block, over `rows` (queries or
    /// keys), heads and batch.
    fn per_64_rows(rows: usize, p: &Problem) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, p.h as u32, p.b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The kernels' scalar shape arguments, as flash_common.cu's `DIMS_PARAMS` orders them.
    struct Dims {
        b: i32,
        h: i32,
        kv: i32,
        s: i32,
        t: i32,
        d: i32,
        past: i32,
        scale: f32,
        has_alibi: i32,
    }

    impl Dims {
        fn of(p: &Problem, has_alibi: i32) -> Self {
            Dims {
                b: p.b as i32,
                h: p.h as i32,
                kv: p.kv as i32,
                s: p.s as i32,
                t: p.t as i32,
                d: p.d as i32,
                past: p.past as i32,
                scale: p.scale,
                has_alibi,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Falcon-7B's training shape sums 5 query heads a dK/dV block (15 chunks of its 71);
        /// small problems one head a block, large ones a whole group; every chunk holds a head.
        #[test]
        fn dkv_chunks_cover_each_group_and_none_is_empty() {
            let problem = |b, h, kv, t| Problem {
                b,
                h,
                kv,
                s: t,
                t,
                d: 64,
                past: 0,
                scale: 0.125,
                dtype: DType::BF16,
            };
            for (p, want) in [
                (problem(8, 71, 1, 512), 5),
                (problem(2, 71, 1, 500), 2),
                (problem(2, 71, 1, 130), 1),
                (problem(2, 32, 8, 2048), 2),
                (problem(16, 32, 8, 4096), 4),
            ] {
                let per = dkv_heads_per_block(&p);
                let (group, chunks) = (p.h / p.kv, (p.h / p.kv).div_ceil(per));
                assert_eq!(per, want, "{p:?}");
                assert!(chunks * per >= group && (chunks - 1) * per < group, "{p:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{AttentionContext, alibi_bias, attend};

    fn var(shape: (usize, usize, usize, usize), seed: f32) -> Result<candle_core::Var> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        candle_core::Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Flash attention and the masked path, outputs and gradients, on the real queries only.
    #[allow(clippy::too_many_arguments)]
    fn check_against_masked(
        ctx: &AttentionContext,
        vis: &Visibility,
        real_queries: &Tensor,
        h: usize,
        kv: usize,
        d: usize,
        alibi: bool,
    ) -> Result<()> {
        let (b, s, t) = (ctx.batch, ctx.seq_len, ctx.past_len + ctx.seq_len);
        let q = var((b, h, s, d), 0.1)?;
        let k = var((b, kv, t, d), 1.3)?;
        let v = var((b, kv, t, d), 2.9)?;
        let w = Tensor::from_vec(
            (0..b * h * s * d).map(|i| (i % 7) as f32 - 3.0).collect(),
            (b, h, s, d),
            &Device::Cpu,
        )?;
        let real = real_queries
            .to_dtype(DType::F32)?
            .reshape((b, 1, s, 1))?
            .broadcast_as((b, h, s, d))?;
        let bias = if alibi {
            Some(alibi_bias(ctx, h, DType::F32, &Device::Cpu)?)
        } else {
            None
        };
        let run = |flash: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let out = if flash {
                flash_attend(&q, &k, &v, 0.5, bias.as_ref(), vis)?
            } else {
                attend(&q, &k, &v, 0.5, bias.as_ref(), ctx.mask()?)?
            };
            let out = (out * &real)?;
            let grads = (&out * &w)?.sum_all()?.backward()?;
            let g = [&q, &k, &v].map(|x| grads.get(x.as_tensor()).unwrap().clone());
            Ok((out, g.to_vec()))
        };
        let (a, ga) = run(true)?;
        let (e, ge) = run(false)?;
        assert!(
            max_diff(&a, &e)? < 1e-5,
            "outputs differ by {}",
            max_diff(&a, &e)?
        );
        for (name, (x, y)) in ["q", "k", "v"].iter().zip(ga.iter().zip(&ge)) {
            assert!(
                max_diff(x, y)? < 1e-4,
                "d{name} differs by {}",
                max_diff(x, y)?
            );
        }
        Ok(())
    }

    /// In bf16 the twin rounds probabilities and dS before their products (as the tensor-core
    /// kernels do): its output and gradients stay within bf16's rounding of the f32 twin on the
    /// same (bf16-exact) inputs, and differ from it (the rounding happens); and they equal the
    /// unfused (masked) path's in bf16 within that rounding. (Not always as close to f32 as the
    /// unfused path: delta = rowsum(dO * O) reads the output rounded to bf16, as
    /// FlashAttention's does, where the masked softmax's backward sums P dP.)
    #[test]
    fn sixteen_bit_flash_rounds_p_and_ds_and_stays_near_f32() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kv, s, d) = (1, 4, 1, 40, 16);
        let vis = Visibility::new(&[vec![true; s]], None, 0, &dev)?;
        let bf16_exact = |x: candle_core::Var| -> Result<Tensor> {
            x.as_tensor().to_dtype(DType::BF16)?.to_dtype(DType::F32)
        };
        let (q0, k0, v0) = (
            bf16_exact(var((b, h, s, d), 0.1)?)?,
            bf16_exact(var((b, kv, s, d), 1.3)?)?,
            bf16_exact(var((b, kv, s, d), 2.9)?)?,
        );
        let w = Tensor::from_vec(
            (0..b * h * s * d).map(|i| (i % 7) as f32 - 3.0).collect(),
            (b, h, s, d),
            &dev,
        )?;
        let ctx = AttentionContext::new(None, b, s, 0, &dev)?;
        let run_with = |dtype: DType, flash: bool| -> Result<Vec<Tensor>> {
            let (q, k, v) = (
                candle_core::Var::from_tensor(&q0)?,
                candle_core::Var::from_tensor(&k0)?,
                candle_core::Var::from_tensor(&v0)?,
            );
            let cast = |x: &candle_core::Var| x.as_tensor().to_dtype(dtype);
            let (q16, k16, v16) = (cast(&q)?, cast(&k)?, cast(&v)?);
            let out = if flash {
                flash_attend(&q16, &k16, &v16, 0.5, None, &vis)?
            } else {
                attend(&q16, &k16, &v16, 0.5, None, ctx.mask()?)?
            };
            let out = out.to_dtype(DType::F32)?;
            let grads = (&out * &w)?.sum_all()?.backward()?;
            let mut all = vec![out];
            for x in [&q, &k, &v] {
                all.push(grads.get(x.as_tensor()).unwrap().to_dtype(DType::F32)?);
            }
            Ok(all)
        };
        let run = |dtype| run_with(dtype, true);
        let (exact, rounded) = (run(DType::F32)?, run(DType::BF16)?);
        let unfused = run_with(DType::BF16, false)?;
        for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
            let e = &exact[i];
            let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let diff = max_diff(e, &rounded[i])? / scale;
            let apart = max_diff(&rounded[i], &unfused[i])? / scale;
            assert!(
                diff > 0.0 && diff < 3e-2,
                "{what}: {diff} of its largest value"
            );
            // dK's terms cancel most (a row's dS sums to zero, and four query heads add up
            // here): 0.026 apart at this shape.
            assert!(
                apart < 4e-2,
                "{what}: flash and the masked path in bf16 {apart} apart"
            );
        }
        Ok(())
    }

    #[test]
    fn flash_equals_the_masked_path_with_left_padding_multi_query_and_alibi() -> Result<()> {
        let dev = Device::Cpu;
        // Longer than one tile, so the online softmax rescales across tiles.
        let (b, s) = (2, 70);
        let mut rows = vec![vec![1u32; s]; b];
        rows[0][..5].iter_mut().for_each(|m| *m = 0);
        let mask = Tensor::new(rows.clone(), &dev)?;
        let ctx = AttentionContext::new(Some(&mask), b, s, 0, &dev)?;
        let real: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| r.iter().map(|&m| m != 0).collect())
            .collect();
        let vis = Visibility::new(&real, None, 0, &dev)?;
        for (h, kv, alibi) in [(4, 1, false), (6, 2, false), (4, 4, true)] {
            check_against_masked(&ctx, &vis, &mask, h, kv, 8, alibi)?;
        }
        Ok(())
    }

    #[test]
    fn flash_equals_the_masked_path_for_packed_rows_and_after_a_cache() -> Result<()> {
        let dev = Device::Cpu;
        // Row 0: examples of 3, 1 and 4 tokens; row 1: 2 and 3 tokens, then 3 of padding.
        let rows = vec![
            vec![1u32, 1, 1, 1, 1, 1, 1, 1],
            vec![1, 1, 1, 1, 1, 0, 0, 0],
        ];
        let mask = Tensor::new(rows.clone(), &dev)?;
        let segments = vec![vec![0, 0, 0, 1, 2, 2, 2, 2], vec![5, 5, 6, 6, 6, 6, 6, 6]];
        let ctx = AttentionContext::packed(Some(&mask), &segments, 2, 8, &dev)?;
        let real: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| r.iter().map(|&m| m != 0).collect())
            .collect();
        let vis = Visibility::new(&real, Some(&segments), 0, &dev)?;
        check_against_masked(&ctx, &vis, &mask, 6, 2, 4, false)?;

        // Two new tokens after 5 cached, the first row left-padded by 2.
        let rows = vec![vec![0u32, 0, 1, 1, 1, 1, 1], vec![1; 7]];
        let mask = Tensor::new(rows.clone(), &dev)?;
        let ctx = AttentionContext::new(Some(&mask), 2, 2, 5, &dev)?;
        let real: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| r.iter().map(|&m| m != 0).collect())
            .collect();
        let vis = Visibility::new(&real, None, 5, &dev)?;
        let all = Tensor::ones((2, 2), DType::U32, &dev)?;
        check_against_masked(&ctx, &vis, &all, 4, 1, 8, true)?;
        Ok(())
    }

    #[test]
    fn a_query_that_sees_no_key_gets_zeros_and_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let vis = Visibility::new(&[vec![false, true]], None, 0, &dev)?;
        let q = var((1, 1, 2, 4), 0.2)?;
        let k = var((1, 1, 2, 4), 0.7)?;
        let v = var((1, 1, 2, 4), 1.1)?;
        let out = flash_attend(&q, &k, &v, 1.0, None, &vis)?;
        assert_eq!(out.get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?, vec![0.0; 4]);
        // The second query sees only the second key: its output is that value.
        assert_eq!(
            out.get(0)?.get(0)?.get(1)?.to_vec1::<f32>()?,
            v.get(0)?.get(0)?.get(1)?.to_vec1::<f32>()?
        );
        let grads = out.sum_all()?.backward()?;
        let dk = grads.get(k.as_tensor()).unwrap();
        assert_eq!(dk.get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?, vec![0.0; 4]);
        Ok(())
    }

    /// The packed form reads q, k and v where [`PackedHeads`] lays them out and its backward
    /// writes their gradients there: the same output and gradients as the three tensors give
    /// (the CPU twin on both), for grouped heads over two rows, one with padding.
    #[test]
    fn packed_heads_give_the_output_and_gradients_of_the_three_tensors() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kv, s, d) = (2, 4, 2, 6, 8);
        let vis = Visibility::new(
            &[vec![true; s], vec![true, true, true, true, false, false]],
            None,
            0,
            &dev,
        )?;
        let (q, k, v) = (
            var((b, h, s, d), 0.3)?,
            var((b, kv, s, d), 1.7)?,
            var((b, kv, s, d), 2.3)?,
        );
        let flat = |x: &candle_core::Var| x.as_tensor().flatten_all();
        let data =
            candle_core::Var::from_tensor(&Tensor::cat(&[flat(&q)?, flat(&k)?, flat(&v)?], 0)?)?;
        let heads = PackedHeads {
            data: data.as_tensor().clone(),
            b,
            h,
            kv,
            s,
            d,
        };
        let w = var((b, h, s, d), 4.1)?;
        let packed = flash_attend_packed(&heads, 0.5, None, &vis)?;
        let apart = flash_attend(&q, &k, &v, 0.5, None, &vis)?;
        assert_eq!(max_diff(&packed, &apart)?, 0.0);
        let g_packed = (&packed * w.as_tensor())?.sum_all()?.backward()?;
        let g_apart = (&apart * w.as_tensor())?.sum_all()?.backward()?;
        let want = Tensor::cat(
            &[
                flat_grad(&g_apart, &q)?,
                flat_grad(&g_apart, &k)?,
                flat_grad(&g_apart, &v)?,
            ],
            0,
        )?;
        let got = g_packed.get(data.as_tensor()).expect("a packed gradient");
        assert_eq!(got.dims(), want.dims());
        assert_eq!(max_diff(got, &want)?, 0.0);
        Ok(())
    }

    fn flat_grad(grads: &candle_core::backprop::GradStore, x: &candle_core::Var) -> Result<Tensor> {
        grads.get(x.as_tensor()).expect("a gradient").flatten_all()
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let vis = Visibility::new(&[vec![true; 4]], None, 0, &dev)?;
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?;
        assert!(flash_attend(&q, &k, &k, 1.0, None, &vis).is_err());
        let k = Tensor::zeros((1, 1, 5, 8), DType::F32, &dev)?;
        assert!(flash_attend(&q, &k, &k, 1.0, None, &vis).is_err());
        Ok(())
    }
}
