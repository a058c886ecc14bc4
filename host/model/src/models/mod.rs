//! The models, block for block as transformers' modules (Falcon, the Llama family, BERT), each
//! with the `Config` that deserialises its `config.json`; weight paths equal HF tensor names.
//! Also what turns files into a model: checkpoint folders, GGUF, chat templates.

pub mod architecture;
pub mod bert;
pub mod chat;
pub mod config;
pub mod falcon;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod params;
