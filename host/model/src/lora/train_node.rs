//! A LoRA linear layer in training as one graph node: `y = x W^T + dropout(x) A^T (s B)^T`.
//!
//! Op by op, candle's graph holds every intermediate of that sum until backward: the base
//! product, the adapter's product, the dropped-out copy of `x`, each the size of the layer's
//! output or input. At Falcon-7B's four adapted modules, 8 x 512 tokens, they are ~25 GB of the
//! ~50 GB of activations of a training step, while backward needs none of them: the frozen base
//! needs only its weight, the adapter `x` (already kept for it) and the small `h = dropout(x)
//! A^T` (`[m, r]`), which it keeps too. Its value is the op-by-op sum's, bit for bit where the
//! same operations run (the CPU, f32, ranks without a kernel); its gradients equal the op-by-op
//! graph's up to the matmuls' summation order.
//!
//! On a GPU, in a 16-bit type, at ranks 8 and 16, the adapter's terms run in the kernels of
//! [`crate::lora::kernels`]: `h` and `dA` straight from `x` with the dropout drawn in the kernel
//! (the dropped copy is never written); the adapter's term of the value, and of the input
//! gradient (with the dropout's mask), is written alone and added inside the base's product
//! ([`BaseWeight::forward_plus`], one rounding of the sum where the graph rounds the product and
//! then the sum); where GELU's backward follows (or a bias comes first), the term is added to
//! the base's output in one pass with the graph's roundings. Op by op, each term was a few passes over a
//! `[m, n]` or `[m, k]` tensor: 0.167 of a 0.557 s step at 8 x 512 on an H100 (2026-12-06).

use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::ops::dropout::seeded_dropout;
use crate::quant::weight::BaseWeight;

/// What the node does to its input before the layer reads it. With an activation the node
/// keeps the pre-activation (for the activation's backward) and the activation itself (for
/// `dA`), where the op-by-op graph held those and the dropped copy (at Falcon's MLP, `k` is the
/// widest of the model). Recomputing the activation in backward instead saved one `[m, k]`
/// tensor a layer (4.8 GB at Falcon-7B, 8 x 512) but cost more than the rest of `dA`: on an
/// H100 the exact GELU took ~0.4 of the ~0.58 ms of that layer's `dA` (2026-12-06).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    AsIs,
    /// The exact GELU ([`crate::ops::gelu::gelu_erf`]).
    GeluErf,
}

impl Input {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Input::AsIs => Ok(x.clone()),
            Input::GeluErf => crate::ops::gelu::gelu_erf(x),
        }
    }

    /// The gradient with respect to the node's input, given the one with respect to the
    /// layer's input.
    fn backward(self, x: &Tensor, grad: Tensor) -> Result<Tensor> {
        match self {
            Input::AsIs => Ok(grad),
            Input::GeluErf => crate::ops::gelu::gelu_erf_backward(x, &grad),
        }
    }
}

/// The adapter's dropout in a node: `(key, p)` of [`seeded_dropout`], or none.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub key: u64,
    pub p: f32,
}

/// The adapter's weights as the optimizer holds them, `A` `[r, k]` and `B` `[n, r]`, and the
/// scaling `B` is multiplied by. The node computes in its input's dtype with 16-bit copies of
/// them where that is 16-bit (`A` rounded, `scaling * B` as candle's ops form it), and hands each
/// its gradient in its own dtype as the graph `to_dtype(A)`, `to_dtype(B) * scaling` would:
/// on a GPU the copies take one launch and the gradients none of their own, where those three
/// graph ops and their backward took six small launches a layer.
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
}

/// `z W^T (+ bias) + dropout(z) A^T (s B)^T` with `z = input(x)`, for `x` `[m, k]`, `A` `[r, k]`,
/// `B` `[n, r]` (see [`Adapter`]), as one graph node (see the module docs). The bias (`[n]`,
/// frozen) is added to the base product first, as the op-by-op layer does.
pub fn lora_linear(
    base: Arc<dyn BaseWeight>,
    bias: Option<&Tensor>,
    x: &Tensor,
    adapter: Adapter<'_>,
    dropout: Option<Dropout>,
    input: Input,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, kb) = base.dims();
    let Adapter { a, b, scaling } = adapter;
    if a.rank() != 2 || a.dim(1)? != k || kb != k || b.dims() != [n, a.dim(0)?] {
        candle_core::bail!(
            "lora-linear: x {:?}, A {:?}, B {:?} against a base of [{n}, {kb}]",
            x.dims(),
            a.dims(),
            b.dims()
        );
    }
    let (a16, bs16) = compute_copies(adapter, x.dtype())?;
    let z = crate::ops::profile::scope("lora.input", x.device(), || input.apply(&x.detach()))?;
    // The dropout's decisions kept for dA where A will want a gradient (see `forward`).
    let keep_mask = a.track_op() && !crate::ops::handover::no_grad();
    let (y, h, mask_bits) = forward(base.as_ref(), bias, &z, &a16, &bs16, dropout, keep_mask)?;
    // The activation, where there is one, stays for dA (see `Input`).
    let activation = (input != Input::AsIs && a.track_op()).then_some(z);
    if y.dims() != [m, n] || y.dtype() != x.dtype() {
        candle_core::bail!(
            "lora-linear: the base answered {:?} {:?} for x {:?} {:?}",
            y.dims(),
            y.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    if !(x.track_op() || a.track_op() || b.track_op()) || crate::ops::handover::no_grad() {
        return Ok(y);
    }
    // Whether each input wants a gradient, fixed now: the node's backward sees them detached.
    let wants = (x.track_op(), a.track_op(), b.track_op());
    let weights = (a.dtype(), b.dtype(), scaling);
    crate::ops::handover::with_backward3(
        "lora-linear",
        [x, a, b],
        y,
        Box::new(move |[x, _, _], _out, grad| {
            let kept = Kept {
                x,
                z: activation.as_ref(),
                a: &a16,
                bs: &bs16,
                h: &h,
                mask_bits: mask_bits.as_ref(),
            };
            backward(base.as_ref(), dropout, input, wants, weights, kept, grad)
        }),
    )
}

/// `A` and `scaling * B` in `dtype`, outside any graph: one kernel for f32 weights under a
/// 16-bit input on a GPU, else candle's `to_dtype` and affine ops (the same bits).
fn compute_copies(adapter: Adapter<'_>, dtype: candle_core::DType) -> Result<(Tensor, Tensor)> {
    let Adapter { a, b, scaling } = adapter;
    #[cfg(feature = "cuda")]
    if let Some(copies) = crate::lora::kernels::weights16(a, b, scaling, dtype)? {
        return Ok(copies);
    }
    let a16 = a.detach().to_dtype(dtype)?;
    let bs16 = (b.detach().to_dtype(dtype)? * scaling)?;
    Ok((a16, bs16))
}

/// A gradient computed in the node's dtype, as the weight of dtype `weight` gets it through
/// the graph `to_dtype(weight) (* scaling)`: the affine op's product in the node's dtype, then
/// the cast.
fn to_weight(grad: Tensor, weight: candle_core::DType, scaling: Option<f64>) -> Result<Tensor> {
    let grad = match scaling {
        Some(s) => (grad * s)?,
        None => grad,
    };
    grad.to_dtype(weight)
}

/// Where a training kernel sends a gradient for a weight of dtype `weight` computed in `dtype`:
/// straight on to an f32 weight (scaled for B), else as the node's dtype for [`to_weight`].
#[cfg(feature = "cuda")]
fn kernel_out(
    weight: candle_core::DType,
    dtype: candle_core::DType,
    scaling: Option<f64>,
) -> crate::lora::kernels::GradOut {
    use crate::lora::kernels::GradOut;
    if weight == candle_core::DType::F32 && dtype != weight {
        GradOut::F32 { scaling }
    } else {
        GradOut::Half
    }
}

/// A kernel's gradient sent as [`kernel_out`] said, as the weight gets it: already there for
/// an f32 weight, else through [`to_weight`].
#[cfg(feature = "cuda")]
fn from_kernel(
    grad: Tensor,
    sent: crate::lora::kernels::GradOut,
    weight: candle_core::DType,
    scaling: Option<f64>,
) -> Result<Tensor> {
    match sent {
        crate::lora::kernels::GradOut::Half => to_weight(grad, weight, scaling),
        crate::lora::kernels::GradOut::F32 { .. } => Ok(grad),
    }
}

/// The value without a graph, `h = dropout(z) A^T` for backward and, where `keep_mask` is set
/// and the kernel stores them, the dropout's decisions for dA (one bit an element of z): the
/// base product and its bias, plus the adapter's, in the op-by-op order.
fn forward(
    base: &dyn BaseWeight,
    bias: Option<&Tensor>,
    z: &Tensor,
    a: &Tensor,
    bs: &Tensor,
    dropout: Option<Dropout>,
    keep_mask: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if crate::lora::kernels::trains(z, a.dim(0)?) {
        use crate::lora::kernels::{Factor, train_add, train_h_keeping, train_term};
        let (h, bits) = train_h_keeping(z, &a.contiguous()?, mask(dropout), keep_mask)?;
        let bs = bs.contiguous()?;
        let out = match bias {
            // The adapter's term added inside the base's product: one rounding of the sum.
            None => base.forward_plus(z, train_term(&h, Factor::OutByRank(&bs), None, None)?)?,
            Some(b) => {
                let y = base
                    .forward(z)?
                    .broadcast_add(&b.detach().to_dtype(z.dtype())?)?;
                train_add(&y, &h, Factor::OutByRank(&bs), None, None, None)?
            }
        };
        return Ok((out, h, bits));
    }
    let _ = keep_mask;
    let y = base.forward(z)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.detach().to_dtype(y.dtype())?)?,
        None => y,
    };
    let h = dropped(z, dropout)?.matmul(&a.t()?)?;
    let delta = h.matmul(&bs.t()?)?;
    Ok(((y + delta)?, h, None))
}

fn dropped(x: &Tensor, dropout: Option<Dropout>) -> Result<Tensor> {
    match dropout {
        Some(d) if d.p > 0.0 => seeded_dropout(x, d.key, d.p),
        _ => Ok(x.clone()),
    }
}

#[cfg(feature = "cuda")]
fn mask(dropout: Option<Dropout>) -> crate::lora::kernels::Mask {
    dropout.map(|d| (d.key, d.p))
}

/// What backward reads: the node's input (detached), the adapter's copies in the node's dtype
/// and the `h` its forward made.
struct Kept<'a> {
    x: &'a Tensor,
    /// `input(x)`, kept where `input` is an activation and `A` wants a gradient.
    z: Option<&'a Tensor>,
    a: &'a Tensor,
    bs: &'a Tensor,
    h: &'a Tensor,
    /// The dropout's decisions forward's `h` kernel stored, for dA.
    mask_bits: Option<&'a Tensor>,
}

/// The gradients of [`lora_linear`] for the inputs in `wants` (x, A, B), A's and B's in their
/// dtypes (`weights`: A's, B's and the scaling): the base's input gradient and the adapter's,
/// with the dropout recomputed from its key (and, for `dA`, the input's activation).
fn backward(
    base: &dyn BaseWeight,
    dropout: Option<Dropout>,
    input: Input,
    wants: (bool, bool, bool),
    weights: (candle_core::DType, candle_core::DType, f64),
    kept: Kept<'_>,
    grad: &Tensor,
) -> Result<[Option<Tensor>; 3]> {
    let Kept {
        x,
        z,
        a,
        bs,
        h,
        mask_bits,
    } = kept;
    let (a_dtype, b_dtype, scaling) = weights;
    let dev = grad.device().clone();
    crate::ops::profile::scope("lora.node.bwd", &dev, || {
        use crate::ops::profile::scope;
        let g = grad.contiguous()?;
        // On the GPU both from one read of g where the kernel serves, dB straight to B's dtype.
        #[cfg(feature = "cuda")]
        let fused = match wants.2 {
            true => {
                let to = kernel_out(b_dtype, g.dtype(), Some(scaling));
                match crate::lora::kernels::grad_hb(&g, bs, h, to)? {
                    Some((gh, db)) => Some((gh, from_kernel(db, to, b_dtype, Some(scaling))?)),
                    None => None,
                }
            }
            false => None,
        };
        #[cfg(not(feature = "cuda"))]
        let fused: Option<(Tensor, Tensor)> = None;
        let (gh, db) = match fused {
            Some((gh, db)) => (gh, Some(db)),
            None => {
                // d(dropout(z) A^T), [m, r].
                let gh = scope("lora.bwd.gh", &dev, || g.matmul(bs))?;
                let db = scope("lora.bwd.db", &dev, || {
                    wants
                        .2
                        .then(|| to_weight(g.t()?.matmul(h)?, b_dtype, Some(scaling)))
                        .transpose()
                })?;
                (gh, db)
            }
        };
        let da = scope("lora.bwd.da", &dev, || {
            wants
                .1
                .then(|| adapter_a_grad(x, z, input, &gh, dropout, a_dtype, mask_bits))
                .transpose()
        })?;
        let dx = if wants.0 {
            Some(input_grad(base, &g, &gh, a, dropout, input, x, mask_bits)?)
        } else {
            None
        };
        Ok([dx, da, db])
    })
}

/// `dA = gh^T dropout(z)`, `z = input(x)`, in A's dtype `weight`: the activation forward kept,
/// else computed from `x` (the kernel applies GELU as it reads `x`).
fn adapter_a_grad(
    x: &Tensor,
    z: Option<&Tensor>,
    input: Input,
    gh: &Tensor,
    dropout: Option<Dropout>,
    weight: candle_core::DType,
    mask_bits: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, input) = match z {
        Some(z) => (z, Input::AsIs),
        None => (x, input),
    };
    #[cfg(feature = "cuda")]
    if crate::lora::kernels::trains(x, gh.dim(1)?) && gh.dtype() == x.dtype() {
        let gelu = input == Input::GeluErf;
        let to = kernel_out(weight, x.dtype(), None);
        let gh = gh.contiguous()?;
        let da = crate::lora::kernels::train_da(x, &gh, mask(dropout), gelu, to, mask_bits)?;
        return from_kernel(da, to, weight, None);
    }
    let _ = mask_bits;
    to_weight(
        gh.t()?.matmul(&dropped(&input.apply(x)?, dropout)?)?,
        weight,
        None,
    )
}

/// The gradient with respect to the node's input `x`: the gradient with respect to `z`, the
/// base's `g W` plus the adapter's `dropout(gh A)`, through the input's activation. On a GPU
/// without an activation the adapter's term is added inside the base's product.
#[allow(clippy::too_many_arguments)] // the node's backward state, read once here
fn input_grad(
    base: &dyn BaseWeight,
    g: &Tensor,
    gh: &Tensor,
    a: &Tensor,
    dropout: Option<Dropout>,
    input: Input,
    x: &Tensor,
    mask_bits: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = x.device().clone();
    #[cfg(feature = "cuda")]
    {
        use crate::lora::kernels::{Factor, train_term, trains};
        if input == Input::AsIs && trains(g, a.dim(0)?) && gh.dtype() == a.dtype() {
            let f = Factor::RankByOut(&a.contiguous()?);
            let term = train_term(gh, f, mask(dropout), mask_bits)?;
            return crate::ops::profile::scope("lora.bwd.input", &dev, || {
                base.input_grad_plus(g, term)
            });
        }
    }
    let through_base = base.input_grad(g)?;
    #[cfg(feature = "cuda")]
    if crate::lora::kernels::trains(&through_base, a.dim(0)?) && gh.dtype() == a.dtype() {
        use crate::lora::kernels::{Factor, train_add};
        let gelu_input = match input {
            Input::AsIs => None,
            Input::GeluErf => Some(x.contiguous()?),
        };
        let a = a.contiguous()?;
        return crate::ops::profile::scope("lora.bwd.input", &dev, || {
            let f = Factor::RankByOut(&a);
            train_add(
                &through_base,
                gh,
                f,
                mask(dropout),
                gelu_input.as_ref(),
                mask_bits,
            )
        });
    }
    let _ = mask_bits;
    let dz = (through_base + dropped(&gh.matmul(a)?, dropout)?)?;
    crate::ops::profile::scope("lora.bwd.input", &dev, || input.backward(x, dz))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    use crate::quant::nf4::Nf4Options;
    use crate::quant::weight::tests::randn;
    use crate::quant::weight::{DenseWeight, Nf4Weight};

    /// The node's value equals the op-by-op sum exactly, and its gradients (x, A, B through the
    /// scaling) the op-by-op graph's, on an NF4 and a dense base, with and without dropout.
    #[test]
    fn the_node_equals_the_op_by_op_graph_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n, r) = (19, 64, 40, 4);
        let w = randn((n, k), 0.05, 1);
        let bases: Vec<Arc<dyn BaseWeight>> = vec![
            Arc::new(Nf4Weight::quantize(
                &w,
                Nf4Options::default(),
                DType::F32,
                &dev,
            )?),
            Arc::new(DenseWeight { weight: w.clone() }),
        ];
        let g = randn((m, n), 1.0, 5);
        for base in bases {
            let bias = randn((1, n), 0.5, 6).squeeze(0)?;
            for (dropout, input, bias) in [
                (None, Input::AsIs, None),
                (Some(Dropout { key: 11, p: 0.2 }), Input::AsIs, Some(&bias)),
                (Some(Dropout { key: 12, p: 0.1 }), Input::GeluErf, None),
            ] {
                let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
                    let x = Var::from_tensor(&randn((m, k), 1.0, 2))?;
                    let a = Var::from_tensor(&randn((r, k), 0.1, 3))?;
                    let b = Var::from_tensor(&randn((n, r), 0.1, 4))?;
                    let bs = (b.as_tensor() * 2.0)?;
                    let y = if fused {
                        let adapter = Adapter {
                            a: a.as_tensor(),
                            b: b.as_tensor(),
                            scaling: 2.0,
                        };
                        lora_linear(base.clone(), bias, &x, adapter, dropout, input)?
                    } else {
                        let z = input.apply(&x)?;
                        let zd = dropped(&z, dropout)?;
                        let y = base.forward(&z)?;
                        let y = match bias {
                            Some(b) => y.broadcast_add(b)?,
                            None => y,
                        };
                        (y + zd.matmul(&a.t()?)?.matmul(&bs.t()?)?)?
                    };
                    let grads = (&y * &g)?.sum_all()?.backward()?;
                    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                    Ok(vec![
                        flat(&y)?,
                        flat(grads.get(&x).expect("dx"))?,
                        flat(grads.get(&a).expect("dA"))?,
                        flat(grads.get(&b).expect("dB"))?,
                    ])
                };
                let (fused, plain) = (run(true)?, run(false)?);
                assert_eq!(fused[0], plain[0], "the value is the op-by-op sum's");
                for (what, (f, p)) in ["dx", "dA", "dB"]
                    .iter()
                    .zip(fused[1..].iter().zip(&plain[1..]))
                {
                    let worst = f
                        .iter()
                        .zip(p)
                        .map(|(f, p)| (f - p).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-5, "{what} ({dropout:?}, {input:?}): {worst}");
                }
            }
        }
        Ok(())
    }
}
