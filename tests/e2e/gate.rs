//! `runs compare --fail-on-regression`: the CI gate's exit codes and its Markdown table, on
//! runs built to regress, to improve and to stay the same.

use serde_json::json;

use crate::util::*;

/// An evaluation named `name` whose predictions are the references (good) or not (bad).
fn run(t: &TestDir, name: &str, good: bool) {
    let lines: Vec<String> = (0..30)
        .map(|i| {
            let reference = format!("the cat number {i} sat on the warm mat today");
            let prediction = if good {
                reference.clone()
            } else {
                format!("a dog {i} ran far away")
            };
            json!({"id": i.to_string(), "prediction": prediction, "reference": reference})
                .to_string()
        })
        .collect();
    let p = t.write(&format!("{name}.jsonl"), lines.join("\n"));
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "rouge,bleu",
        "--name",
        name,
    ]));
}

#[test]
fn the_regression_gate_fails_only_on_a_real_regression() {
    let t = setup("gate");
    run(&t, "base", true);
    run(&t, "same", true);
    run(&t, "worse", false);

    let out = t
        .cmd(&[
            "runs",
            "compare",
            "base",
            "worse",
            "--fail-on-regression",
            "rouge1,bleu",
            "--format",
            "markdown",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("| run | score | delta |") && table.contains("regression"),
        "{table}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("regression: "));

    // No regression: the same outputs; an improvement is no regression either.
    run_ok(&mut t.cmd(&[
        "runs",
        "compare",
        "base",
        "same",
        "--fail-on-regression",
        "rouge1,bleu",
    ]));
    run_ok(&mut t.cmd(&[
        "runs",
        "compare",
        "worse",
        "base",
        "--fail-on-regression",
        "bleu",
    ]));
    // A tolerance larger than the drop lets it pass.
    run_ok(&mut t.cmd(&[
        "runs",
        "compare",
        "base",
        "worse",
        "--fail-on-regression",
        "rouge1",
        "--min-delta",
        "1.5",
    ]));
    // A gate on a score that does not exist is an error, never a pass.
    let e = run_fail(&mut t.cmd(&[
        "runs",
        "compare",
        "base",
        "same",
        "--fail-on-regression",
        "rougeX",
    ]));
    assert!(e.contains("rougeX") && e.contains("rouge1"), "{e}");
}
