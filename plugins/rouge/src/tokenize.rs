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

/// Marks a word that rouge-score drops after stemming (its stem is not `[a-z0-9]+`).
const DROPPED: u32 = u32::MAX;

/// A tokenizer that gives each distinct token (after stemming) a small id and remembers
/// every word it has seen: summaries repeat words, a batch of summaries repeats them a lot,
/// and the stemmer is the dearest step. Ids are stable for the tokenizer's lifetime, so the
/// texts of one batch can share one.
pub struct Tokenizer {
    use_stemmer: bool,
    /// Every word seen (lowercased, before stemming) → the id of its token, or [`DROPPED`].
    words: Map<Box<str>, u32>,
    /// Token → id.
    ids: Map<Box<str>, u32>,
    /// Id → token.
    tokens: Vec<Box<str>>,
    /// The word being read, reused from word to word.
    word: String,
}

impl Tokenizer {
    pub fn new(use_stemmer: bool) -> Self {
        Tokenizer {
            use_stemmer,
            words: Map::default(),
            ids: Map::default(),
            tokens: Vec::new(),
            word: String::new(),
        }
    }

    /// The tokens of `text` as strings.
    pub fn tokenize(&mut self, text: &str) -> Vec<String> {
        let mut ids = Vec::new();
        self.tokenize_ids(text, &mut ids);
        ids.iter().map(|&id| self.token(id).to_string()).collect()
    }

    /// The token an id stands for.
    pub fn token(&self, id: u32) -> &str {
        &self.tokens[id as usize]
    }

    /// Appends the ids of the tokens of `text` to `out`.
    pub fn tokenize_ids(&mut self, text: &str, out: &mut Vec<u32>) {
        let mut word = std::mem::take(&mut self.word);
        word.clear();
        if text.is_ascii() {
            // The same loop as below, without decoding or full Unicode lowercasing.
            for b in text.bytes().map(|b| b.to_ascii_lowercase()) {
                if b.is_ascii_lowercase() || b.is_ascii_digit() {
                    word.push(b as char);
                } else if !word.is_empty() {
                    self.push_word(&word, out);
                    word.clear();
                }
            }
        } else {
            for lowered in text.chars().flat_map(char::to_lowercase) {
                if lowered.is_ascii_lowercase() || lowered.is_ascii_digit() {
                    word.push(lowered);
                } else if !word.is_empty() {
                    self.push_word(&word, out);
                    word.clear();
                }
            }
        }
        if !word.is_empty() {
            self.push_word(&word, out);
        }
        self.word = word;
    }

    fn push_word(&mut self, word: &str, out: &mut Vec<u32>) {
        let id = match self.words.get(word) {
            Some(&id) => id,
            None => self.new_word(word),
        };
        if id != DROPPED {
            out.push(id);
        }
    }

    fn new_word(&mut self, word: &str) -> u32 {
        // rouge-score stems only tokens longer than 3 characters (ASCII here: bytes = chars).
        let token = if self.use_stemmer && word.len() > 3 {
            porter::stem(word)
        } else {
            word.to_string()
        };
        // The stemmer maps [a-z0-9] to [a-z0-9], but rouge-score re-checks, and so do we.
        let valid = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let id = if valid {
            match self.ids.get(token.as_str()) {
                Some(&id) => id,
                None => {
                    let id = self.tokens.len() as u32;
                    let token: Box<str> = token.into();
                    self.tokens.push(token.clone());
                    self.ids.insert(token, id);
                    id
                }
            }
        } else {
            DROPPED
        };
        self.words.insert(word.into(), id);
        id
    }
}

#[cfg(test)]
mod tests {
    use crate::tokenize::{Tokenizer, tokenize};

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

    #[test]
    fn words_with_the_same_stem_share_an_id() {
        let mut tokenizer = Tokenizer::new(true);
        let mut ids = Vec::new();
        tokenizer.tokenize_ids("Running RUNS run", &mut ids);
        tokenizer.tokenize_ids("runs ran", &mut ids);
        assert_eq!(ids[0], ids[1]);
        assert_eq!(ids[1], ids[2]);
        assert_eq!(ids[3], ids[0]);
        assert_ne!(ids[4], ids[0]);
        assert_eq!(tokenizer.token(ids[4]), "ran");
    }
}
