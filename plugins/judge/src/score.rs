//! Turning a judge model's answer into a score: G-Eval's probability-weighted mean over the
//! score tokens, or the first score in the text when there are no usable log-probabilities.

use adapterlab_sdk::metric::chat::TokenLogprob;

/// The lowest and highest score a judge may give.
pub const MIN_SCORE: u8 = 1;
pub const MAX_SCORE: u8 = 5;

/// How much of an unparseable answer an error quotes.
const QUOTE_CHARS: usize = 200;

/// The score a token stands for: `"1"` to `"5"`, ignoring surrounding whitespace (tokenizers
/// often fold the space before a word into the token, as in `" 4"`).
pub fn token_score(token: &str) -> Option<u8> {
    match token.trim().as_bytes() {
        [d @ b'0'..=b'9'] if (MIN_SCORE..=MAX_SCORE).contains(&(d - b'0')) => Some(d - b'0'),
        _ => None,
    }
}

/// G-Eval's score: the expectation of the score under the model's distribution at `position`
/// (the first generated token), `sum_i p(s_i) * s_i / sum_i p(s_i)` over the score tokens among
/// the position's alternatives. Renormalising over score tokens only drops the mass of tokens
/// that are not scores. None when no alternative is a score with a usable probability.
///
/// The alternatives are `top` plus the generated token itself, which the server may leave
/// out of `top` (e.g. when `top_logprobs` is 0); a token listed twice counts once.
pub fn weighted_score(position: &TokenLogprob) -> Option<f64> {
    let mut seen: Vec<&str> = Vec::new();
    let mut candidates: Vec<(u8, f64)> = Vec::new();
    let alternatives = position
        .top
        .iter()
        .map(|t| (t.token.as_str(), t.logprob))
        .chain(std::iter::once((position.token.as_str(), position.logprob)));
    for (token, logprob) in alternatives {
        if seen.contains(&token) {
            continue;
        }
        seen.push(token);
        // NaN carries no probability; -inf is probability 0 and +inf is not a log-probability.
        if let Some(score) = token_score(token).filter(|_| logprob.is_finite()) {
            candidates.push((score, logprob));
        }
    }
    // Shift by the largest log-probability before exponentiating so that the weights neither
    // underflow to zero nor overflow; the shift cancels in the ratio.
    let max = candidates
        .iter()
        .map(|&(_, lp)| lp)
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let (mut total, mut weighted) = (0.0, 0.0);
    for &(score, logprob) in &candidates {
        let weight = (logprob - max).exp();
        total += weight;
        weighted += weight * f64::from(score);
    }
    // `total` is at least 1 (the largest candidate's weight), so the ratio is finite.
    Some(weighted / total)
}

/// The first integer from 1 to 5 written in `text`: a maximal run of digits that is one of
/// those values and is not the integer part of a decimal such as `3.5`. Other numbers (`0`,
/// `10`, `2023`) are skipped.
pub fn text_score(text: &str) -> Option<u8> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let decimal =
            bytes.get(i) == Some(&b'.') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
        if decimal {
            // Skip the fractional digits too, so `3.5` does not yield 5.
            i += 1;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            continue;
        }
        // Digit runs are ASCII, so slicing at their bounds stays on char boundaries.
        if let Some(score) = token_score(&text[start..i]) {
            return Some(score);
        }
    }
    None
}

/// The score of one answer: weighted over the first generated position's log-probabilities
/// when they hold a score token, else the first score in `content`. The error quotes the
/// answer, cut to about 200 characters.
pub fn answer_score(content: &str, logprobs: Option<&[TokenLogprob]>) -> Result<f64, String> {
    if let Some(score) = logprobs.and_then(<[_]>::first).and_then(weighted_score) {
        return Ok(score);
    }
    match text_score(content) {
        Some(score) => Ok(f64::from(score)),
        None => Err(format!(
            "no score from 1 to 5 in the answer {:?}",
            quote(content)
        )),
    }
}

/// `text` cut to [`QUOTE_CHARS`] characters, with an ellipsis when cut.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use adapterlab_sdk::metric::chat::{TokenLogprob, TopLogprob};

    use crate::score::{answer_score, text_score, token_score, weighted_score};

    fn position(token: &str, top: &[(&str, f64)]) -> TokenLogprob {
        let logprob = top
            .iter()
            .find(|(t, _)| *t == token)
            .map_or(0.0, |&(_, lp)| lp);
        TokenLogprob {
            token: token.to_string(),
            logprob,
            top: top
                .iter()
                .map(|&(token, logprob)| TopLogprob {
                    token: token.to_string(),
                    logprob,
                })
                .collect(),
        }
    }

    fn assert_close(got: Option<f64>, want: f64) {
        let got = got.expect("a score");
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    #[test]
    fn score_tokens() {
        for (token, want) in [
            ("1", Some(1)),
            ("5", Some(5)),
            (" 4", Some(4)),
            ("3\n", Some(3)),
            ("\t2 ", Some(2)),
            ("0", None),
            ("6", None),
            ("10", None),
            ("4.", None),
            ("４", None), // a full-width digit is not a score token
            ("", None),
            (" ", None),
            ("Score", None),
        ] {
            assert_eq!(token_score(token), want, "token {token:?}");
        }
    }

    #[test]
    fn weights_are_the_renormalised_probabilities() {
        // p(4) = 0.6, p(3) = 0.3, p(5) = 0.1: the expectation is 2.4 + 0.9 + 0.5 = 3.8.
        let p = position(
            "4",
            &[("4", 0.6f64.ln()), ("3", 0.3f64.ln()), ("5", 0.1f64.ln())],
        );
        assert_close(weighted_score(&p), 3.8);
    }

    #[test]
    fn mass_on_other_tokens_is_dropped_before_averaging() {
        // Only 0.5 of the mass is on scores: 4 with 0.4 and 2 with 0.1, so 4 * 0.8 + 2 * 0.2.
        let p = position(
            "4",
            &[
                ("4", 0.4f64.ln()),
                ("The", 0.3f64.ln()),
                ("2", 0.1f64.ln()),
                ("\n", 0.2f64.ln()),
            ],
        );
        assert_close(weighted_score(&p), 3.6);
    }

    #[test]
    fn whitespace_tokens_count_as_their_score() {
        // " 4" and "4" are distinct tokens for the same score: both carry its probability.
        let p = position(
            " 4",
            &[
                (" 4", 0.5f64.ln()),
                ("4", 0.25f64.ln()),
                (" 2", 0.25f64.ln()),
            ],
        );
        assert_close(weighted_score(&p), 3.5);
    }

    #[test]
    fn tokens_outside_one_to_five_are_ignored() {
        let p = position(
            "5",
            &[
                ("5", 0.5f64.ln()),
                ("0", 0.2f64.ln()),
                ("6", 0.1f64.ln()),
                ("10", 0.1f64.ln()),
                ("1", 0.1f64.ln()),
            ],
        );
        // 5 * 0.5 / 0.6 + 1 * 0.1 / 0.6
        assert_close(weighted_score(&p), 26.0 / 6.0);
    }

    #[test]
    fn one_score_token_gives_that_score() {
        assert_close(
            weighted_score(&position("3", &[("3", -0.01), ("Three", -4.0)])),
            3.0,
        );
    }

    #[test]
    fn the_generated_token_counts_when_top_is_empty() {
        assert_close(weighted_score(&position("2", &[])), 2.0);
        let p = TokenLogprob {
            token: " 5".into(),
            logprob: -0.2,
            top: Vec::new(),
        };
        assert_close(weighted_score(&p), 5.0);
    }

    #[test]
    fn the_generated_token_is_not_counted_twice() {
        let p = position("4", &[("4", 0.5f64.ln()), ("2", 0.5f64.ln())]);
        assert_close(weighted_score(&p), 3.0);
    }

    #[test]
    fn the_generated_token_outside_top_is_added() {
        // A server may omit the sampled token from `top`: it still carries its probability.
        let p = TokenLogprob {
            token: "2".into(),
            logprob: 0.5f64.ln(),
            top: vec![TopLogprob {
                token: "4".into(),
                logprob: 0.5f64.ln(),
            }],
        };
        assert_close(weighted_score(&p), 3.0);
    }

    #[test]
    fn tiny_log_probabilities_do_not_underflow() {
        // exp(-800) is 0 in f64; shifting by the maximum keeps the ratio: equal weights.
        let p = position("2", &[("2", -800.0), ("4", -800.0), ("x", -0.0001)]);
        assert_close(weighted_score(&p), 3.0);
    }

    #[test]
    fn unusable_log_probabilities_are_skipped() {
        let p = position(
            "3",
            &[
                ("3", f64::NAN),
                ("4", f64::NEG_INFINITY),
                ("5", f64::INFINITY),
                ("2", -1.0),
            ],
        );
        assert_close(weighted_score(&p), 2.0);
        let none = position("3", &[("3", f64::NAN), ("4", f64::NEG_INFINITY)]);
        assert_eq!(weighted_score(&none), None);
    }

    #[test]
    fn no_score_token_gives_none() {
        assert_eq!(
            weighted_score(&position(
                "Score",
                &[("Score", -0.1), ("The", -2.5), ("6", -3.0)]
            )),
            None
        );
    }

    #[test]
    fn text_scores() {
        for (text, want) in [
            ("4", Some(4)),
            (" 5\n", Some(5)),
            ("Relevance: 3", Some(3)),
            // The first integer 1-5, as documented: why the prompt's form line names no range.
            ("- Coherence (1-5): 4", Some(1)),
            ("Score: 4/5", Some(4)),
            ("I'd say 10, no, 2", Some(2)),
            ("0 then 3", Some(3)),
            ("3.5", None),
            ("3.5 or 4", Some(4)),
            ("4.", Some(4)),
            ("2024 was year 5", Some(5)),
            ("99999999999999999999999 3", Some(3)),
            ("five", None),
            ("", None),
            ("６", None),
        ] {
            assert_eq!(text_score(text), want, "text {text:?}");
        }
    }

    #[test]
    fn answer_prefers_log_probabilities() {
        let lp = [position("4", &[("4", 0.5f64.ln()), ("5", 0.5f64.ln())])];
        assert_eq!(answer_score("4", Some(&lp)), Ok(4.5));
    }

    #[test]
    fn answer_falls_back_to_text_without_usable_log_probabilities() {
        assert_eq!(answer_score(" 3", None), Ok(3.0));
        assert_eq!(answer_score("3", Some(&[])), Ok(3.0));
        let no_score = [
            position("Score", &[("Score", -0.1), ("Rating", -2.0)]),
            position("2", &[("2", 0.0)]),
        ];
        // Only the first position counts; the text then gives the score.
        assert_eq!(answer_score("Score: 2", Some(&no_score)), Ok(2.0));
    }

    #[test]
    fn garbage_answer_is_an_error_quoting_it() {
        let err = answer_score("I cannot rate this summary.", None).unwrap_err();
        assert_eq!(
            err,
            "no score from 1 to 5 in the answer \"I cannot rate this summary.\""
        );
        let lp = [position("I", &[("I", -0.1)])];
        assert!(
            answer_score("I refuse", Some(&lp))
                .unwrap_err()
                .contains("I refuse")
        );
    }

    #[test]
    fn long_answers_are_quoted_cut() {
        let long = "é".repeat(500);
        let err = answer_score(&long, None).unwrap_err();
        assert!(err.contains(&format!("{}…", "é".repeat(200))), "{err}");
        assert!(!err.contains(&"é".repeat(201)));
    }
}
