//! `adapterlab eval`, `runs` and `report` on the built-in metrics.

use crate::util::*;

#[test]
fn bad_input_lines_are_reported_with_their_numbers() {
    let t = setup("eval-bad-input");
    let p = t.write("p.jsonl", b"{\"id\":\"a\",\"prediction\":\"x\",\"reference\":\"y\"}\n{oops\n{\"id\":\"b\",\"reference\":\"y\"}\n\xff\n");
    let err = run_fail(&mut t.cmd(&["eval", "--predictions", p.to_str().unwrap(), "--metrics", "misbehave"]));
    assert!(err.contains("line 2: invalid JSON"), "{err}");
    assert!(err.contains("line 3: missing field `prediction`"), "{err}");
    assert!(err.contains("line 4: not valid UTF-8"), "{err}");
}

#[test]
fn unknown_metrics_get_a_suggestion() {
    let t = setup("eval-unknown");
    let p = t.write("p.jsonl", r#"{"id":"a","prediction":"x","reference":"y"}"#);
    let err = run_fail(&mut t.cmd(&["eval", "--predictions", p.to_str().unwrap(), "--metrics", "misbehav"]));
    assert!(err.contains("no plugin named \"misbehav\""), "{err}");
}
