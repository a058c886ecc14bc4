//! Golden test: `fixtures/porter.tsv` holds NLTK's `PorterStemmer().stem(word)` for a large
//! English word list and generated words; the port must agree on every one.

use adapterlab_plugin_rouge::porter::stem;

#[test]
fn matches_nltk_porter_stemmer() {
    let text = include_str!("fixtures/porter.tsv");
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
    assert!(count > 50_000, "only {count} words in the fixture");
    assert!(
        failures.is_empty(),
        "{} of {count} words differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
