//! Frozen base weights in 4 bits: bitsandbytes-exact NF4 with double quantization, bitsandbytes'
//! tensor names and JSON, and quantizing whole checkpoints.

pub mod bnb;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod nf4;
pub mod quantize;
pub mod weight;
