//! The end-to-end test harness: a temporary data directory per test and a command builder
//! for the real `adapterlab` binary, whose failures print the command and its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct TestDir {
    pub dir: tempfile::TempDir,
}

/// A fresh temporary directory for the test `name`.
pub fn setup(name: &str) -> TestDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("adapterlab-{name}-"))
        .tempdir()
        .unwrap();
    TestDir { dir }
}

impl TestDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    /// `adapterlab --data-dir <tmp>/data ARGS…`, isolated from the user's environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_adapterlab"));
        cmd.arg("--data-dir").arg(self.data_dir()).args(args);
        cmd.env_remove("ADAPTERLAB_DATA_DIR")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL");
        cmd.env("NO_COLOR", "1");
        cmd
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run and require success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("failed to start adapterlab");
    assert!(
        out.status.success(),
        "expected success\n{}",
        describe(cmd, &out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run and require failure; returns stderr.
pub fn run_fail(cmd: &mut Command) -> String {
    let out = cmd.output().expect("failed to start adapterlab");
    assert!(
        !out.status.success(),
        "expected failure\n{}",
        describe(cmd, &out)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// Run and return (stdout, stderr) regardless of status, asserting success.
pub fn run_ok_both(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("failed to start adapterlab");
    assert!(
        out.status.success(),
        "expected success\n{}",
        describe(cmd, &out)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A component built alongside the host but not embedded (examples, sandbox test plugins).
pub fn built_component(crate_name: &str) -> PathBuf {
    let path = Path::new(adapterlab::plugin::registry::WASM_BUILD_DIR)
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
