//! The `bertscore` metric plugin: BERTScore (Zhang et al., 2020) as bert-score 0.3.13
//! computes it, over contextual token embeddings from the host's encoder (capability
//! `embed`).
//!
//! Per sample: `bertscore_precision`, `bertscore_recall`, `bertscore_f1`. Settings: `model`,
//! `layer` (which encoder and hidden layer; the host's default otherwise), `idf` (default
//! false: idf weights computed from the batch's references), `baseline=P,R,F` or
//! `rescale_with_baseline=true` (see [`settings`]). The encoder's name and layer are logged
//! once per batch; it has no corpus scores. Several references score as bert-score's
//! `score(cands, [[refs...]])`: each (prediction, reference) pair is scored (idf, when on,
//! from every reference of the batch), then precision, recall and F1 each take their highest
//! value over the references, independently (`all_preds[beg:end].max(dim=0)`).

pub mod math;
pub mod settings;

use adapterlab_sdk::metric::embed::{self, TokenEmbeddings};
use adapterlab_sdk::metric::{BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec};
use adapterlab_sdk::{Capability, Manifest, log};

use crate::math::{Embedded, Idf, Prf};
use crate::settings::Settings;

/// Hash maps with a fixed-key hasher. std's default `RandomState` seeds itself from the
/// system, which on wasm32-wasip2 makes the component import `wasi:random/insecure-seed`; a
/// metric needs no randomness, and its texts are no hash-flooding threat.
pub(crate) type Map<K, V> = adapterlab_sdk::hash::FastMap<K, V>;

/// A hash set with the same fixed-key hasher as [`Map`].
pub(crate) type Set<T> = adapterlab_sdk::hash::FastSet<T>;

pub const SCORE_NAMES: [&str; 3] = ["bertscore_precision", "bertscore_recall", "bertscore_f1"];

pub struct BertScore;

/// One text's embeddings, or why the host could not give them.
pub type Embedding = Result<TokenEmbeddings, String>;

/// One text's embeddings once checked for consistent lengths, or why they are unusable.
type Checked<'a> = Result<&'a TokenEmbeddings, String>;

impl Metric for BertScore {
    fn info() -> MetricInfo {
        // Cosine similarities lie in [-1, 1], and so do P, R and F1; a rescaled score falls
        // below -1 only when the raw one is below 2b - 1, far under what encoders give.
        let spec =
            |name: &str, description: &str| ScoreSpec::new(name, description, -1.0, 1.0, true);
        MetricInfo {
            manifest: Manifest::new(
                "bertscore",
                env!("CARGO_PKG_VERSION"),
                "BERTScore precision/recall/F1 over the host encoder's token embeddings (bert-score 0.3.13)",
            )
            .with_capability(Capability::Embed),
            scores: vec![
                spec("bertscore_precision", "BERTScore precision: prediction tokens' best cosine match"),
                spec("bertscore_recall", "BERTScore recall: reference tokens' best cosine match"),
                spec("bertscore_f1", "BERTScore F1 of precision and recall"),
            ],
            // With `idf` a sample's scores depend on its batch's references.
            independent_samples: false,
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        // Settings and the encoder concern the whole batch: a problem with them fails it.
        let settings = Settings::from_config()?;
        let encoder = embed::info(settings.model.as_deref(), settings.layer)
            .map_err(|e| format!("embed: {e}"))?;
        let baseline = settings.resolve_baseline(&encoder.model, encoder.layer)?;
        log::info(&format!(
            "bertscore: encoder `{}` layer {} (width {}), idf {}, baseline {}",
            encoder.model,
            encoder.layer,
            encoder.dim,
            if settings.idf { "on" } else { "off" },
            baseline.map_or("none".to_string(), |b| format!(
                "{},{},{}",
                b[0], b[1], b[2]
            )),
        ));

        // Each distinct text is embedded once.
        let mut index: Map<&str, usize> = Map::default();
        let mut texts: Vec<String> = Vec::new();
        for text in samples
            .iter()
            .flat_map(|s| std::iter::once(&s.prediction).chain(&s.references))
            .map(String::as_str)
        {
            index.entry(text).or_insert_with(|| {
                texts.push(text.to_string());
                texts.len() - 1
            });
        }
        let embedded = embed_all(&settings, &texts);
        let groups: Vec<(&Embedding, Vec<&Embedding>)> = samples
            .iter()
            .map(|s| {
                (
                    &embedded[index[s.prediction.as_str()]],
                    s.references
                        .iter()
                        .map(|r| &embedded[index[r.as_str()]])
                        .collect(),
                )
            })
            .collect();
        let options = Options {
            dim: encoder.dim as usize,
            idf: settings.idf,
            baseline,
        };
        Ok(BatchResult {
            samples: score_multi(&groups, &options),
            statistics: Vec::new(),
        })
    }
}

/// Embeds `texts` in one call; if that call fails, one text at a time, so that a text the
/// encoder cannot take fails only the samples that use it.
fn embed_all(settings: &Settings, texts: &[String]) -> Vec<Embedding> {
    let (model, layer) = (settings.model.as_deref(), settings.layer);
    match embed::embed(model, layer, texts) {
        Ok(all) if all.len() == texts.len() => return all.into_iter().map(Ok).collect(),
        Ok(all) => log::warn(&format!(
            "bertscore: embed returned {} results for {} texts; embedding one at a time",
            all.len(),
            texts.len()
        )),
        Err(e) => log::warn(&format!(
            "bertscore: embedding the batch failed ({e}); embedding one at a time"
        )),
    }
    texts
        .iter()
        .map(
            |text| match embed::embed(model, layer, std::slice::from_ref(text)) {
                Ok(mut one) if one.len() == 1 => Ok(one.remove(0)),
                Ok(one) => Err(format!("embed returned {} results for one text", one.len())),
                Err(e) => Err(format!("embed: {e}")),
            },
        )
        .collect()
}

/// How to score a batch once its texts are embedded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Width of each token vector, from `embed::info`.
    pub dim: usize,
    pub idf: bool,
    pub baseline: Option<[f64; 3]>,
}

/// Scores embedded (prediction, reference) pairs, without touching the host. With idf, the
/// idf table comes from every reference in the batch that embedded correctly.
pub fn score_pairs(pairs: &[(&Embedding, &Embedding)], options: &Options) -> Vec<SampleResult> {
    let checked: Vec<(Checked, Checked)> = pairs
        .iter()
        .map(|(p, r)| {
            (
                check(p, options.dim, "prediction"),
                check(r, options.dim, "reference"),
            )
        })
        .collect();
    let idf = options.idf.then(|| {
        Idf::from_references(
            checked
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok())
                .map(|r| r.ids.as_slice()),
        )
    });

    checked
        .iter()
        .map(|(prediction, reference)| {
            let (prediction, reference) = match (prediction, reference) {
                (Ok(p), Ok(r)) => (*p, *r),
                (Err(e), _) | (_, Err(e)) => return SampleResult::Error(e.clone()),
            };
            match score_pair(prediction, reference, idf.as_ref(), options) {
                Ok(prf) => SampleResult::Scores(
                    SCORE_NAMES
                        .iter()
                        .map(|n| n.to_string())
                        .zip([prf.precision, prf.recall, prf.f1])
                        .collect(),
                ),
                Err(e) => SampleResult::Error(e),
            }
        })
        .collect()
}

/// Scores each prediction against its references as bert-score does with reference groups:
/// every pair scored in one batch (so idf covers every reference), then the highest
/// precision, recall and F1 over a sample's references, each on its own. A sample with a
/// pair that cannot be scored fails, naming the reference.
pub fn score_multi(
    groups: &[(&Embedding, Vec<&Embedding>)],
    options: &Options,
) -> Vec<SampleResult> {
    let pairs: Vec<(&Embedding, &Embedding)> = groups
        .iter()
        .flat_map(|(p, refs)| refs.iter().map(move |r| (*p, *r)))
        .collect();
    let mut results = score_pairs(&pairs, options).into_iter();
    groups
        .iter()
        .map(|(_, refs)| {
            let mut best: Option<SampleResult> = None;
            for k in 0..refs.len() {
                let result = results.next().expect("one result per pair");
                best = Some(match (best, result) {
                    (Some(SampleResult::Error(e)), _) => SampleResult::Error(e),
                    (_, SampleResult::Error(e)) if refs.len() > 1 => {
                        SampleResult::Error(format!("reference {}: {e}", k + 1))
                    }
                    (_, SampleResult::Error(e)) => SampleResult::Error(e),
                    (None, r) => r,
                    (Some(SampleResult::Scores(mut b)), SampleResult::Scores(s)) => {
                        for ((_, bv), (_, v)) in b.iter_mut().zip(s) {
                            if v > *bv {
                                *bv = v;
                            }
                        }
                        SampleResult::Scores(b)
                    }
                });
            }
            best.unwrap_or_else(|| SampleResult::Error("the sample has no reference".into()))
        })
        .collect()
}

fn score_pair(
    prediction: &TokenEmbeddings,
    reference: &TokenEmbeddings,
    idf: Option<&Idf>,
    options: &Options,
) -> Result<Prf, String> {
    let weights = |e: &TokenEmbeddings| -> Vec<f64> {
        match idf {
            Some(idf) => e.ids.iter().map(|&id| idf.weight(id)).collect(),
            None => vec![1.0; e.ids.len()],
        }
    };
    let (wp, wr) = (weights(prediction), weights(reference));
    let p = Embedded {
        vectors: &prediction.vectors,
        special: &prediction.special,
        weights: &wp,
    };
    let r = Embedded {
        vectors: &reference.vectors,
        special: &reference.special,
        weights: &wr,
    };
    let prf = math::greedy_cos_idf(&p, &r, options.dim).map_err(|e| e.to_string())?;
    let prf = match options.baseline {
        Some(b) => math::rescale(prf, b),
        None => prf,
    };
    if [prf.precision, prf.recall, prf.f1]
        .iter()
        .all(|x| x.is_finite())
    {
        return Ok(prf);
    }
    // bert-score would return NaN here; a score must be a number, so say why there is none.
    Err(format!(
        "BERTScore is undefined for this pair (precision {}, recall {}, F1 {}): a text's token \
         weights sum to zero (with idf: all its tokens occur in every reference) or a token \
         vector is zero",
        prf.precision, prf.recall, prf.f1
    ))
}

/// The embedding of one text, if it came back and its parts agree in length.
fn check<'a>(e: &'a Embedding, dim: usize, side: &str) -> Checked<'a> {
    let e = e.as_ref().map_err(|err| format!("{side}: {err}"))?;
    let n = e.tokens.len();
    if e.ids.len() != n || e.special.len() != n || e.vectors.len() != n.saturating_mul(dim) {
        return Err(format!(
            "{side}: the encoder returned {n} tokens, {} ids, {} special flags and {} values for width {dim}",
            e.ids.len(),
            e.special.len(),
            e.vectors.len()
        ));
    }
    Ok(e)
}

adapterlab_sdk::export_metric!(BertScore);

#[cfg(test)]
mod tests {
    use adapterlab_sdk::metric::SampleResult;
    use adapterlab_sdk::metric::embed::TokenEmbeddings;

    use crate::{Embedding, Options, score_multi, score_pairs};

    /// A [CLS] w... [SEP] text with 2-wide vectors; content token `k` has id `k` and vector (1, k).
    fn text(content: &[u32]) -> Embedding {
        let ids: Vec<u32> = [101]
            .into_iter()
            .chain(content.iter().copied())
            .chain([102])
            .collect();
        let special = ids.iter().map(|&id| id >= 101).collect();
        let vectors = ids
            .iter()
            .flat_map(|&id| {
                if id >= 101 {
                    [0.0, 1.0]
                } else {
                    [1.0, id as f32]
                }
            })
            .collect();
        Ok(TokenEmbeddings {
            tokens: ids.iter().map(|i| i.to_string()).collect(),
            ids,
            special,
            vectors,
        })
    }

    fn scores(result: &SampleResult) -> Vec<f64> {
        match result {
            SampleResult::Scores(s) => s.iter().map(|(_, v)| *v).collect(),
            SampleResult::Error(e) => panic!("expected scores, got error {e}"),
        }
    }

    const PLAIN: Options = Options {
        dim: 2,
        idf: false,
        baseline: None,
    };

    #[test]
    fn identical_texts_score_one_and_rescale() {
        let a = text(&[1, 2, 3]);
        let r = score_pairs(&[(&a, &a)], &PLAIN);
        assert!(
            scores(&r[0]).iter().all(|v| (v - 1.0).abs() < 1e-12),
            "{r:?}"
        );
        let rescaled = Options {
            baseline: Some([0.5, 0.5, 0.5]),
            ..PLAIN
        };
        let r = score_pairs(&[(&a, &a)], &rescaled);
        assert!(
            scores(&r[0]).iter().all(|v| (v - 1.0).abs() < 1e-12),
            "{r:?}"
        );
    }

    #[test]
    fn problems_fail_only_their_sample() {
        let good = text(&[1, 2]);
        let failed: Embedding = Err("encoder exploded".into());
        let mut short = text(&[1]);
        if let Ok(e) = &mut short {
            e.vectors.pop();
        }
        let r = score_pairs(&[(&good, &failed), (&short, &good), (&good, &good)], &PLAIN);
        assert!(
            matches!(&r[0], SampleResult::Error(e) if e == "reference: encoder exploded"),
            "{r:?}"
        );
        assert!(
            matches!(&r[1], SampleResult::Error(e) if e.starts_with("prediction: the encoder returned 3 tokens")),
            "{r:?}"
        );
        assert_eq!(scores(&r[2]).len(), 3);
    }

    #[test]
    fn idf_with_one_reference_is_undefined_not_nan() {
        // One reference: every token of it has df = M, so idf 0 everywhere and no recall.
        let (p, r) = (text(&[1, 2]), text(&[1, 3]));
        let result = score_pairs(&[(&p, &r)], &Options { idf: true, ..PLAIN });
        assert!(
            matches!(&result[0], SampleResult::Error(e) if e.starts_with("BERTScore is undefined")),
            "{result:?}"
        );
        // Two references make the tokens they do not share informative.
        let (p2, r2) = (text(&[4]), text(&[4, 5]));
        let result = score_pairs(&[(&p, &r), (&p2, &r2)], &Options { idf: true, ..PLAIN });
        assert_eq!(scores(&result[0]).len(), 3);
    }

    #[test]
    fn several_references_take_each_score_at_its_best() {
        let p = text(&[1, 2, 3]);
        let (r1, r2) = (text(&[1, 2, 3, 4, 5, 6]), text(&[1]));
        let one = |r: &Embedding| scores(&score_pairs(&[(&p, r)], &PLAIN)[0]);
        let (s1, s2) = (one(&r1), one(&r2));
        let multi = scores(&score_multi(&[(&p, vec![&r1, &r2])], &PLAIN)[0]);
        let expect: Vec<f64> = s1.iter().zip(&s2).map(|(a, b)| a.max(*b)).collect();
        assert_eq!(multi, expect);
        // The maxima come from different references: the rule is per score, not per pair.
        assert!(s1[0] > s2[0] && s1[1] < s2[1], "{s1:?} {s2:?}");
        let failed: Embedding = Err("encoder exploded".into());
        let r = score_multi(&[(&p, vec![&r1, &failed])], &PLAIN);
        assert!(
            matches!(&r[0], SampleResult::Error(e) if e == "reference 2: reference: encoder exploded"),
            "{r:?}"
        );
    }

    #[test]
    fn a_zero_vector_is_an_error_not_nan() {
        let mut zero = text(&[1, 2]);
        if let Ok(e) = &mut zero {
            e.vectors[2..4].fill(0.0);
        }
        let r = score_pairs(&[(&zero, &text(&[1]))], &PLAIN);
        assert!(
            matches!(&r[0], SampleResult::Error(e) if e.starts_with("BERTScore is undefined")),
            "{r:?}"
        );
    }

    #[test]
    fn empty_texts_score_zero() {
        let (empty, full) = (text(&[]), text(&[1, 2]));
        for pair in [(&empty, &full), (&full, &empty), (&empty, &empty)] {
            for idf in [false, true] {
                let r = score_pairs(&[pair, (&full, &text(&[7]))], &Options { idf, ..PLAIN });
                assert_eq!(scores(&r[0]), [0.0, 0.0, 0.0], "idf {idf}");
            }
        }
    }
}
