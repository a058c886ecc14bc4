//! NLTK's Porter stemmer (`nltk.stem.porter.PorterStemmer` in its default `NLTK_EXTENSIONS`
//! mode), ported rule by rule, because rouge-score stems with exactly that stemmer and any
//! deviation changes which tokens match.
//!
//! The port keeps NLTK's structure (steps 1a-5b, `_apply_rule_list` and its "first matching
//! suffix decides" semantics, the irregular-forms pool, the NLTK-only special cases) so that
//! it can be read side by side with `nltk/stem/porter.py`. Each step edits one buffer in place
//! instead of building new strings: a summary has dozens of words to stem, and allocations
//! are dear inside WebAssembly. Python indexes `str` by code point, so the buffer holds
//! `char`s; rouge only ever passes `[a-z0-9]` tokens, for which it holds bytes (the same code,
//! instantiated for `u8`).

/// A letter of the word being stemmed: a byte for ASCII words, a `char` otherwise.
trait Letter: Copy + Eq {
    /// The letter as an ASCII byte; any non-ASCII letter is `0xFF`, which equals no rule's
    /// letter and is a consonant, as any non-vowel other than `y` is in NLTK.
    fn ascii(self) -> u8;
    fn from_ascii(b: u8) -> Self;
}

impl Letter for u8 {
    #[inline]
    fn ascii(self) -> u8 {
        self
    }
    #[inline]
    fn from_ascii(b: u8) -> Self {
        b
    }
}

impl Letter for char {
    #[inline]
    fn ascii(self) -> u8 {
        if self.is_ascii() { self as u8 } else { 0xFF }
    }
    #[inline]
    fn from_ascii(b: u8) -> Self {
        b as char
    }
}

/// Stems one word the way `PorterStemmer().stem(word)` does (it lowercases first).
pub fn stem(word: &str) -> String {
    if word.is_ascii() {
        // Python's `str.lower()` of ASCII text is the ASCII lowercase.
        let lowered = word.to_ascii_lowercase();
        if let Some(irregular) = irregular_form(&lowered) {
            return irregular.to_string();
        }
        if word.len() <= 2 {
            return lowered;
        }
        let mut w = lowered.into_bytes();
        stem_in_place(&mut w);
        return String::from_utf8(w).expect("the rules only write ASCII");
    }
    stem_chars(word)
}

/// [`stem`] over `char`s, for words that are not ASCII.
fn stem_chars(word: &str) -> String {
    let lowered = py_lower(word);
    if let Some(irregular) = irregular_form(&lowered) {
        return irregular.to_string();
    }
    // NLTK tests the length of the word as given, before lowercasing.
    if word.chars().count() <= 2 {
        return lowered;
    }
    let mut w: Vec<char> = lowered.chars().collect();
    stem_in_place(&mut w);
    w.into_iter().collect()
}

fn stem_in_place<C: Letter>(w: &mut Vec<C>) {
    step1a(w);
    step1b(w);
    step1c(w);
    step2(w);
    step3(w);
    step4(w);
    step5a(w);
    step5b(w);
}

/// Python's `str.lower()`: full Unicode lowercase mapping. (Python also applies the
/// final-sigma rule; that only decides between two non-ASCII sigmas, which no rouge token
/// can contain.)
fn py_lower(word: &str) -> String {
    word.chars().flat_map(char::to_lowercase).collect()
}

/// NLTK's table of irregular forms (`self.pool`), checked before any rule.
fn irregular_form(word: &str) -> Option<&'static str> {
    Some(match word {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

#[inline]
fn is_vowel<C: Letter>(c: C) -> bool {
    matches!(c.ascii(), b'a' | b'e' | b'i' | b'o' | b'u')
}

/// `_is_consonant(word, i)`; callers guarantee `i < word.len()`.
fn is_consonant<C: Letter>(word: &[C], i: usize) -> bool {
    let c = word[i];
    if is_vowel(c) {
        return false;
    }
    if c.ascii() != b'y' {
        return true;
    }
    // A run of `y`s alternates; resolve it by walking back to the first non-`y` (or the start).
    let mut negate = false;
    let mut k = i;
    while k > 0 && word[k].ascii() == b'y' {
        negate = !negate;
        k -= 1;
    }
    // NLTK: `(word[i] not in self.vowels) != negate`.
    is_vowel(word[k]) == negate
}

/// `_consonant_flags` one letter at a time: a `y` is a consonant at the start of a word or
/// after a vowel.
fn consonant_flags<C: Letter>(word: &[C]) -> impl Iterator<Item = bool> + '_ {
    let mut previous = false;
    word.iter().enumerate().map(move |(i, &c)| {
        let consonant = if is_vowel(c) {
            false
        } else if c.ascii() == b'y' {
            i == 0 || !previous
        } else {
            true
        };
        previous = consonant;
        consonant
    })
}

/// `_measure`: the number of vowel-consonant transitions, Porter's `m`.
fn measure<C: Letter>(stem: &[C]) -> usize {
    let mut previous = true;
    let mut m = 0;
    for (i, consonant) in consonant_flags(stem).enumerate() {
        m += (i > 0 && !previous && consonant) as usize;
        previous = consonant;
    }
    m
}

fn contains_vowel<C: Letter>(stem: &[C]) -> bool {
    consonant_flags(stem).any(|consonant| !consonant)
}

/// `_ends_double_consonant` (condition `*d`).
fn ends_double_consonant<C: Letter>(word: &[C]) -> bool {
    let n = word.len();
    n >= 2 && word[n - 1] == word[n - 2] && is_consonant(word, n - 1)
}

/// `_ends_cvc` (condition `*o`), with NLTK's extension for two-letter stems.
fn ends_cvc<C: Letter>(word: &[C]) -> bool {
    let n = word.len();
    (n >= 3
        && is_consonant(word, n - 3)
        && !is_consonant(word, n - 2)
        && is_consonant(word, n - 1)
        && !matches!(word[n - 1].ascii(), b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(word, 0) && is_consonant(word, 1))
}

fn ends_with<C: Letter>(word: &[C], suffix: &[u8]) -> bool {
    suffix.len() <= word.len()
        && word[word.len() - suffix.len()..]
            .iter()
            .zip(suffix)
            .all(|(c, &s)| c.ascii() == s)
}

/// `word[:-n] + tail`, in place (`word[:-n]` is `''` when `n` exceeds the length).
fn replace_last<C: Letter>(word: &mut Vec<C>, n: usize, tail: &[u8]) {
    word.truncate(word.len().saturating_sub(n));
    word.extend(tail.iter().map(|&b| C::from_ascii(b)));
}

/// A rule's condition on the stem left after removing the suffix (some look at the whole
/// word given to the rule list instead, as NLTK's lambdas do).
#[derive(Clone, Copy)]
enum Condition {
    Always,
    /// `m > 0`.
    PositiveMeasure,
    /// `m > 1`.
    MeasureAbove1,
    /// `m > 1` and the stem ends in `s` or `t` (step 4's ION).
    Ion,
    /// Step 2's LOGI: the word without its last 3 letters has `m > 0`.
    Logi,
    /// Step 1b's double consonant: the word does not end in `l`, `s` or `z`.
    NotLsz,
    /// Step 1b's `(m=1 and *o)`.
    ShortCvc,
    /// Step 1c: `y` after a consonant that is not the whole stem.
    ConsonantBeforeY,
    /// Step 5b: the word without its last letter has `m > 1`.
    LlMeasure,
}

impl Condition {
    fn holds<C: Letter>(self, word: &[C], stem: &[C]) -> bool {
        let without_last = |n: usize| &word[..word.len().saturating_sub(n)];
        match self {
            Condition::Always => true,
            Condition::PositiveMeasure => measure(stem) > 0,
            Condition::MeasureAbove1 => measure(stem) > 1,
            Condition::Ion => {
                measure(stem) > 1 && matches!(stem.last().map(|c| c.ascii()), Some(b's' | b't'))
            }
            Condition::Logi => measure(without_last(3)) > 0,
            Condition::NotLsz => {
                !matches!(word.last().map(|c| c.ascii()), Some(b'l' | b's' | b'z'))
            }
            Condition::ShortCvc => measure(stem) == 1 && ends_cvc(stem),
            Condition::ConsonantBeforeY => stem.len() > 1 && is_consonant(stem, stem.len() - 1),
            Condition::LlMeasure => measure(without_last(1)) > 1,
        }
    }
}

/// A suffix-removal rule: `(suffix, replacement, condition)` as in NLTK. `suffix == "*d"` is
/// NLTK's marker for "ends in a double consonant", whose replacement is the word's last letter.
struct Rule {
    suffix: &'static [u8],
    replacement: &'static [u8],
    condition: Condition,
}

const fn rule(suffix: &'static str, replacement: &'static str, condition: Condition) -> Rule {
    Rule {
        suffix: suffix.as_bytes(),
        replacement: replacement.as_bytes(),
        condition,
    }
}

/// `_apply_rule_list`: the first rule whose suffix matches decides; if its condition fails
/// the word stays unchanged and no later rule is tried.
fn apply_rule_list<C: Letter>(word: &mut Vec<C>, rules: &[Rule]) {
    for rule in rules {
        if rule.suffix == b"*d" && ends_double_consonant(word) {
            let stem_len = word.len() - 2;
            if rule.condition.holds(word, &word[..stem_len]) {
                // The replacement is the last letter: drop one of the doubled pair.
                word.pop();
            }
            return;
        }
        if ends_with(word, rule.suffix) {
            let stem_len = word.len() - rule.suffix.len();
            if rule.condition.holds(word, &word[..stem_len]) {
                replace_last(word, rule.suffix.len(), rule.replacement);
            }
            return;
        }
    }
}

fn step1a<C: Letter>(word: &mut Vec<C>) {
    // NLTK extension: 'flies' -> 'fli' but 'dies' -> 'die'.
    if ends_with(word, b"ies") && word.len() == 4 {
        replace_last(word, 3, b"ie");
        return;
    }
    use Condition::Always;
    const RULES: &[Rule] = &[
        rule("sses", "ss", Always),
        rule("ies", "i", Always),
        rule("ss", "ss", Always),
        rule("s", "", Always),
    ];
    apply_rule_list(word, RULES);
}

fn step1b<C: Letter>(word: &mut Vec<C>) {
    // NLTK extension: 'spied' -> 'spi' but 'died' -> 'die'.
    if ends_with(word, b"ied") {
        let replacement: &[u8] = if word.len() == 4 { b"ie" } else { b"i" };
        replace_last(word, 3, replacement);
        return;
    }

    // (m>0) EED -> EE
    if ends_with(word, b"eed") {
        if measure(&word[..word.len() - 3]) > 0 {
            replace_last(word, 3, b"ee");
        }
        return;
    }

    // (*v*) ED -> and (*v*) ING ->; 'ed' is tried first, and a match without a vowel
    // falls through to 'ing' exactly as NLTK's loop does.
    let Some(stem_len) = [&b"ed"[..], b"ing"]
        .into_iter()
        .filter(|suffix| ends_with(word, suffix))
        .map(|suffix| word.len() - suffix.len())
        .find(|&stem_len| contains_vowel(&word[..stem_len]))
    else {
        return;
    };
    word.truncate(stem_len);

    use Condition::{Always, NotLsz, ShortCvc};
    const RULES: &[Rule] = &[
        rule("at", "ate", Always),
        rule("bl", "ble", Always),
        rule("iz", "ize", Always),
        // (*d and not (*L or *S or *Z)) -> single letter
        rule("*d", "", NotLsz),
        // (m=1 and *o) -> E
        rule("", "e", ShortCvc),
    ];
    apply_rule_list(word, RULES);
}

fn step1c<C: Letter>(word: &mut Vec<C>) {
    // NLTK: y -> i only after a consonant that is not the whole stem ('happy' -> 'happi',
    // 'enjoy' and 'by' stay).
    const RULES: &[Rule] = &[rule("y", "i", Condition::ConsonantBeforeY)];
    apply_rule_list(word, RULES);
}

fn step2<C: Letter>(word: &mut Vec<C>) {
    // NLTK applies ALLI -> AL first and, if it fires, runs step 2 again on the result.
    if ends_with(word, b"alli") && measure(&word[..word.len() - 4]) > 0 {
        replace_last(word, 4, b"al");
        return step2(word);
    }

    use Condition::{Logi, PositiveMeasure as P};
    const RULES: &[Rule] = &[
        rule("ational", "ate", P),
        rule("tional", "tion", P),
        rule("enci", "ence", P),
        rule("anci", "ance", P),
        rule("izer", "ize", P),
        rule("bli", "ble", P),
        rule("alli", "al", P),
        rule("entli", "ent", P),
        rule("eli", "e", P),
        rule("ousli", "ous", P),
        rule("ization", "ize", P),
        rule("ation", "ate", P),
        rule("ator", "ate", P),
        rule("alism", "al", P),
        rule("iveness", "ive", P),
        rule("fulness", "ful", P),
        rule("ousness", "ous", P),
        rule("aliti", "al", P),
        rule("iviti", "ive", P),
        rule("biliti", "ble", P),
        rule("fulli", "ful", P),
        // The 'l' of 'logi' stays with the stem, so 'geo', 'theo' work like 'archaeo'.
        rule("logi", "log", Logi),
    ];
    apply_rule_list(word, RULES);
}

fn step3<C: Letter>(word: &mut Vec<C>) {
    use Condition::PositiveMeasure as P;
    const RULES: &[Rule] = &[
        rule("icate", "ic", P),
        rule("ative", "", P),
        rule("alize", "al", P),
        rule("iciti", "ic", P),
        rule("ical", "ic", P),
        rule("ful", "", P),
        rule("ness", "", P),
    ];
    apply_rule_list(word, RULES);
}

fn step4<C: Letter>(word: &mut Vec<C>) {
    use Condition::{Ion, MeasureAbove1 as M};
    const RULES: &[Rule] = &[
        rule("al", "", M),
        rule("ance", "", M),
        rule("ence", "", M),
        rule("er", "", M),
        rule("ic", "", M),
        rule("able", "", M),
        rule("ible", "", M),
        rule("ant", "", M),
        rule("ement", "", M),
        rule("ment", "", M),
        rule("ent", "", M),
        rule("ion", "", Ion),
        rule("ou", "", M),
        rule("ism", "", M),
        rule("ate", "", M),
        rule("iti", "", M),
        rule("ous", "", M),
        rule("ive", "", M),
        rule("ize", "", M),
    ];
    apply_rule_list(word, RULES);
}

fn step5a<C: Letter>(word: &mut Vec<C>) {
    // Both E rules are tried (NLTK cannot use _apply_rule_list here; see its comment).
    if ends_with(word, b"e") {
        let stem = &word[..word.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            word.pop();
        }
    }
}

fn step5b<C: Letter>(word: &mut Vec<C>) {
    const RULES: &[Rule] = &[rule("ll", "l", Condition::LlMeasure)];
    apply_rule_list(word, RULES);
}

#[cfg(test)]
mod tests {
    use crate::porter::{stem, stem_chars};

    fn check(word: &str, expect: &str) {
        assert_eq!(stem(word), expect, "stem({word:?})");
        assert_eq!(stem_chars(word), expect, "stem_chars({word:?})");
    }

    #[test]
    fn paper_examples() {
        for (word, expect) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("sing", "sing"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("controlling", "control"),
        ] {
            check(word, expect);
        }
    }

    #[test]
    fn nltk_extensions() {
        check("dying", "die");
        check("skies", "sky");
        check("flies", "fli");
        check("dies", "die");
        check("spied", "spi");
        check("died", "die");
        check("enjoy", "enjoy");
        check("geology", "geolog");
        check("innings", "inning");
        check("yyyy", "yyyi");
        check("A", "a");
    }

    #[test]
    fn non_ascii_letters_are_consonants() {
        // Python: `PorterStemmer().stem(...)` of each.
        check("ßßßßing", "ßßßßing");
        check("naïveties", "naïveti");
        check("caféing", "café");
        check("hoppéd", "hoppéd");
        check("\u{FB01}nishing", "\u{FB01}nish");
        check(
            "\u{130}\u{130}\u{130}\u{130}",
            "i\u{307}i\u{307}i\u{307}i\u{307}",
        );
    }

    #[test]
    fn odd_input_does_not_panic() {
        for word in [
            "",
            "y",
            "ed",
            "ing",
            "eed",
            "ied",
            "İİİİ",
            "ßßßßing",
            "1990s",
            "ll",
            "alli",
            "a*d",
        ] {
            let _ = stem(word);
        }
    }
}
