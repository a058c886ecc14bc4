//! What a product's kernel may do to its output before storing it, with the op-by-op path
//! that gives the same bits: the NF4 decoding kernels (`quant::kernels::gemv_with`) apply it
//! in their epilogue, one launch where the op would take another, and every other path applies
//! it after the product ([`Epilogue::apply`]). The golden test
//! `nf4_gemv_with_lora_equals_the_two_step_path` holds the two to the same bits.

use candle_core::{Result, Tensor};

/// An op on a product's output `y`.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// `y` as it is.
    None,
    /// `gelu_erf(y)`: an MLP's activation after its up projection ([`crate::ops::gelu`]).
    Gelu,
    /// `x + (y + b)`: a parallel decoder layer's residual after its MLP's down projection, `b`
    /// the attention's output ([`crate::ops::residual::add3`]), `x` and `b` of `y`'s shape.
    Residual { x: &'a Tensor, b: &'a Tensor },
}

impl Epilogue<'_> {
    /// The op applied to `y` by its own op.
    pub fn apply(&self, y: Tensor) -> Result<Tensor> {
        match self {
            Epilogue::None => Ok(y),
            Epilogue::Gelu => crate::ops::gelu::gelu_erf(&y),
            Epilogue::Residual { x, b } => crate::ops::residual::add3(x, &y, b),
        }
    }

    /// Whether a decoding kernel may apply it, by its speed switch (`ADAPTERLAB_DECODE_GELU`,
    /// `ADAPTERLAB_DECODE_RESIDUAL`) and, for the residual, whether its inputs are what the
    /// kernel reads (contiguous, one dtype) and outside any graph (the kernel's output has none).
    pub fn fusable(&self) -> Result<bool> {
        Ok(match self {
            Epilogue::None => true,
            Epilogue::Gelu => crate::ops::gelu::fused_in_product()?,
            Epilogue::Residual { x, b } => {
                crate::ops::residual::fused_in_product()?
                    && [x, b].iter().all(|t| t.is_contiguous() && !t.track_op())
                    && x.dtype() == b.dtype()
                    && x.dims() == b.dims()
            }
        })
    }

    /// The decoding kernels' code for it (nf4_mma.cu's `act`).
    pub fn code(&self) -> i32 {
        match self {
            Epilogue::None => 0,
            Epilogue::Gelu => 1,
            Epilogue::Residual { .. } => 2,
        }
    }
}
