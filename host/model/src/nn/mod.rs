//! The layers models are built of: [`linear::Linear`] (a frozen base weight plus an optional
//! LoRA adapter), norms and embeddings, activation checkpointing, and the [`causal_lm::CausalLm`]
//! trait generation, loss and training use.

pub mod causal_lm;
pub mod checkpoint;
pub mod layers;
pub mod linear;
