//! BERTScore's arithmetic, as bert-score 0.3.13 does it (`bert_score/utils.py`:
//! `greedy_cos_idf`, `get_idf_dict`, and the baseline rescaling in `score.py`), on plain
//! slices so that it runs and is tested natively.
//!
//! bert-score works in float32 tensors; this computes in f64 from the same f32 inputs, so
//! results agree to float32 rounding (about 1e-7), not bit for bit.

use std::fmt;

use crate::{Map, Set};

/// One text's token embeddings as the encoder returned them.
#[derive(Debug, Clone, Copy)]
pub struct Embedded<'a> {
    /// Row-major `len x dim` token vectors, special tokens included.
    pub vectors: &'a [f32],
    /// Aligned with the tokens: true for special tokens ([CLS], [SEP], ...).
    pub special: &'a [bool],
    /// Aligned with the tokens: each token's weight (1, or its idf) before normalisation.
    /// Special tokens get weight 0 whatever this says.
    pub weights: &'a [f64],
}

impl Embedded<'_> {
    fn len(&self) -> usize {
        self.special.len()
    }

    /// bert-score's "empty sentence" test is `mask.sum() == 2`: only [CLS] and [SEP]. Here it is
    /// "no token that is not special", which is the same for encoders that wrap every text in
    /// two special tokens and stays meaningful for those that do not.
    fn is_empty_text(&self) -> bool {
        self.special.iter().all(|&s| s)
    }
}

/// Precision, recall and F1 of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Why a pair could not be scored at all (inputs of inconsistent shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    ZeroDim,
    Vectors {
        side: &'static str,
        tokens: usize,
        dim: usize,
        values: usize,
    },
    Weights {
        side: &'static str,
        tokens: usize,
        weights: usize,
    },
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeError::ZeroDim => write!(f, "the encoder reported vectors of width 0"),
            ShapeError::Vectors {
                side,
                tokens,
                dim,
                values,
            } => {
                write!(
                    f,
                    "{side}: {tokens} tokens of width {dim} need {} values, got {values}",
                    tokens * dim
                )
            }
            ShapeError::Weights {
                side,
                tokens,
                weights,
            } => {
                write!(f, "{side}: {tokens} tokens but {weights} weights")
            }
        }
    }
}

impl std::error::Error for ShapeError {}

fn check(side: &'static str, e: &Embedded, dim: usize) -> Result<(), ShapeError> {
    if e.vectors.len() != e.len().saturating_mul(dim) {
        return Err(ShapeError::Vectors {
            side,
            tokens: e.len(),
            dim,
            values: e.vectors.len(),
        });
    }
    if e.weights.len() != e.len() {
        return Err(ShapeError::Weights {
            side,
            tokens: e.len(),
            weights: e.weights.len(),
        });
    }
    Ok(())
}

/// Token vectors divided by their L2 norms (`emb.div_(torch.norm(emb, dim=-1))`); a zero
/// vector becomes NaNs, as in torch, and poisons the scores that use it.
fn normalized(vectors: &[f32], dim: usize) -> Vec<f64> {
    let mut out: Vec<f64> = vectors.iter().map(|&x| f64::from(x)).collect();
    for row in out.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        for x in row {
            *x /= norm;
        }
    }
    out
}

/// A running `torch.max`: NaN once any element is NaN (torch propagates it). Starts at
/// `-inf`; a max over no element at all is made NaN by the caller.
fn max_propagating_nan(best: f64, v: f64) -> f64 {
    if best.is_nan() || v.is_nan() {
        f64::NAN
    } else {
        best.max(v)
    }
}

/// `sum(word_score * weight / sum(weights))` with specials weighted 0. A zero weight sum
/// gives NaN, as torch's `0 / 0` does.
fn weighted_mean(word_scores: &[f64], e: &Embedded) -> f64 {
    let weights: Vec<f64> = e
        .weights
        .iter()
        .zip(e.special)
        .map(|(&w, &s)| if s { 0.0 } else { w })
        .collect();
    let total: f64 = weights.iter().sum();
    word_scores
        .iter()
        .zip(&weights)
        .map(|(score, w)| score * (w / total))
        .sum()
}

/// `greedy_cos_idf` for one (prediction, reference) pair: cosine similarity between every
/// prediction token and every reference token (special tokens are match candidates);
/// precision averages each prediction token's best match, recall each reference token's,
/// both weighted; F1 = 2PR / (P + R).
///
/// bert-score's special cases are kept: an empty prediction or reference (only special
/// tokens) sets P and R to 0; a NaN F1 (P + R = 0) becomes 0. A P or R that is NaN for
/// another reason (zero weight sum, zero vector) is returned as NaN for the caller to report.
///
/// One difference by design: bert-score pads a batch and its padded similarities are 0, so
/// a token whose real similarities are all negative gets 0 there when the other side is
/// shorter than the batch's longest; here (as in bert-score with a batch of one pair) it
/// gets its real best similarity.
pub fn greedy_cos_idf(
    prediction: &Embedded,
    reference: &Embedded,
    dim: usize,
) -> Result<Prf, ShapeError> {
    if dim == 0 {
        return Err(ShapeError::ZeroDim);
    }
    check("prediction", prediction, dim)?;
    check("reference", reference, dim)?;

    let p_vec = normalized(prediction.vectors, dim);
    let r_vec = normalized(reference.vectors, dim);
    let (np, nr) = (prediction.len(), reference.len());
    // Each token's best match in the other text: the similarity matrix's row and column
    // maxima, kept as running maxima so that memory stays linear in the text lengths.
    let mut word_precision = vec![f64::NEG_INFINITY; np];
    let mut word_recall = vec![f64::NEG_INFINITY; nr];
    for (i, p) in p_vec.chunks(dim).enumerate() {
        for (j, r) in r_vec.chunks(dim).enumerate() {
            let sim: f64 = p.iter().zip(r).map(|(a, b)| a * b).sum();
            word_precision[i] = max_propagating_nan(word_precision[i], sim);
            word_recall[j] = max_propagating_nan(word_recall[j], sim);
        }
    }
    // torch cannot take a max over nothing; an empty other side leaves these undefined.
    if nr == 0 {
        word_precision.fill(f64::NAN);
    }
    if np == 0 {
        word_recall.fill(f64::NAN);
    }

    let mut precision = weighted_mean(&word_precision, prediction);
    let mut recall = weighted_mean(&word_recall, reference);
    let f1 = 2.0 * precision * recall / (precision + recall);

    if prediction.is_empty_text() || reference.is_empty_text() {
        precision = 0.0;
        recall = 0.0;
    }
    let f1 = if f1.is_nan() { 0.0 } else { f1 };
    Ok(Prf {
        precision,
        recall,
        f1,
    })
}

/// Baseline rescaling, `(score - baseline) / (1 - baseline)` for P, R and F1 each.
pub fn rescale(prf: Prf, baseline: [f64; 3]) -> Prf {
    let r = |s: f64, b: f64| (s - b) / (1.0 - b);
    Prf {
        precision: r(prf.precision, baseline[0]),
        recall: r(prf.recall, baseline[1]),
        f1: r(prf.f1, baseline[2]),
    }
}

/// `get_idf_dict` over the references' token ids: `ln((M + 1) / (df + 1))`, where `df` counts
/// the references containing the id and `M` is the number of references.
#[derive(Debug, Clone)]
pub struct Idf {
    idf: Map<u32, f64>,
    unseen: f64,
}

impl Idf {
    pub fn from_references<'a>(references: impl IntoIterator<Item = &'a [u32]>) -> Idf {
        let mut df: Map<u32, u64> = Map::default();
        let mut num_docs: u64 = 0;
        for ids in references {
            num_docs += 1;
            for id in ids.iter().copied().collect::<Set<u32>>() {
                *df.entry(id).or_insert(0) += 1;
            }
        }
        let m = (num_docs + 1) as f64;
        let idf = df
            .into_iter()
            .map(|(id, c)| (id, (m / (c + 1) as f64).ln()))
            .collect();
        Idf {
            idf,
            unseen: m.ln(),
        }
    }

    /// The weight of `id`; ids no reference contains get `ln(M + 1)`.
    pub fn weight(&self, id: u32) -> f64 {
        self.idf.get(&id).copied().unwrap_or(self.unseen)
    }
}

#[cfg(test)]
mod tests {
    use crate::math::{Embedded, Idf, Prf, ShapeError, greedy_cos_idf};

    fn embedded<'a>(vectors: &'a [f32], special: &'a [bool], weights: &'a [f64]) -> Embedded<'a> {
        Embedded {
            vectors,
            special,
            weights,
        }
    }

    #[test]
    fn identical_texts_score_one() {
        let v = [1.0, 0.0, 0.3, 0.4, 0.0, 2.0, 5.0, 5.0];
        let s = [true, false, false, true];
        let w = [1.0; 4];
        let e = embedded(&v, &s, &w);
        let prf = greedy_cos_idf(&e, &e, 2).unwrap();
        for x in [prf.precision, prf.recall, prf.f1] {
            assert!((x - 1.0).abs() < 1e-12, "{prf:?}");
        }
    }

    #[test]
    fn empty_side_scores_zero() {
        let v = [1.0, 0.0, 0.0, 1.0];
        let specials = [true, true];
        let w = [1.0; 2];
        let empty = embedded(&v, &specials, &w);
        let v2 = [1.0, 0.0, 0.5, 0.5, 0.0, 1.0];
        let s2 = [true, false, true];
        let w2 = [1.0; 3];
        let full = embedded(&v2, &s2, &w2);
        let zero = Prf {
            precision: 0.0,
            recall: 0.0,
            f1: 0.0,
        };
        assert_eq!(greedy_cos_idf(&empty, &full, 2), Ok(zero));
        assert_eq!(greedy_cos_idf(&full, &empty, 2), Ok(zero));
        assert_eq!(greedy_cos_idf(&empty, &empty, 2), Ok(zero));
        let none = embedded(&[], &[], &[]);
        assert_eq!(greedy_cos_idf(&none, &full, 2), Ok(zero));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let e = embedded(&[1.0, 2.0, 3.0], &[false, false], &[1.0, 1.0]);
        assert!(matches!(
            greedy_cos_idf(&e, &e, 2),
            Err(ShapeError::Vectors { .. })
        ));
        assert_eq!(greedy_cos_idf(&e, &e, 0), Err(ShapeError::ZeroDim));
    }

    #[test]
    fn idf_counts_documents_not_occurrences() {
        let refs: [&[u32]; 3] = [&[101, 7, 7, 102], &[101, 8, 102], &[101, 7, 102]];
        let idf = Idf::from_references(refs);
        assert_eq!(idf.weight(101), (4.0f64 / 4.0).ln());
        assert_eq!(idf.weight(7), (4.0f64 / 3.0).ln());
        assert_eq!(idf.weight(8), (4.0f64 / 2.0).ln());
        assert_eq!(idf.weight(9), 4.0f64.ln());
    }
}
