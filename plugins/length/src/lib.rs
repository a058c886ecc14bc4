//! `length`: a metric plugin that measures how long a prediction is, in words, and how that
//! compares with the reference. It is the Rust SDK's complete example, and the Rust third of
//! the polyglot check: `plugins/polyglot/python/app.py` (`length-py`) and
//! `plugins/polyglot/js/length.js` (`length-js`) implement the same metric and must give
//! bit-identical results for the same input.
//!
//! Scores, per sample:
//! - `length_words`: the number of words in the prediction;
//! - `length_ratio`: words(prediction) / words(reference), clipped to the `max_ratio` setting
//!   when it is set. A sample whose reference has no words gets the error
//!   `reference is empty`.
//!
//! Corpus statistic, per batch: `length_words_total`, the sum of `length_words` over the
//! samples that were scored (samples with an error do not count).
//!
//! A *word* is a maximal run of characters that are not one of the six ASCII whitespace
//! characters [`SEPARATORS`], ignoring U+FEFF (see [`IGNORED`]). Other Unicode whitespace
//! (no-break space, U+2003, ...) is part of a word. This definition is deliberately narrow:
//! Rust's `split_whitespace`, Python's `str.split()` and JavaScript's `\s` each use a different
//! Unicode whitespace set, and Rust's `split_ascii_whitespace` leaves out the vertical tab.
//!
//! Setting `max_ratio` (`--set length.max_ratio=2`): a non-negative decimal number
//! (`2`, `2.5`, `.5`, `1e3`, optionally with a leading `+`; no `inf`, `nan`, hex or `_`).
//! Anything else fails the whole batch with an error naming the setting.
//!
//! Build the component:
//!
//! ```text
//! rustup target add wasm32-wasip2   # once
//! cargo build --release --target wasm32-wasip2 -p adapterlab-plugin-length
//! # -> target/wasm32-wasip2/release/adapterlab_plugin_length.wasm
//! ```

use adapterlab_sdk::v0_1::metric::{
    BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec,
};
use adapterlab_sdk::v0_1::{Manifest, config, log};

/// The plugin's name: what users pass to `--metrics` and prefix settings with.
pub const NAME: &str = "length";
pub const VERSION: &str = "0.1.0";
pub const DESCRIPTION: &str = "Prediction length in words, and its ratio to the reference length";

/// The characters that separate words: space, tab, line feed, carriage return, vertical tab
/// and form feed. Every other character, including non-ASCII whitespace, belongs to a word.
pub const SEPARATORS: [char; 6] = [' ', '\t', '\n', '\r', '\x0b', '\x0c'];

/// Ignored when counting words, as if deleted first: U+FEFF, the byte-order mark (or zero-width
/// no-break space). The JavaScript runtime (componentize-js 0.23 / StarlingMonkey) drops a
/// leading U+FEFF from every string it receives from the host, so a JavaScript metric cannot
/// see it there; ignoring it everywhere keeps the three implementations identical.
pub const IGNORED: char = '\u{feff}';

/// The largest value either score can take, as declared in the score specs.
pub const SCORE_MAX: f64 = 1e9;

/// The number of words in `text`: maximal runs of characters outside [`SEPARATORS`] once
/// [`IGNORED`] is deleted, that is, runs with at least one character other than [`IGNORED`].
pub fn words(text: &str) -> usize {
    text.split(SEPARATORS)
        .filter(|run| run.chars().any(|c| c != IGNORED))
        .count()
}

/// Parse the `max_ratio` setting. [`IGNORED`] is deleted first, as in [`words`], and the error
/// message quotes the value without it. Accepted, after trimming [`SEPARATORS`] from both ends:
/// `+? (DIGITS [. DIGITS?] | . DIGITS) ([eE] [+-]? DIGITS)?`, finite. The grammar is strict on
/// purpose: each language's own float parser accepts a different superset (Python takes `1_0`
/// and `inf`, JavaScript takes `0x10` and the empty string), and all three plugins must agree.
pub fn parse_max_ratio(raw: &str) -> Result<f64, String> {
    let raw = raw.replace(IGNORED, "");
    let invalid = || format!("setting `max_ratio`: expected a non-negative number, got \"{raw}\"");
    let text = raw.trim_matches(SEPARATORS);
    if !is_plain_decimal(text) {
        return Err(invalid());
    }
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(value),
        _ => Err(invalid()),
    }
}

/// `+? (DIGITS [. DIGITS?] | . DIGITS) ([eE] [+-]? DIGITS)?`
fn is_plain_decimal(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if bytes.first() == Some(&b'+') {
        i += 1;
    }
    let mut mantissa = digits(&mut i);
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        mantissa += digits(&mut i);
    }
    if mantissa == 0 {
        return false;
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        if i < bytes.len() && (bytes[i] == b'+' || bytes[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == bytes.len()
}

/// Score a batch with the given `max_ratio`. Pure: no host calls, so it runs in native tests.
pub fn score_samples(samples: &[Sample], max_ratio: Option<f64>) -> BatchResult {
    let mut total = 0.0_f64;
    let results = samples
        .iter()
        .map(|sample| {
            let prediction_words = words(&sample.prediction);
            let reference_words = words(&sample.reference);
            if reference_words == 0 {
                return SampleResult::Error("reference is empty".to_string());
            }
            let mut ratio = prediction_words as f64 / reference_words as f64;
            if let Some(max) = max_ratio
                && ratio > max
            {
                ratio = max;
            }
            total += prediction_words as f64;
            SampleResult::Scores(vec![
                ("length_words".to_string(), prediction_words as f64),
                ("length_ratio".to_string(), ratio),
            ])
        })
        .collect();
    BatchResult {
        samples: results,
        corpus: vec![("length_words_total".to_string(), total)],
    }
}

pub struct Length;

impl Metric for Length {
    fn info() -> MetricInfo {
        MetricInfo {
            // `Manifest::new` asks for the `log` and `config` capabilities.
            manifest: Manifest::new(NAME, VERSION, DESCRIPTION),
            scores: vec![
                ScoreSpec::new(
                    "length_words",
                    "Words in the prediction (runs of non-whitespace, ASCII whitespace only)",
                    0.0,
                    SCORE_MAX,
                    false,
                ),
                ScoreSpec::new(
                    "length_ratio",
                    "Words in the prediction / words in the reference, clipped to max_ratio when set",
                    0.0,
                    SCORE_MAX,
                    false,
                ),
            ],
        }
    }

    // The whole batch, not `score_sample`: the setting is read once per batch and the batch
    // carries a corpus statistic.
    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        let max_ratio = config::get("max_ratio")
            .map(|raw| parse_max_ratio(&raw))
            .transpose()?;
        let result = score_samples(&samples, max_ratio);
        log::info(&format!("scored {} samples", samples.len()));
        Ok(result)
    }
}

// Exports `Length` as the component's `metric` interface. The macro exports only when
// compiling for wasm, so `cargo test` links this crate natively too.
adapterlab_sdk::export_metric_v0_1!(Length);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prediction: &str, reference: &str) -> Sample {
        Sample {
            id: "s".to_string(),
            prediction: prediction.to_string(),
            reference: reference.to_string(),
            source: None,
        }
    }

    fn scores(result: &SampleResult) -> (f64, f64) {
        match result {
            SampleResult::Scores(scores) => {
                assert_eq!(scores.len(), 2);
                assert_eq!(scores[0].0, "length_words");
                assert_eq!(scores[1].0, "length_ratio");
                (scores[0].1, scores[1].1)
            }
            SampleResult::Error(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn words_split_on_the_six_ascii_separators_only() {
        assert_eq!(words(""), 0);
        assert_eq!(words(" \t\n\r\x0b\x0c"), 0);
        assert_eq!(words("one"), 1);
        assert_eq!(words("  one two\tthree\nfour\r\nfive\x0bsix\x0cseven  "), 7);
        // Non-ASCII whitespace is part of a word.
        assert_eq!(words("a\u{a0}b"), 1);
        assert_eq!(words("a\u{2003}b \u{3000} c"), 3);
        assert_eq!(words("a\u{85}b\u{1c}c"), 1);
        assert_eq!(words("héllo wörld 日本語"), 3);
    }

    #[test]
    fn words_ignore_the_byte_order_mark() {
        assert_eq!(words("\u{feff}"), 0);
        assert_eq!(words("\u{feff}a"), 1);
        assert_eq!(words("\u{feff} a"), 1);
        assert_eq!(words("a \u{feff}\u{feff} b"), 2);
        assert_eq!(words("a\u{feff}b"), 1);
    }

    #[test]
    fn scores_words_and_ratio() {
        let batch = score_samples(&[sample("a b c", "a b"), sample("", "x y z w")], None);
        assert_eq!(scores(&batch.samples[0]), (3.0, 1.5));
        assert_eq!(scores(&batch.samples[1]), (0.0, 0.0));
        assert_eq!(batch.corpus, vec![("length_words_total".to_string(), 3.0)]);
    }

    #[test]
    fn ratio_is_plain_ieee_division() {
        let batch = score_samples(&[sample("a b", "a b c")], None);
        assert_eq!(
            scores(&batch.samples[0]).1.to_bits(),
            (2.0_f64 / 3.0).to_bits()
        );
    }

    #[test]
    fn empty_reference_is_a_sample_error_and_others_go_on() {
        let batch = score_samples(&[sample("a", " \n "), sample("a b", "c")], None);
        assert!(matches!(&batch.samples[0], SampleResult::Error(e) if e == "reference is empty"));
        assert_eq!(scores(&batch.samples[1]), (2.0, 2.0));
        // Only scored samples count towards the total.
        assert_eq!(batch.corpus[0].1, 2.0);
    }

    #[test]
    fn max_ratio_clips() {
        let batch = score_samples(&[sample("a b c d", "a"), sample("a", "a b")], Some(2.0));
        assert_eq!(scores(&batch.samples[0]), (4.0, 2.0));
        assert_eq!(scores(&batch.samples[1]), (1.0, 0.5));
    }

    #[test]
    fn empty_batch() {
        let batch = score_samples(&[], None);
        assert!(batch.samples.is_empty());
        assert_eq!(batch.corpus, vec![("length_words_total".to_string(), 0.0)]);
    }

    #[test]
    fn max_ratio_grammar() {
        for (raw, value) in [
            ("2", 2.0),
            (" 2.5\n", 2.5),
            ("+3", 3.0),
            (".5", 0.5),
            ("5.", 5.0),
            ("1e3", 1000.0),
            ("1E-2", 0.01),
            ("0", 0.0),
            ("1e-400", 0.0),
            ("\u{feff}2", 2.0),
        ] {
            assert_eq!(parse_max_ratio(raw), Ok(value), "{raw:?}");
        }
        for raw in [
            "", " ", "-1", "-0", "inf", "NaN", "infinity", "0x10", "1_0", ".", "e5", "1e", "1e+",
            "2 3", "1e400", "\u{a0}2",
        ] {
            let err = parse_max_ratio(raw).unwrap_err();
            assert_eq!(
                err,
                format!("setting `max_ratio`: expected a non-negative number, got \"{raw}\"")
            );
        }
        assert_eq!(
            parse_max_ratio("\u{feff}x").unwrap_err(),
            "setting `max_ratio`: expected a non-negative number, got \"x\""
        );
    }

    #[test]
    fn info_declares_both_scores() {
        let info = Length::info();
        assert_eq!(info.manifest.name, "length");
        assert_eq!(info.manifest.version, "0.1.0");
        let names: Vec<_> = info.scores.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["length_words", "length_ratio"]);
        assert!(
            info.scores
                .iter()
                .all(|s| s.min == 0.0 && s.max == 1e9 && !s.higher_is_better)
        );
    }
}
