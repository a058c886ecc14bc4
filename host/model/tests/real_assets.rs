//! Checks on the real default models, run only where they are already cached (so CI without the
//! assets stays fast and offline): SmolLM2 must summarise a short dialogue sensibly, MiniLM must
//! tell a paraphrase from an unrelated sentence. The assets folder is
//! `$ADAPTERLAB_DATA_DIR/assets`, else `~/.local/share/adapterlab/assets`; fill it with
//! `cargo run -p adapterlab-model --example smollm2_summary -- ASSETS_DIR`.

use std::path::PathBuf;

use adapterlab_model::engine::generate::Decoding;
use adapterlab_model::engine::{Engine, GenerateOptions};
use adapterlab_model::io::assets::{MINILM, SMOLLM2};
use adapterlab_model::models::bert::{Bert, embed, prepare_tokenizer};

fn assets_dir() -> PathBuf {
    match std::env::var_os("ADAPTERLAB_DATA_DIR") {
        Some(d) => PathBuf::from(d).join("assets"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".local/share/adapterlab/assets"),
    }
}

#[test]
fn smollm2_summarises_a_dialogue() {
    let assets = assets_dir();
    if !SMOLLM2.is_cached(&assets) {
        eprintln!(
            "SmolLM2 is not cached in {}; skipping the real-model check",
            assets.display()
        );
        return;
    }
    let dialogue = "#Person1#: Hi Tom, are you coming to the team lunch on Friday?\n#Person2#: I can't, I have a dentist appointment at noon. Could you save me some cake?\n#Person1#: Sure, I'll bring you a slice on Monday.";
    let opts = GenerateOptions {
        chat: true,
        decoding: Decoding::Greedy,
        repetition_penalty: 1.0,
        max_new_tokens: 40,
        ..GenerateOptions::reference(
            "smollm2",
            vec![format!(
                "Summarize this dialogue in one sentence.\n\n{dialogue}"
            )],
            Engine::cpu(&assets),
        )
    };
    let loaded =
        adapterlab_model::engine::load_model("smollm2", None, Default::default(), &opts.runtime)
            .unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    // The GGUF-built tokenizer: special tokens whole, digits one by one, lossless round trip.
    let enc = tok
        .encode(
            "<|im_start|>user\nIn 2024, it's 12 o'clock.<|im_end|>",
            false,
        )
        .unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);
    let digits = tok.encode("2024", false).unwrap();
    assert_eq!(digits.get_ids().len(), 4, "{:?}", digits.get_tokens());
    assert_eq!(
        tok.decode(enc.get_ids(), false).unwrap(),
        "<|im_start|>user\nIn 2024, it's 12 o'clock.<|im_end|>"
    );
    let g = adapterlab_model::engine::generate_with(&loaded, &opts)
        .unwrap()
        .remove(0);
    let text = g.text.to_lowercase();
    eprintln!("SmolLM2: {}", g.text);
    assert!(!text.trim().is_empty());
    assert!(
        ["tom", "lunch", "dentist", "cake"]
            .iter()
            .filter(|w| text.contains(*w))
            .count()
            >= 2,
        "{}",
        g.text
    );
}

#[test]
fn minilm_tells_paraphrase_from_unrelated() {
    let assets = assets_dir();
    if !MINILM.is_cached(&assets) {
        eprintln!(
            "MiniLM is not cached in {}; skipping the real-model check",
            assets.display()
        );
        return;
    }
    let dir = MINILM.dir(&assets);
    let model = Bert::load_dir(&dir, &candle_core::Device::Cpu).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let tok = prepare_tokenizer(tok, 512).unwrap();
    let texts: Vec<String> = [
        "A man is playing a guitar.",
        "A person plays the guitar.",
        "The stock market fell sharply today.",
    ]
    .map(String::from)
    .to_vec();
    let e = embed(&model, &tok, &texts, 6, 8).unwrap();
    assert_eq!(e[0].tokens.first().map(String::as_str), Some("[CLS]"));
    assert!(e[0].special[0] && *e[0].special.last().unwrap() && !e[0].special[1]);
    let mean = |v: &Vec<Vec<f32>>| -> Vec<f32> {
        (0..v[0].len())
            .map(|j| v.iter().map(|r| r[j]).sum::<f32>() / v.len() as f32)
            .collect()
    };
    let cos = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
            / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
                * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    let m: Vec<Vec<f32>> = e.iter().map(|t| mean(&t.vectors)).collect();
    let (para, unrelated) = (cos(&m[0], &m[1]), cos(&m[0], &m[2]));
    eprintln!("MiniLM cos paraphrase {para:.3}, unrelated {unrelated:.3}");
    assert!(para > 0.7 && unrelated < 0.3, "{para} {unrelated}");
}

/// Our dequantized, unpermuted HF-layout SmolLM2 against candle's own quantized llama on the same
/// GGUF (which keeps llama.cpp's layout and interleaved rotary): the same next-token choice and
/// near-identical logits, which checks the Q/K unpermutation and the renaming on the real file.
#[test]
fn smollm2_gguf_agrees_with_candle_quantized_llama() {
    use adapterlab_model::CausalLm;
    use candle_core::{Device, Tensor};

    let assets = assets_dir();
    let path = SMOLLM2
        .dir(&assets)
        .join(adapterlab_model::io::assets::SMOLLM2_GGUF);
    if !path.is_file() {
        eprintln!("{} is not cached; skipping", path.display());
        return;
    }
    let ours = adapterlab_model::models::gguf::load(
        &path,
        candle_core::DType::F32,
        &Device::Cpu,
        &Default::default(),
    )
    .unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut theirs = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let tok = ours.tokenizer.as_ref().unwrap();
    let ids = tok
        .encode(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    let x = Tensor::new(ids.get_ids(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = ours
        .model
        .forward_last(&x, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = theirs
        .forward(&x, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    let (ma, mb) = (
        a.iter().sum::<f32>() / a.len() as f32,
        b.iter().sum::<f32>() / b.len() as f32,
    );
    let cov: f32 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let corr = cov
        / (a.iter().map(|x| (x - ma).powi(2)).sum::<f32>().sqrt()
            * b.iter().map(|y| (y - mb).powi(2)).sum::<f32>().sqrt());
    eprintln!(
        "argmax ours {} theirs {}, correlation {corr:.5}",
        argmax(&a),
        argmax(&b)
    );
    assert_eq!(argmax(&a), argmax(&b));
    assert!(corr > 0.99, "{corr}");
}

/// Eval loss on the real model: a fitting completion costs less than a scrambled one.
#[test]
fn smollm2_loss_prefers_the_fitting_completion() {
    use adapterlab_model::engine::loss::Row;
    use adapterlab_model::engine::{EvalLossOptions, eval_loss_with, load_model};

    let assets = assets_dir();
    if !SMOLLM2.is_cached(&assets) {
        eprintln!("SmolLM2 is not cached in {}; skipping", assets.display());
        return;
    }
    let rt = Engine::cpu(&assets);
    let loaded = load_model("smollm2", None, Default::default(), &rt).unwrap();
    let row = |completion: &str| -> Row {
        serde_json::from_value(serde_json::json!({
            "prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            "completion": completion,
        }))
        .unwrap()
    };
    let opts = |rows| EvalLossOptions {
        model: "smollm2".into(),
        adapter: None,
        rows,
        completion_only: true,
        max_length: Some(1024),
        batch_size: 2,
        quantize: Default::default(),
        runtime: rt.clone(),
    };
    let good = eval_loss_with(
        &loaded,
        &opts(vec![row("The capital of France is Paris.")]),
        None,
    )
    .unwrap();
    let bad = eval_loss_with(
        &loaded,
        &opts(vec![row("Paris France capital the of is.")]),
        None,
    )
    .unwrap();
    eprintln!(
        "loss fitting {:.3} over {} tokens, scrambled {:.3}",
        good.loss, good.tokens, bad.loss
    );
    assert!(good.loss < bad.loss && good.loss < 2.0, "{good:?} {bad:?}");
    // The EOS (<|im_end|>) is appended as TRL does and counted.
    assert_eq!(good.tokens, 8);
}
