//! Golden test: `fixtures/porter.tsv` holds NLTK's `PorterStemmer().stem(word)` for a large
//! English word list and generated words; the port must agree on every one.
//! `PORTER_FIXTURE=path` checks another file of the same shape instead.

use adapterlab_plugin_rouge::porter::stem;

#[test]
fn matches_nltk_porter_stemmer() {
    let text = match std::env::var("PORTER_FIXTURE") {
        Ok(path) => {
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        }
        Err(_) => include_str!("fixtures/porter.tsv").to_string(),
    };
    let mut failures = Vec::new();
    let mut count = 0;
    for line in text.lines() {
        let (word, expect) = line.split_once('\t').expect("word<TAB>stem");
        count += 1;
        let got = stem(word);
        if got != expect {
            failures.push(format!("{word}: got {got}, NLTK {expect}"));
        }
    }
    assert!(count > 1_000, "only {count} words in the fixture");
    assert!(
        failures.is_empty(),
        "{} of {count} words differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
