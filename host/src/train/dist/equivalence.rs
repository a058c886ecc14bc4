//! The data-parallel trainer's defining property, checked on the CPU with the in-process
//! communicator: N ranks with 1/N of each step's batch reach bit for bit the adapter of one
//! rank with the whole batch, across a resume too, with the same or another world size.
//!
//! What makes it exact, and so what is compared: every micro-batch's gradient is the same
//! computation wherever it runs (same rows, same weights, dropout keyed by the micro-batch's
//! place in the global order), scaled by the whole step's target count (known to every rank);
//! a rank sums its micro-batches' gradients in order, and the all-reduce adds the ranks' sums
//! in rank order. The one-rank reference does the same additions: `sum_in_groups = N` sums
//! its window in N groups, then adds the groups in order. Against a plain one-rank run (one
//! running sum) the only difference is float rounding of that grouping, checked to be tiny.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::train::dist::local::InProcess;
use crate::train::{TrainConfig, TrainEnv, TrainOutcome};

/// The llama_tiny fixture with a character-level tokenizer (as tests/e2e/train.rs makes it).
pub(crate) fn tiny_model(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/bnb/llama_tiny");
    let out = dir.join("tiny-llama");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 1024.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, tok) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(tok.to_string(), i.into());
    }
    for (i, c) in std::iter::once('\n')
        .chain((32u8..127).map(char::from))
        .enumerate()
    {
        vocab.insert(c.to_string(), (i + 3).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                          "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(out.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    out
}

/// 26 rows: with 2 rows a micro-batch, 13 micro-batches an epoch, so the last step of each
/// epoch is partial and some ranks get fewer micro-batches, or none.
pub(crate) fn dataset(dir: &Path) -> PathBuf {
    let out = dir.join("ds");
    std::fs::create_dir_all(&out).unwrap();
    let words = ["cat", "dog", "sun", "tree", "rain", "blue", "fish", "star"];
    let rows: String = (0..26)
        .map(|i| {
            let (w, v) = (words[i % 8], words[(i * 3 + 1) % 8]);
            let echo = " w".repeat(i % 4).replace('w', w);
            serde_json::json!({"prompt": format!("{v} {w} {v}. Echo {w}:"), "completion": format!("{echo} {w}")})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(out.join("train.jsonl"), rows).unwrap();
    out
}

struct Setup {
    model: PathBuf,
    data: PathBuf,
    root: PathBuf,
}

impl Setup {
    fn config(&self, out: &str, accum: usize) -> TrainConfig {
        let settings: Vec<String> = [
            format!("model_name_or_path={}", self.model.display()),
            format!("dataset={}", self.data.display()),
            format!("output_dir={}", self.root.join(out).display()),
            "max_steps=6".into(),
            "per_device_train_batch_size=2".into(),
            format!("gradient_accumulation_steps={accum}"),
            "learning_rate=0.01".into(),
            "warmup_ratio=0.1".into(),
            "logging_steps=1".into(),
            "save_steps=3".into(),
            "eval_strategy=no".into(),
            "max_seq_length=64".into(),
            "lora.r=4".into(),
            "lora.lora_alpha=8".into(),
            "lora.lora_dropout=0.1".into(),
            "max_grad_norm=0.5".into(),
        ]
        .into();
        TrainConfig::load(None, &settings).unwrap()
    }

    /// One process: `accum` micro-batches a step, summed in `groups` groups.
    fn single(&self, out: &str, accum: usize, groups: usize, env: TrainEnv) -> TrainOutcome {
        crate::train::run(
            &self.config(out, accum),
            &TrainEnv {
                sum_in_groups: groups,
                ..env
            },
        )
        .unwrap()
    }

    /// `world` ranks in threads, `accum` micro-batches each a step; rank 0's outcome.
    fn ranks(&self, out: &str, world: usize, accum: usize, env: TrainEnv) -> TrainOutcome {
        let config = self.config(out, accum);
        let mut outcomes: Vec<TrainOutcome> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::group(world)
                .into_iter()
                .map(|comm| {
                    let env = TrainEnv {
                        comm: Some(Arc::new(comm)),
                        ..env.clone()
                    };
                    let config = &config;
                    s.spawn(move || crate::train::run(config, &env))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        outcomes.swap_remove(0)
    }

    fn adapter(&self, out: &str) -> Vec<(String, Vec<u32>)> {
        let file = self.root.join(out).join("adapter_model.safetensors");
        let mut tensors: Vec<(String, Vec<u32>)> =
            candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(k, t)| {
                    let bits = t
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect();
                    (k, bits)
                })
                .collect();
        tensors.sort();
        tensors
    }
}

fn losses(o: &TrainOutcome) -> Vec<f64> {
    o.log_history
        .iter()
        .filter_map(|e| e.get("loss")?.as_f64())
        .collect()
}

fn assert_same_adapter(s: &Setup, a: &str, b: &str) {
    let (x, y) = (s.adapter(a), s.adapter(b));
    assert_eq!(x.len(), y.len());
    for ((name, xa), (_, ya)) in x.iter().zip(&y) {
        let differ = xa.iter().zip(ya).filter(|(p, q)| p != q).count();
        assert_eq!(differ, 0, "{a} and {b}: {differ} values of {name} differ");
    }
}

fn assert_close_losses(a: &TrainOutcome, b: &TrainOutcome) {
    let (x, y) = (losses(a), losses(b));
    assert_eq!(x.len(), y.len());
    for (p, q) in x.iter().zip(&y) {
        // Logged losses are rounded to 4 places; the rank sums travel as f32.
        assert!((p - q).abs() <= 1e-4, "{x:?} vs {y:?}");
    }
}

fn setup() -> (tempfile::TempDir, Setup) {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup {
        model: tiny_model(dir.path()),
        data: dataset(dir.path()),
        root: dir.path().to_path_buf(),
    };
    (dir, s)
}

#[test]
fn n_ranks_reach_the_one_rank_adapter_bit_for_bit() {
    let (_dir, s) = setup();
    // Six micro-batches a step: 2 ranks × 3, 3 ranks × 2, 1 rank × 6.
    let one_g2 = s.single("one-g2", 6, 2, TrainEnv::default());
    let one_g3 = s.single("one-g3", 6, 3, TrainEnv::default());
    let two = s.ranks("two", 2, 3, TrainEnv::default());
    let three = s.ranks("three", 3, 2, TrainEnv::default());
    assert_eq!(two.global_step, 6);
    assert_same_adapter(&s, "one-g2", "two");
    assert_same_adapter(&s, "one-g3", "three");
    assert_close_losses(&one_g2, &two);
    assert_close_losses(&one_g3, &three);
    // Only rank 0 wrote: one adapter, one set of checkpoints, no temporaries.
    let names: Vec<String> = std::fs::read_dir(s.root.join("three"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"checkpoint-3".to_string())
            && names.contains(&"trainer_state.json".to_string())
            && !names.iter().any(|n| n.starts_with('.')),
        "{names:?}"
    );

    // A plain one-rank run with the same global batch differs only by the grouping's rounding.
    let plain = s.single("plain", 6, 1, TrainEnv::default());
    assert_close_losses(&plain, &two);
    let (p, t) = (s.adapter("plain"), s.adapter("two"));
    let differ: usize = p
        .iter()
        .zip(&t)
        .map(|((_, a), (_, b))| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .sum();
    // The grouping is what the bit-for-bit comparisons control: without it the bits differ.
    assert!(
        differ > 0,
        "a plain run equals the grouped one: the test shows nothing"
    );
    for ((name, a), (_, b)) in p.iter().zip(&t) {
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
            assert!((x - y).abs() <= 1e-4 + 1e-3 * x.abs(), "{name}: {x} vs {y}");
        }
    }
}

#[test]
fn a_resume_with_the_same_or_another_world_size_stays_exact() {
    let (_dir, s) = setup();
    let stop = |n| TrainEnv {
        stop_after_steps: Some(n),
        ..Default::default()
    };
    let resume = || TrainEnv {
        resume_from_checkpoint: Some("latest".into()),
        ..Default::default()
    };
    // 2 ranks, stopped at the checkpoint of step 3, resumed with 2 ranks: as the straight
    // one-rank reference.
    s.single("ref-g2", 6, 2, TrainEnv::default());
    let first = s.ranks("two-two", 2, 3, stop(3));
    assert!(first.stopped_early && first.adapter_dir.is_none());
    s.ranks("two-two", 2, 3, resume());
    assert_same_adapter(&s, "ref-g2", "two-two");

    // 2 ranks × 3, resumed as 3 ranks × 2: the same six micro-batches a step, so the same data
    // order; the reference groups its sums in 2, then in 3.
    s.single("ref-g2-g3", 6, 2, stop(3));
    s.single("ref-g2-g3", 6, 3, resume());
    s.ranks("two-three", 2, 3, stop(3));
    s.ranks("two-three", 3, 2, resume());
    assert_same_adapter(&s, "ref-g2-g3", "two-three");
}
