//! `adapterlab eval`, `runs` and `report` on the built-in metrics.

use crate::util::*;

#[test]
fn bad_input_lines_are_reported_with_their_numbers() {
    let t = setup("eval-bad-input");
    let p = t.write("p.jsonl", b"{\"id\":\"a\",\"prediction\":\"x\",\"reference\":\"y\"}\n{oops\n{\"id\":\"b\",\"reference\":\"y\"}\n\xff\n");
    let err = run_fail(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "misbehave",
    ]));
    assert!(err.contains("line 2: invalid JSON"), "{err}");
    assert!(err.contains("line 3: missing field `prediction`"), "{err}");
    assert!(err.contains("line 4: not valid UTF-8"), "{err}");
}

#[test]
fn unknown_metrics_get_a_suggestion() {
    let t = setup("eval-unknown");
    let p = t.write("p.jsonl", r#"{"id":"a","prediction":"x","reference":"y"}"#);
    let err = run_fail(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "misbehav",
    ]));
    assert!(err.contains("no plugin named \"misbehav\""), "{err}");
}

fn write_predictions(t: &TestDir, name: &str, rows: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let lines: Vec<String> = rows
        .iter()
        .map(|(id, p, r)| serde_json::json!({"id": id, "prediction": p, "reference": r, "source": "A: hi\nB: hello"}).to_string())
        .collect();
    t.write(name, lines.join("\n"))
}

const REFERENCES: &[(&str, &str)] = &[
    (
        "1",
        "Amanda baked cookies and will bring Jerry some tomorrow.",
    ),
    (
        "2",
        "Olivia and Olivier are voting for liberals in this election.",
    ),
    ("3", "Tim is running late, he will be there in ten minutes."),
    ("4", "Lenny can't decide which trousers to buy."),
    ("5", "Emma will be home soon and she will let Will know."),
    ("6", "Jane is in Warsaw. Ollie and Jane have a party."),
];

#[test]
fn eval_stores_scores_and_runs_compare_and_report() {
    let t = setup("eval-flow");
    // Version A copies half the words; version B is close to the reference.
    let a: Vec<(&str, String, &str)> = REFERENCES
        .iter()
        .map(|(id, r)| (*id, r.split(' ').take(4).collect::<Vec<_>>().join(" "), *r))
        .collect();
    let b: Vec<(&str, String, &str)> = REFERENCES
        .iter()
        .map(|(id, r)| (*id, r.replace('.', "!"), *r))
        .collect();
    let pa = write_predictions(
        &t,
        "a.jsonl",
        &a.iter()
            .map(|(i, p, r)| (*i, p.as_str(), *r))
            .collect::<Vec<_>>(),
    );
    let pb = write_predictions(
        &t,
        "b.jsonl",
        &b.iter()
            .map(|(i, p, r)| (*i, p.as_str(), *r))
            .collect::<Vec<_>>(),
    );
    let out_a = t.path().join("a.json");
    let table = run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        pa.to_str().unwrap(),
        "--metrics",
        "rouge,bleu",
        "--name",
        "adapter-a",
        "--json",
        out_a.to_str().unwrap(),
    ]));
    assert!(
        table.contains("rougeL") && table.contains("95% CI"),
        "{table}"
    );
    let doc = read_json(&out_a);
    let run_a = doc["run_id"].as_str().unwrap().to_string();
    for score in ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"] {
        let agg = &doc["aggregates"][score];
        let (mean, low, high) = (
            agg["mean"].as_f64().unwrap(),
            agg["low"].as_f64().unwrap(),
            agg["high"].as_f64().unwrap(),
        );
        assert!(low <= mean && mean <= high, "{score}: {agg}");
    }
    assert!(
        doc["corpus"]["bleu"].as_f64().is_some(),
        "corpus BLEU is an aggregate: {}",
        doc["corpus"]
    );
    let samples = doc["samples"].as_array().unwrap();
    assert_eq!(samples.len(), REFERENCES.len());
    assert!(
        samples
            .iter()
            .all(|s| s["errors"].as_object().unwrap().is_empty())
    );

    let out_b = t.path().join("b.json");
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        pb.to_str().unwrap(),
        "--metrics",
        "rouge,bleu",
        "--name",
        "adapter-b",
        "--json",
        out_b.to_str().unwrap(),
    ]));
    let doc_b = read_json(&out_b);
    let run_b = doc_b["run_id"].as_str().unwrap().to_string();
    // Identical words score 1; punctuation is not a token for ROUGE.
    assert_eq!(doc_b["aggregates"]["rouge1"]["mean"].as_f64().unwrap(), 1.0);

    let list = run_ok(&mut t.cmd(&["runs", "list"]));
    assert!(
        list.contains("adapter-a") && list.contains("adapter-b") && list.contains("done"),
        "{list}"
    );
    // A prefix that reaches into the random bits of the UUIDv7: the first 12 hex digits
    // are the clock, which two runs in the same few milliseconds share.
    let show = run_ok(&mut t.cmd(&["runs", "show", &run_a[..20], "--json", "--samples"]));
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["name"], "adapter-a");
    assert_eq!(show["samples"].as_array().unwrap().len(), REFERENCES.len());

    let cmp = run_ok(&mut t.cmd(&["runs", "compare", "adapter-a", "adapter-b", "--json"]));
    let cmp: serde_json::Value = serde_json::from_str(&cmp).unwrap();
    let rouge1 = cmp["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["score"] == "rouge1")
        .unwrap();
    assert_eq!(rouge1["run"], run_b.as_str());
    assert_eq!(rouge1["paired"], REFERENCES.len());
    assert!(rouge1["difference"]["mean"].as_f64().unwrap() > 0.3);
    assert_eq!(rouge1["verdict"], true, "{rouge1}");
    let human = run_ok(&mut t.cmd(&["runs", "compare", &run_a, &run_b]));
    assert!(human.contains("better"), "{human}");

    for (format, needle) in [("md", "rouge1"), ("html", "<svg"), ("csv", "run_id")] {
        let out = t.path().join(format!("report.{format}"));
        run_ok(&mut t.cmd(&[
            "report",
            "adapter-a,adapter-b",
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ]));
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains(needle), "{format} report lacks {needle}");
    }
    let single = run_ok(&mut t.cmd(&["report", "adapter-a", "--format", "md"]));
    assert!(single.contains("adapter-a"), "{single}");
    let err = run_fail(&mut t.cmd(&["report", "adapter-a", "--format", "pdf"]));
    assert!(err.contains("pdf"), "{err}");
}

#[test]
fn stemming_can_be_turned_off() {
    let t = setup("eval-stemmer");
    let p = write_predictions(
        &t,
        "p.jsonl",
        &[("1", "the cats are running", "the cat runs")],
    );
    let with = t.path().join("with.json");
    let without = t.path().join("without.json");
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "rouge",
        "--json",
        with.to_str().unwrap(),
    ]));
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "rouge",
        "--set",
        "rouge.use_stemmer=false",
        "--json",
        without.to_str().unwrap(),
    ]));
    let r = |path: &std::path::Path| {
        read_json(path)["samples"][0]["scores"]["rouge1"]
            .as_f64()
            .unwrap()
    };
    assert!(
        r(&with) > r(&without),
        "stemming matches cats~cat and running~runs: {} vs {}",
        r(&with),
        r(&without)
    );
}

#[test]
fn odd_inputs_get_scores_or_clear_errors() {
    let t = setup("eval-odd");
    let big = "word ".repeat(200_000);
    let rows = [
        serde_json::json!({"id": "empty", "prediction": "", "reference": "a reference"}),
        serde_json::json!({"id": "unicode", "prediction": "Zoë visits Łódź 🚀", "reference": "Zoë is in Łódź"}),
        serde_json::json!({"id": "big", "prediction": big, "reference": "word"}),
    ];
    let p = t.write(
        "p.jsonl",
        rows.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let out = t.path().join("out.json");
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "rouge,bleu",
        "--json",
        out.to_str().unwrap(),
    ]));
    let doc = read_json(&out);
    let samples = doc["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    let empty = samples.iter().find(|s| s["id"] == "empty").unwrap();
    assert_eq!(empty["scores"]["rouge1"].as_f64(), Some(0.0));
    let unicode = samples.iter().find(|s| s["id"] == "unicode").unwrap();
    assert!(unicode["scores"]["rouge1"].as_f64().unwrap() > 0.0);
    let big = samples.iter().find(|s| s["id"] == "big").unwrap();
    assert!(
        big["scores"]["rouge1"].as_f64().is_some() || big["errors"]["rouge"].is_string(),
        "{big}"
    );
}

#[test]
fn references_can_be_scored_as_the_human_baseline() {
    let t = setup("eval-references");
    let p = write_predictions(
        &t,
        "p.jsonl",
        &[
            ("1", "the cat sat", "the cat sat on the mat"),
            ("2", "a dog", "a dog barked"),
        ],
    );
    let out = t.path().join("out.json");
    let table = run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "rouge",
        "--score-references",
        "--json",
        out.to_str().unwrap(),
    ]));
    assert!(table.contains("REFERENCE (HUMAN)"), "{table}");
    let doc = read_json(&out);
    assert_eq!(
        doc["reference_aggregates"]["rouge1"]["mean"].as_f64(),
        Some(1.0),
        "a reference scored against itself"
    );
    assert!(doc["aggregates"]["rouge1"]["mean"].as_f64().unwrap() < 1.0);
    assert_eq!(
        doc["samples"][0]["reference_scores"]["rougeL"].as_f64(),
        Some(1.0)
    );
}

#[test]
fn the_reference_formatter_runs_through_the_host() {
    use adapterlab::plugin::{CallContext, Limits, PluginKind, Registry, Runtime};
    let t = setup("formatter");
    let runtime = Runtime::new(Some(t.path().join("cache")), Limits::default()).unwrap();
    let registry = Registry::load(&runtime, &t.path().join("plugins")).unwrap();
    let formatter = registry.get("summarize", PluginKind::Formatter).unwrap();
    let rows = vec![
        vec![
            ("dialogue".to_string(), "A: hi\nB: hello".to_string()),
            ("summary".to_string(), "They greet.".to_string()),
        ],
        vec![("summary".to_string(), "no dialogue".to_string())],
    ];
    let out = formatter
        .session(CallContext::default())
        .unwrap()
        .format(&rows)
        .unwrap();
    let first = out[0].as_ref().unwrap();
    assert!(
        first.prompt.starts_with("### Instruction:\n"),
        "{:?}",
        first.prompt
    );
    assert!(
        first
            .prompt
            .ends_with("\n\n### Dialogue:\nA: hi\nB: hello\n\n### Summary:\n"),
        "{:?}",
        first.prompt
    );
    assert_eq!(first.completion.as_deref(), Some("They greet."));
    assert!(out[1].as_ref().unwrap_err().contains("dialogue"));
}
