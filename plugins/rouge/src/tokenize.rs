//! rouge-score's default tokenizer (`rouge_score/tokenize.py`): lowercase, every run of
//! characters outside `[a-z0-9]` becomes a space, split, Porter-stem tokens longer than
//! three characters, drop what is not `^[a-z0-9]+$`.
//!
//! Python lowercases the whole text first and only then applies the ASCII-only regex, so a
//! non-ASCII letter separates tokens (`"café"` gives `caf`) unless its lowercase form is
//! ASCII: `K` (U+212A KELVIN SIGN) becomes `k`, and `İ` (U+0130) becomes `i` plus a combining
//! dot, which then separates.

use crate::{Map, porter};

/// The tokens of `text`, as `rouge_score.tokenize.tokenize(text, stemmer)` returns them.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    Tokenizer::new(use_stemmer).tokenize(text)
}

/// A tokenizer that remembers its stems: summaries repeat words, and a long text repeats
/// them a lot.
pub struct Tokenizer {
    use_stemmer: bool,
    stems: Map<String, String>,
}

impl Tokenizer {
    pub fn new(use_stemmer: bool) -> Self {
        Tokenizer {
            use_stemmer,
            stems: Map::default(),
        }
    }

    pub fn tokenize(&mut self, text: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        let mut current = String::new();
        for lowered in text.chars().flat_map(char::to_lowercase) {
            if lowered.is_ascii_lowercase() || lowered.is_ascii_digit() {
                current.push(lowered);
            } else if !current.is_empty() {
                let token = std::mem::take(&mut current);
                tokens.push(self.finish(token));
            }
        }
        if !current.is_empty() {
            tokens.push(self.finish(current));
        }
        // The stemmer maps [a-z0-9] to [a-z0-9], but rouge-score re-checks, and so do we.
        tokens.retain(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
        tokens
    }

    fn finish(&mut self, token: String) -> String {
        // rouge-score stems only tokens longer than 3 characters (ASCII here: bytes = chars).
        if !self.use_stemmer || token.len() <= 3 {
            return token;
        }
        if let Some(stem) = self.stems.get(&token) {
            return stem.clone();
        }
        let stem = porter::stem(&token);
        self.stems.insert(token, stem.clone());
        stem
    }
}

#[cfg(test)]
mod tests {
    use crate::tokenize::tokenize;

    fn check(text: &str, stem: bool, expect: &[&str]) {
        assert_eq!(tokenize(text, stem), expect, "tokenize({text:?}, {stem})");
    }

    #[test]
    fn splits_on_anything_but_ascii_alphanumerics() {
        check(
            "The quick-brown fox's 2nd jump!",
            false,
            &["the", "quick", "brown", "fox", "s", "2nd", "jump"],
        );
        check("café naïve", false, &["caf", "na", "ve"]);
        check("\u{212A}elvin", false, &["kelvin"]);
        check("\u{130}stanbul", false, &["i", "stanbul"]);
        check("", false, &[]);
        check("  \n\t ", false, &[]);
    }

    #[test]
    fn stems_only_long_tokens() {
        check(
            "running runs ran dogs cats",
            true,
            &["run", "run", "ran", "dog", "cat"],
        );
        check("news was", true, &["news", "was"]);
    }
}
