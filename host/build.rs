//! Builds the plugin crates (`plugins/*`, and the sandbox test plugins in `tests/plugins/*`)
//! as WebAssembly components for `wasm32-wasip2`, so that a plain `cargo build` yields a
//! binary with its built-in plugins embedded (the approach of wasmtime's test-programs).
//!
//! The nested cargo uses its own target directory: sharing the outer one would deadlock on
//! its lock.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

struct PluginCrate {
    package: String,
    /// The file stem cargo gives the component: the package name with `-` as `_`.
    artifact: String,
    builtin: bool,
    test_only: bool,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());

    let mut crates = Vec::new();
    for (dir, test_only) in [
        (root.join("plugins"), false),
        (root.join("tests").join("plugins"), true),
    ] {
        crates.extend(find_plugin_crates(&dir, test_only));
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("sdk").join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("sdk").join("wit").display()
    );
    println!("cargo:rerun-if-changed={}", root.join("plugins").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("tests").join("plugins").display()
    );
    println!("cargo:rerun-if-env-changed=ADAPTERLAB_SKIP_PLUGIN_BUILD");

    let wasm_target_dir = target_root(&out_dir).join("wasm-plugins");
    if !crates.is_empty() && env::var_os("ADAPTERLAB_SKIP_PLUGIN_BUILD").is_none() {
        ensure_wasm_target();
        build_components(&root, &wasm_target_dir, &crates);
    }

    let release = wasm_target_dir.join(TARGET).join("release");
    let mut generated = String::from(
        "/// Built-in plugin components, compiled from `plugins/*` by build.rs.\n\
         pub static BUILTIN_PLUGINS: &[(&str, &[u8])] = &[\n",
    );
    for c in crates.iter().filter(|c| c.builtin && !c.test_only) {
        let path = release.join(format!("{}.wasm", c.artifact));
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(
            generated,
            "    ({:?}, include_bytes!({:?})),",
            c.package,
            path.display().to_string()
        )
        .unwrap();
    }
    generated.push_str("];\n");
    std::fs::write(out_dir.join("builtin_plugins.rs"), generated).unwrap();
    embed_web_assets(&root.join("web"), &out_dir);

    // Components that are built but not embedded: examples and the sandbox tests' misbehaving
    // plugins. Tests find them here.
    println!("cargo:rustc-env=ADAPTERLAB_WASM_DIR={}", release.display());
}

/// `target/` from `target/[<triple>/]<profile>/build/<pkg>-<hash>/out`.
fn target_root(out_dir: &Path) -> PathBuf {
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR has the usual depth");
    let parent = profile_dir.parent().expect("profile dir has a parent");
    let triple = env::var("TARGET").unwrap_or_default();
    if parent
        .file_name()
        .is_some_and(|n| n.to_string_lossy() == triple)
    {
        parent.parent().unwrap_or(parent).to_path_buf()
    } else {
        parent.to_path_buf()
    }
}

fn find_plugin_crates(dir: &Path, test_only: bool) -> Vec<PluginCrate> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let manifest = path.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let value: toml::Value = match toml::from_str(&text) {
            Ok(v) => v,
            Err(e) => panic!("{}: {e}", manifest.display()),
        };
        let Some(package) = value.get("package") else {
            continue;
        };
        // Library crates shared by plugins (e.g. report-common) are not components.
        let is_component = value
            .get("lib")
            .and_then(|l| l.get("crate-type"))
            .and_then(|t| t.as_array())
            .is_some_and(|types| types.iter().any(|t| t.as_str() == Some("cdylib")));
        if !is_component {
            continue;
        }
        let name = package
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap()
            .to_string();
        let builtin = package
            .get("metadata")
            .and_then(|m| m.get("adapterlab"))
            .and_then(|a| a.get("builtin"))
            .and_then(|b| b.as_bool())
            .unwrap_or(true);
        out.push(PluginCrate {
            artifact: name.replace('-', "_"),
            package: name,
            builtin,
            test_only,
        });
    }
    out
}

/// Machines here set RUSTUP_AUTO_INSTALL=0, so rust-toolchain.toml's target list is not
/// installed by itself: add the target as cargo-component does.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(sysroot) = sysroot
        && Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .exists()
    {
        return;
    }
    println!(
        "cargo:warning=installing the {TARGET} target with rustup (needed for the built-in plugins)"
    );
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    match status {
        Ok(s) if s.success() => {}
        _ => panic!(
            "the {TARGET} Rust target is missing and `rustup target add {TARGET}` failed; install it and build again"
        ),
    }
}

fn build_components(root: &Path, target_dir: &Path, crates: &[PluginCrate]) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    for c in crates {
        cmd.args(["-p", &c.package]);
    }
    // Flags meant for the host (e.g. CUDA link paths) must not reach the wasm linker.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .expect("failed to run cargo for the plugin components");
    if !output.status.success() {
        panic!(
            "building the plugin components failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// List every file under `web/` for the server to embed (the dashboard needs no build step).
fn embed_web_assets(web: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-changed={}", web.display());
    let mut files = Vec::new();
    collect_files(web, web, &mut files);
    files.sort();
    let mut generated = String::from("pub static WEB_ASSETS: &[(&str, &[u8])] = &[\n");
    for (rel, abs) in files {
        writeln!(
            generated,
            "    ({rel:?}, include_bytes!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    generated.push_str("];\n");
    std::fs::write(out_dir.join("web_assets.rs"), generated).unwrap();
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "node_modules" {
            continue;
        }
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, path));
        }
    }
}
