//! Numeric operations with hand-written backward passes or CUDA kernels: attention (KV cache,
//! masks, rotary, ALiBi, decoding's fused head split), the masked softmax, GELU, layer norm's
//! backward, seeded dropout, cross-entropy, and the machinery they share (the handover of a
//! backward pass to candle, profiling, the speed switches read from the environment).

pub mod argmax;
pub mod attention;
pub mod cross_entropy;
pub mod decode_attention;
pub mod dropout;
pub mod epilogue;
pub mod flash;
pub mod gelu;
#[cfg(feature = "cuda")]
pub mod gemm;
pub(crate) mod handover;
pub mod heads;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod layer_norm;
#[cfg(feature = "cuda")]
pub mod pdl;
pub mod profile;
pub mod residual;
pub mod rope_append;
pub mod rows;
pub mod softmax;
pub mod switch;

/// This wing's kernel modules: the generic ops', flash attention's and decoding attention's,
/// for [`crate::engine::device::compile_kernels`].
#[cfg(feature = "cuda")]
pub fn kernel_modules() -> Vec<&'static kernels::CudaModule> {
    kernels::modules()
        .into_iter()
        .chain(flash::cuda_modules())
        .chain([
            argmax::cuda_module(),
            residual::cuda_module(),
            heads::cuda_module(),
            rows::cuda_module(),
        ])
        .chain(decode_attention::cuda_modules().all())
        .chain(rope_append::cuda_modules().all())
        .chain(layer_norm::cuda_modules().all())
        .collect()
}
