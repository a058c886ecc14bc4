//! NLTK's Porter stemmer (`nltk.stem.porter.PorterStemmer` in its default `NLTK_EXTENSIONS`
//! mode), ported rule by rule, because rouge-score stems with exactly that stemmer and any
//! deviation changes which tokens match.
//!
//! The port keeps NLTK's structure (steps 1a-5b, `_apply_rule_list` and its "first matching
//! suffix decides" semantics, the irregular-forms pool, the NLTK-only special cases) so that
//! it can be read side by side with `nltk/stem/porter.py`. Words are handled as `char`s, as
//! Python indexes `str` by code point; rouge only ever passes `[a-z0-9]` tokens.

/// A rule's condition on the stem left after removing the suffix.
type Condition<'a> = &'a dyn Fn(&[char]) -> bool;

/// A suffix-removal rule: `(suffix, replacement, condition)` as in NLTK. `suffix == "*d"` is
/// NLTK's marker for "ends in a double consonant". A missing condition always holds.
struct Rule<'a> {
    suffix: &'a str,
    replacement: &'a str,
    condition: Option<Condition<'a>>,
}

impl<'a> Rule<'a> {
    fn new(suffix: &'a str, replacement: &'a str, condition: Condition<'a>) -> Self {
        Rule {
            suffix,
            replacement,
            condition: Some(condition),
        }
    }

    fn always(suffix: &'a str, replacement: &'a str) -> Self {
        Rule {
            suffix,
            replacement,
            condition: None,
        }
    }
}

/// Stems one word the way `PorterStemmer().stem(word)` does (it lowercases first).
pub fn stem(word: &str) -> String {
    let lowered = py_lower(word);
    if let Some(irregular) = irregular_form(&lowered) {
        return irregular.to_string();
    }
    // NLTK tests the length of the word as given, before lowercasing.
    if word.chars().count() <= 2 {
        return lowered;
    }
    let mut w: Vec<char> = lowered.chars().collect();
    w = step1a(&w);
    w = step1b(&w);
    w = step1c(&w);
    w = step2(&w);
    w = step3(&w);
    w = step4(&w);
    w = step5a(&w);
    w = step5b(&w);
    w.into_iter().collect()
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

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// `_consonant_flags`: a `y` is a consonant at the start of a word or after a vowel.
fn consonant_flags(word: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(word.len());
    for (i, &c) in word.iter().enumerate() {
        let consonant = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(consonant);
    }
    flags
}

/// `_is_consonant(word, i)`; callers guarantee `i < word.len()`.
fn is_consonant(word: &[char], i: usize) -> bool {
    let c = word[i];
    if is_vowel(c) {
        return false;
    }
    if c != 'y' {
        return true;
    }
    // A run of `y`s alternates; resolve it by walking back to the first non-`y` (or the start).
    let mut negate = false;
    let mut k = i;
    while k > 0 && word[k] == 'y' {
        negate = !negate;
        k -= 1;
    }
    // NLTK: `(word[i] not in self.vowels) != negate`.
    is_vowel(word[k]) == negate
}

/// `_measure`: the number of vowel-consonant transitions, Porter's `m`.
fn measure(stem: &[char]) -> usize {
    let flags = consonant_flags(stem);
    flags.windows(2).filter(|pair| !pair[0] && pair[1]).count()
}

fn has_positive_measure(stem: &[char]) -> bool {
    measure(stem) > 0
}

fn contains_vowel(stem: &[char]) -> bool {
    !consonant_flags(stem).iter().all(|&consonant| consonant)
}

/// `_ends_double_consonant` (condition `*d`).
fn ends_double_consonant(word: &[char]) -> bool {
    let n = word.len();
    n >= 2 && word[n - 1] == word[n - 2] && is_consonant(word, n - 1)
}

/// `_ends_cvc` (condition `*o`), with NLTK's extension for two-letter stems.
fn ends_cvc(word: &[char]) -> bool {
    let n = word.len();
    (n >= 3
        && is_consonant(word, n - 3)
        && !is_consonant(word, n - 2)
        && is_consonant(word, n - 1)
        && !matches!(word[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(word, 0) && is_consonant(word, 1))
}

fn ends_with(word: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    n <= word.len() && word[word.len() - n..].iter().copied().eq(suffix.chars())
}

/// `word` without its last `n` chars (`word[:-n]`, which is `''` when `n` exceeds the length).
fn drop_last(word: &[char], n: usize) -> &[char] {
    &word[..word.len().saturating_sub(n)]
}

fn concat(stem: &[char], tail: &str) -> Vec<char> {
    stem.iter().copied().chain(tail.chars()).collect()
}

/// `_apply_rule_list`: the first rule whose suffix matches decides; if its condition fails
/// the word is returned unchanged and no later rule is tried.
fn apply_rule_list(word: &[char], rules: &[Rule]) -> Vec<char> {
    for rule in rules {
        let holds = |stem: &[char]| rule.condition.is_none_or(|condition| condition(stem));
        if rule.suffix == "*d" && ends_double_consonant(word) {
            let stem = drop_last(word, 2);
            return if holds(stem) {
                concat(stem, rule.replacement)
            } else {
                word.to_vec()
            };
        }
        if ends_with(word, rule.suffix) {
            let stem = drop_last(word, rule.suffix.chars().count());
            return if holds(stem) {
                concat(stem, rule.replacement)
            } else {
                word.to_vec()
            };
        }
    }
    word.to_vec()
}

fn step1a(word: &[char]) -> Vec<char> {
    // NLTK extension: 'flies' -> 'fli' but 'dies' -> 'die'.
    if ends_with(word, "ies") && word.len() == 4 {
        return concat(drop_last(word, 3), "ie");
    }
    apply_rule_list(
        word,
        &[
            Rule::always("sses", "ss"),
            Rule::always("ies", "i"),
            Rule::always("ss", "ss"),
            Rule::always("s", ""),
        ],
    )
}

fn step1b(word: &[char]) -> Vec<char> {
    // NLTK extension: 'spied' -> 'spi' but 'died' -> 'die'.
    if ends_with(word, "ied") {
        let replacement = if word.len() == 4 { "ie" } else { "i" };
        return concat(drop_last(word, 3), replacement);
    }

    // (m>0) EED -> EE
    if ends_with(word, "eed") {
        let stem = drop_last(word, 3);
        return if measure(stem) > 0 {
            concat(stem, "ee")
        } else {
            word.to_vec()
        };
    }

    // (*v*) ED -> and (*v*) ING ->; 'ed' is tried first, and a match without a vowel
    // falls through to 'ing' exactly as NLTK's loop does.
    let mut intermediate: Option<&[char]> = None;
    for suffix in ["ed", "ing"] {
        if ends_with(word, suffix) {
            let stem = drop_last(word, suffix.len());
            if contains_vowel(stem) {
                intermediate = Some(stem);
                break;
            }
        }
    }
    let Some(stem) = intermediate else {
        return word.to_vec();
    };

    // A vowel was found, so the intermediate stem is not empty.
    let last = stem[stem.len() - 1];
    let last_str = last.to_string();
    let not_lsz = move |_: &[char]| !matches!(last, 'l' | 's' | 'z');
    let short_cvc = |s: &[char]| measure(s) == 1 && ends_cvc(s);
    apply_rule_list(
        stem,
        &[
            Rule::always("at", "ate"),
            Rule::always("bl", "ble"),
            Rule::always("iz", "ize"),
            // (*d and not (*L or *S or *Z)) -> single letter
            Rule::new("*d", &last_str, &not_lsz),
            // (m=1 and *o) -> E
            Rule::new("", "e", &short_cvc),
        ],
    )
}

fn step1c(word: &[char]) -> Vec<char> {
    // NLTK: y -> i only after a consonant that is not the whole stem ('happy' -> 'happi',
    // 'enjoy' and 'by' stay).
    let condition = |stem: &[char]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rule_list(word, &[Rule::new("y", "i", &condition)])
}

fn step2(word: &[char]) -> Vec<char> {
    // NLTK applies ALLI -> AL first and, if it fires, runs step 2 again on the result.
    if ends_with(word, "alli") && has_positive_measure(drop_last(word, 4)) {
        return step2(&concat(drop_last(word, 4), "al"));
    }

    let positive = |stem: &[char]| has_positive_measure(stem);
    // The 'l' of 'logi' stays with the stem, so 'geo', 'theo' work like 'archaeo'.
    let logi = |_: &[char]| has_positive_measure(drop_last(word, 3));
    apply_rule_list(
        word,
        &[
            Rule::new("ational", "ate", &positive),
            Rule::new("tional", "tion", &positive),
            Rule::new("enci", "ence", &positive),
            Rule::new("anci", "ance", &positive),
            Rule::new("izer", "ize", &positive),
            Rule::new("bli", "ble", &positive),
            Rule::new("alli", "al", &positive),
            Rule::new("entli", "ent", &positive),
            Rule::new("eli", "e", &positive),
            Rule::new("ousli", "ous", &positive),
            Rule::new("ization", "ize", &positive),
            Rule::new("ation", "ate", &positive),
            Rule::new("ator", "ate", &positive),
            Rule::new("alism", "al", &positive),
            Rule::new("iveness", "ive", &positive),
            Rule::new("fulness", "ful", &positive),
            Rule::new("ousness", "ous", &positive),
            Rule::new("aliti", "al", &positive),
            Rule::new("iviti", "ive", &positive),
            Rule::new("biliti", "ble", &positive),
            Rule::new("fulli", "ful", &positive),
            Rule::new("logi", "log", &logi),
        ],
    )
}

fn step3(word: &[char]) -> Vec<char> {
    let positive = |stem: &[char]| has_positive_measure(stem);
    apply_rule_list(
        word,
        &[
            Rule::new("icate", "ic", &positive),
            Rule::new("ative", "", &positive),
            Rule::new("alize", "al", &positive),
            Rule::new("iciti", "ic", &positive),
            Rule::new("ical", "ic", &positive),
            Rule::new("ful", "", &positive),
            Rule::new("ness", "", &positive),
        ],
    )
}

fn step4(word: &[char]) -> Vec<char> {
    let gt1 = |stem: &[char]| measure(stem) > 1;
    let ion = |stem: &[char]| measure(stem) > 1 && matches!(stem.last(), Some('s' | 't'));
    apply_rule_list(
        word,
        &[
            Rule::new("al", "", &gt1),
            Rule::new("ance", "", &gt1),
            Rule::new("ence", "", &gt1),
            Rule::new("er", "", &gt1),
            Rule::new("ic", "", &gt1),
            Rule::new("able", "", &gt1),
            Rule::new("ible", "", &gt1),
            Rule::new("ant", "", &gt1),
            Rule::new("ement", "", &gt1),
            Rule::new("ment", "", &gt1),
            Rule::new("ent", "", &gt1),
            Rule::new("ion", "", &ion),
            Rule::new("ou", "", &gt1),
            Rule::new("ism", "", &gt1),
            Rule::new("ate", "", &gt1),
            Rule::new("iti", "", &gt1),
            Rule::new("ous", "", &gt1),
            Rule::new("ive", "", &gt1),
            Rule::new("ize", "", &gt1),
        ],
    )
}

fn step5a(word: &[char]) -> Vec<char> {
    // Both E rules are tried (NLTK cannot use _apply_rule_list here; see its comment).
    if ends_with(word, "e") {
        let stem = drop_last(word, 1);
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    word.to_vec()
}

fn step5b(word: &[char]) -> Vec<char> {
    let condition = |_: &[char]| measure(drop_last(word, 1)) > 1;
    apply_rule_list(word, &[Rule::new("ll", "l", &condition)])
}

#[cfg(test)]
mod tests {
    use crate::porter::stem;

    fn check(word: &str, expect: &str) {
        assert_eq!(stem(word), expect, "stem({word:?})");
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
        ] {
            let _ = stem(word);
        }
    }
}
