//! The command line's surface: help, plugin listing and checking, error reporting.

use crate::util::*;

#[test]
fn help_explains_each_command() {
    let t = setup("help");
    let out = run_ok(&mut t.cmd(&["--help"]));
    for cmd in ["eval", "runs", "report", "plugins"] {
        assert!(out.contains(cmd), "--help lacks {cmd}:\n{out}");
    }
    let out = run_ok(&mut t.cmd(&["plugins", "check", "--help"]));
    assert!(out.contains("Validate a component"), "{out}");
}

#[test]
fn plugins_list_shows_builtins_and_the_cache_hits_on_a_second_start() {
    let t = setup("plugins-list");
    let (first, first_err) = run_ok_both(
        t.cmd(&["-v", "plugins", "list", "--json"])
            .env("RUST_LOG", "adapterlab=debug"),
    );
    let list: serde_json::Value = serde_json::from_str(&first).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(!names.is_empty());
    for p in list.as_array().unwrap() {
        assert_eq!(p["source"]["type"], "builtin");
        assert!(p["kind"].is_string() && p["version"].is_string() && p["capabilities"].is_array());
    }
    assert!(
        first_err.contains("compiled"),
        "first start should compile:\n{first_err}"
    );
    let (_, second_err) = run_ok_both(
        t.cmd(&["-v", "plugins", "list", "--json"])
            .env("RUST_LOG", "adapterlab=debug"),
    );
    let cached = second_err.matches("from the component cache").count();
    assert_eq!(
        cached,
        names.len(),
        "every plugin should load from the cache on the second start:\n{second_err}"
    );
    let table = run_ok(&mut t.cmd(&["plugins", "list"]));
    assert!(
        table.contains("NAME") && table.contains("built-in"),
        "{table}"
    );
}

#[test]
fn plugins_check_accepts_a_component_and_explains_a_bad_one() {
    let t = setup("plugins-check");
    let good = built_component("adapterlab-test-misbehave");
    let out = run_ok(&mut t.cmd(&["plugins", "check", good.to_str().unwrap()]));
    assert!(out.contains("ok: misbehave 0.1.0 (metric plugin"), "{out}");
    assert!(out.contains("score chars"), "{out}");

    let not_wasm = t.write("not.wasm", b"hello");
    let err = run_fail(&mut t.cmd(&["plugins", "check", not_wasm.to_str().unwrap()]));
    assert!(
        err.contains("not.wasm") && err.contains("not a valid plugin component"),
        "{err}"
    );

    // A core module is not a component.
    let core = t.write("core.wasm", b"\0asm\x01\0\0\0");
    let err = run_fail(&mut t.cmd(&["plugins", "check", core.to_str().unwrap()]));
    assert!(err.contains("not a valid plugin component"), "{err}");

    let err = run_fail(&mut t.cmd(&["plugins", "check", "/nonexistent.wasm"]));
    assert!(err.contains("/nonexistent.wasm"), "{err}");
}

#[test]
fn plugins_install_makes_a_plugin_available() {
    let t = setup("plugins-install");
    let good = built_component("adapterlab-test-misbehave");
    let out = run_ok(&mut t.cmd(&["plugins", "install", good.to_str().unwrap()]));
    assert!(out.contains("installed: misbehave"), "{out}");
    let list = run_ok(&mut t.cmd(&["plugins", "list", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let m = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "misbehave")
        .expect("installed plugin listed");
    assert_eq!(m["source"]["type"], "file");
    assert_eq!(m["language"], "Rust");
}
