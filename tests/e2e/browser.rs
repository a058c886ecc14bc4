//! The dashboard in a real browser (Debian's Chromium driven by playwright-core) against the
//! real server: launch evaluations from the form, watch them finish, compare two runs, drill
//! into a sample, launch a training run and watch it live (on the tiny model of the train
//! tests, so it takes seconds), visit every page. Screenshots go to tests/artifacts/.

use std::path::PathBuf;
use std::process::Command;

use crate::server::start_with;
use crate::train::{dataset, tiny_model};
use crate::util::*;

#[test]
fn dashboard_flows_in_chromium() {
    if std::env::var_os("ADAPTERLAB_SKIP_BROWSER").is_some() {
        eprintln!("ADAPTERLAB_SKIP_BROWSER is set: skipping the browser tests");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let t = setup("browser");
    // The training step's tiny model and dataset live in the test's folder.
    let server = start_with(&t, &["--allow-path", t.path().to_str().unwrap()], &[]);
    let model = tiny_model(&t);
    let data = dataset(&t);
    let fixtures = root.join("tests/browser/fixtures");
    let artifacts = root.join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let status = Command::new("bash")
        .arg(root.join("tests/browser/run.sh"))
        .env("ADAPTERLAB_URL", &server.base)
        .env("ADAPTERLAB_TOKEN", "test-token-123")
        .env(
            "ADAPTERLAB_PREDICTIONS_A",
            fixtures.join("predictions-a.jsonl"),
        )
        .env(
            "ADAPTERLAB_PREDICTIONS_B",
            fixtures.join("predictions-b.jsonl"),
        )
        .env("ADAPTERLAB_ARTIFACTS", &artifacts)
        .env(
            "ADAPTERLAB_PLUGIN_WASM",
            built_component("adapterlab-plugin-length"),
        )
        .env("ADAPTERLAB_TEST_TRAIN", "1")
        .env("ADAPTERLAB_TRAIN_MODEL", &model)
        .env("ADAPTERLAB_TRAIN_DATASET", &data)
        // Long enough to watch it run (the form's logging_steps is 20), short enough for CI:
        // ~90 ms a step on two CPU cores.
        .env("ADAPTERLAB_TRAIN_MAX_STEPS", "300")
        .status()
        .expect("bash runs tests/browser/run.sh");
    assert!(
        status.success(),
        "the browser tests failed; screenshots are in {}",
        artifacts.display()
    );
}
