//! The plugin author's path: `plugins new` projects in Rust, Python, JavaScript and C build
//! with their own build.sh, pass `plugins check` and score predictions in `eval`, all alike;
//! `plugins new` refuses bad names and non-empty folders; `plugins uninstall` removes what
//! `plugins install` put in place and refuses built-ins and unknown names.
//!
//! Building needs the toolchains: scripts/plugin-toolchains.sh installs the system packages
//! (as root on Debian) and each project's build.sh its pinned tools, cached in
//! ~/.cache/adapterlab/toolchains. A missing toolchain fails the test, never skips it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::util::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Cargo's target folder for the Rust projects: beside the host's wasm builds, so that it
/// stays warm between runs, and never the folder of the cargo running this test (locked).
fn rust_project_target() -> PathBuf {
    Path::new(adapterlab::plugin::registry::WASM_BUILD_DIR)
        .ancestors()
        .nth(3)
        .expect("WASM_BUILD_DIR is <target>/wasm-plugins/<triple>/release")
        .join("plugins-new")
}

/// Run `command` in `dir`; on failure, its output.
fn run_script(dir: &Path, command: &mut Command) -> Result<String, String> {
    let out = command
        .current_dir(dir)
        .output()
        .map_err(|e| format!("failed to start {command:?}: {e}"))?;
    let text = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{command:?} in {} failed ({}):\n{text}",
            dir.display(),
            out.status
        ))
    }
}

const ROWS: [(&str, &str, &str); 4] = [
    ("a", "the cat sat on the mat", "the cat the dog"),
    ("b", "", "one two"),
    ("c", "anything", " \t"),
    ("d", "b\u{b}a", "a b"),
];

#[test]
fn plugins_new_projects_build_check_and_score_in_four_languages() {
    let langs = ["rust", "python", "js", "c"];
    let setup_start = Instant::now();
    if let Err(e) = run_script(
        &repo_root(),
        Command::new("bash")
            .arg("scripts/plugin-toolchains.sh")
            .args(langs),
    ) {
        panic!(
            "the plugin toolchains could not be installed, so the projects cannot be built:\n{e}"
        );
    }
    eprintln!(
        "plugins_new: toolchains ready in {:.1?}",
        setup_start.elapsed()
    );

    let t = setup("plugins-new");
    let lines: Vec<String> = ROWS
        .iter()
        .map(|(id, p, r)| {
            serde_json::json!({"id": id, "prediction": p, "reference": r}).to_string()
        })
        .collect();
    let predictions = t.write("p.jsonl", lines.join("\n"));
    let projects = t.path().join("projects");
    std::fs::create_dir_all(&projects).unwrap();

    let mut failures = Vec::new();
    let mut timings = Vec::new();
    for lang in langs {
        let name = format!("overlap-{lang}");
        let score = format!("overlap_{lang}_overlap");
        let created = run_ok(&mut t.cmd(&[
            "plugins",
            "new",
            &name,
            "--lang",
            lang,
            "--dir",
            projects.to_str().unwrap(),
        ]));
        assert!(
            created.contains("./build.sh"),
            "{lang}: names its build command:\n{created}"
        );
        let dir = projects.join(&name);

        let start = Instant::now();
        let built = run_script(
            &dir,
            Command::new("bash")
                .arg("build.sh")
                .env("CARGO_TARGET_DIR", rust_project_target()),
        );
        let build_time = start.elapsed();
        if let Err(e) = built {
            failures.push(format!("{lang}: the project's build.sh failed:\n{e}"));
            continue;
        }
        let wasm = dir.join(format!("{name}.wasm"));
        if !wasm.is_file() {
            failures.push(format!(
                "{lang}: build.sh succeeded but wrote no {}",
                wasm.display()
            ));
            continue;
        }

        let start = Instant::now();
        let check = run_ok(&mut t.cmd(&["plugins", "check", wasm.to_str().unwrap(), "--json"]));
        let check_time = start.elapsed();
        let meta: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(meta["name"], name.as_str(), "{lang}: {meta}");
        assert_eq!(meta["kind"], "metric", "{lang}: {meta}");
        assert_eq!(meta["scores"][0]["name"], score.as_str(), "{lang}: {meta}");

        run_ok(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
        let out = t.path().join(format!("{name}.json"));
        let start = Instant::now();
        run_ok(&mut t.cmd(&[
            "eval",
            "--predictions",
            predictions.to_str().unwrap(),
            "--metrics",
            &name,
            "--json",
            out.to_str().unwrap(),
        ]));
        let eval_time = start.elapsed();
        let doc = read_json(&out);
        let samples = doc["samples"].as_array().unwrap();
        let value = |i: usize| samples[i]["scores"][&score].as_f64();
        let expected = [Some(2.0 / 3.0), Some(0.0), None, Some(1.0)];
        for (i, want) in expected.iter().enumerate() {
            if value(i) != *want {
                failures.push(format!(
                    "{lang}: sample {i}: expected {want:?}, got {}",
                    samples[i]
                ));
            }
        }
        let error = samples[2]["errors"][&name].as_str().unwrap_or_default();
        if !error.contains("reference has no words") {
            failures.push(format!(
                "{lang}: sample c: expected the error \"reference has no words\", got {}",
                samples[2]
            ));
        }
        timings.push(format!(
            "{lang}: build {build_time:.1?}, check {check_time:.1?}, eval {eval_time:.1?}"
        ));
    }
    eprintln!("plugins_new timings:\n  {}", timings.join("\n  "));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn plugins_new_refuses_bad_names_languages_and_non_empty_folders() {
    let t = setup("plugins-new-refuse");
    let parent = t.path().to_str().unwrap();
    for bad in ["Overlap", "1st", "my_metric", "../escape", "a b", ""] {
        let err = run_fail(&mut t.cmd(&["plugins", "new", bad, "--lang", "rust", "--dir", parent]));
        assert!(err.contains("invalid plugin name"), "{bad:?}: {err}");
    }
    assert!(!t.path().join("escape").exists());

    let err = run_fail(&mut t.cmd(&["plugins", "new", "rouge", "--lang", "js", "--dir", parent]));
    assert!(err.contains("built-in plugin"), "{err}");
    assert!(!t.path().join("rouge").exists());

    let err = run_fail(&mut t.cmd(&["plugins", "new", "ok", "--lang", "cobol", "--dir", parent]));
    assert!(err.contains("cobol") && err.contains("rust"), "{err}");

    std::fs::create_dir_all(t.path().join("taken")).unwrap();
    std::fs::write(t.path().join("taken/notes.txt"), "mine").unwrap();
    let err = run_fail(&mut t.cmd(&[
        "plugins", "new", "taken", "--lang", "python", "--dir", parent,
    ]));
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(t.path().join("taken/notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_dir(t.path().join("taken")).unwrap().count(),
        1
    );

    // An existing empty folder is fine.
    std::fs::create_dir_all(t.path().join("empty")).unwrap();
    run_ok(&mut t.cmd(&["plugins", "new", "empty", "--lang", "c", "--dir", parent]));
    assert!(t.path().join("empty/metric.c").is_file());
    assert!(t.path().join("empty/wit/metric.wit").is_file());
}

/// The Rust project is standalone: its own workspace, the SDK as a path dependency inside it,
/// nothing inherited from a workspace.
#[test]
fn plugins_new_rust_project_carries_the_sdk() {
    let t = setup("plugins-new-rust");
    run_ok(&mut t.cmd(&[
        "plugins",
        "new",
        "solo",
        "--lang",
        "rust",
        "--dir",
        t.path().to_str().unwrap(),
    ]));
    let dir = t.path().join("solo");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("[workspace]"), "{manifest}");
    assert!(
        manifest.contains(r#"adapterlab-sdk = { path = "adapterlab-sdk" }"#),
        "{manifest}"
    );
    let sdk = std::fs::read_to_string(dir.join("adapterlab-sdk/Cargo.toml")).unwrap();
    assert!(
        !sdk.contains(".workspace"),
        "the SDK copy must not inherit from a workspace:\n{sdk}"
    );
    for file in ["src/lib.rs", "src/metric.rs", "wit/since_v0.1.0/worlds.wit"] {
        assert!(dir.join("adapterlab-sdk").join(file).is_file(), "{file}");
    }
}

fn store_records(t: &TestDir) -> Vec<String> {
    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    store
        .list_plugins()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

fn listed(t: &TestDir) -> Vec<(String, String)> {
    let list: serde_json::Value =
        serde_json::from_str(&run_ok(&mut t.cmd(&["plugins", "list", "--json"]))).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["source"]["type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn plugins_uninstall_removes_the_file_and_the_record() {
    let t = setup("plugins-uninstall");
    let length = built_component("adapterlab-plugin-length");
    run_ok(&mut t.cmd(&["plugins", "install", length.to_str().unwrap()]));
    let installed = t.data_dir().join("plugins/length.wasm");
    assert!(installed.is_file());
    assert!(listed(&t).iter().any(|(n, _)| n == "length"));
    assert_eq!(store_records(&t), ["length"]);

    // A typo: refused with a suggestion, nothing removed.
    let err = run_fail(&mut t.cmd(&["plugins", "uninstall", "lenght"]));
    assert!(
        err.contains("no installed plugin named \"lenght\""),
        "{err}"
    );
    assert!(err.contains("did you mean \"length\""), "{err}");
    assert!(installed.is_file());

    // Built-ins stay.
    let err = run_fail(&mut t.cmd(&["plugins", "uninstall", "rouge"]));
    assert!(
        err.contains("built-in plugins cannot be uninstalled"),
        "{err}"
    );
    assert!(listed(&t).iter().any(|(n, _)| n == "rouge"));

    let out = run_ok(&mut t.cmd(&["plugins", "uninstall", "length"]));
    assert!(out.contains("uninstalled length"), "{out}");
    assert!(!installed.exists());
    assert!(!listed(&t).iter().any(|(n, _)| n == "length"));
    assert!(store_records(&t).is_empty());

    // Gone: a second uninstall is an unknown name.
    let err = run_fail(&mut t.cmd(&["plugins", "uninstall", "length"]));
    assert!(
        err.contains("no installed plugin named \"length\""),
        "{err}"
    );

    // A record whose file was deleted by hand is still removed.
    run_ok(&mut t.cmd(&["plugins", "install", length.to_str().unwrap()]));
    std::fs::remove_file(&installed).unwrap();
    run_ok(&mut t.cmd(&["plugins", "uninstall", "length"]));
    assert!(store_records(&t).is_empty());
}
