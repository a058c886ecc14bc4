//! The model crate's layering, checked on its sources: each wing (a top-level folder of `src/`)
//! uses only the wings below it, and no two modules import each other, directly or round a
//! loop. Test code (`#[cfg(test)]` modules) and comments are left out: a test may build a model
//! to exercise a kernel, and docs may point anywhere.
//!
//! The order, bottom up, is the one ARCHITECTURE.md draws:
//! `ops` < `io` < `quant` < `lora` < `nn` < `models` < `engine`; and the host comes in through
//! `engine` only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const WINGS: [&str; 7] = ["ops", "io", "quant", "lora", "nn", "models", "engine"];

/// A source file as a module path below `crate`: `ops/attention.rs` → `ops::attention`,
/// `lora/mod.rs` → `lora`, `lib.rs` → ``.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` modules.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut pending_test_attr = false;
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        if let Some(depth) = skip_depth.as_mut() {
            *depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
            if *depth <= 0 {
                skip_depth = None;
            }
            continue;
        }
        if code.starts_with("#[cfg(test)]") {
            pending_test_attr = true;
            continue;
        }
        if pending_test_attr {
            pending_test_attr = false;
            if code.starts_with("mod ")
                || code.starts_with("pub mod ")
                || code.starts_with("pub(crate) mod ")
            {
                let depth = code.matches('{').count() as i32 - code.matches('}').count() as i32;
                if depth > 0 {
                    skip_depth = Some(depth);
                }
                continue;
            }
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The modules `code` names through `crate::a::b::...`: the longest prefix that is a module.
fn used_modules(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let mut best = None;
        let mut prefix = String::new();
        for seg in path.split("::").filter(|s| !s.is_empty()) {
            if !prefix.is_empty() {
                prefix.push_str("::");
            }
            prefix.push_str(seg);
            if modules.contains(&prefix) {
                best = Some(prefix.clone());
            }
        }
        if let Some(m) = best {
            used.insert(m);
        }
    }
    used
}

fn wing_rank(module: &str) -> Option<usize> {
    let wing = module.split("::").next()?;
    WINGS.iter().position(|w| *w == wing)
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges = BTreeMap::new();
    for f in &files {
        let me = module_of(&src, f);
        let code = production_code(&std::fs::read_to_string(f).unwrap());
        let mut used = used_modules(&code, &modules);
        used.remove(&me);
        edges.insert(me, used);
    }
    edges
}

#[test]
fn every_module_lives_in_a_wing() {
    let strays: Vec<String> = graph()
        .into_keys()
        .filter(|m| !m.is_empty() && wing_rank(m).is_none())
        .collect();
    assert!(
        strays.is_empty(),
        "modules outside the wings {WINGS:?}: {strays:?}"
    );
}

#[test]
fn wings_use_only_the_wings_below_them() {
    let mut wrong = Vec::new();
    for (module, used) in graph() {
        let Some(rank) = wing_rank(&module) else {
            continue;
        };
        for u in used {
            if wing_rank(&u).is_some_and(|r| r > rank) {
                wrong.push(format!("{module} uses {u}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "layering broken (order {WINGS:?}):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_module_imports_itself_round_a_loop() {
    // Tarjan's strongly connected components; any component of two or more is a cycle.
    struct Tarjan<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        cycles: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.cycles.push(component);
                }
            }
        }
    }
    let edges = graph();
    let mut t = Tarjan {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    assert!(
        t.cycles.is_empty(),
        "modules importing each other: {:?}",
        t.cycles
    );
}

#[test]
fn the_checker_sees_what_it_checks() {
    // Guards against a checker that passes because it reads nothing.
    let g = graph();
    assert!(g["nn::linear"].contains("lora"), "{:?}", g["nn::linear"]);
    assert!(g["models::falcon"].contains("nn::linear"));
    let code = production_code(
        "use crate::nn::linear::Linear;\n#[cfg(test)]\nmod tests {\n    use crate::engine::Engine;\n}\n// crate::engine\n",
    );
    let modules: BTreeSet<String> = ["nn::linear", "engine", "nn"].map(String::from).into();
    assert_eq!(
        used_modules(&code, &modules),
        BTreeSet::from(["nn::linear".to_string()])
    );
}

#[test]
fn the_host_comes_in_through_the_engine() {
    // The host crate (host/src, beside this crate) names only `adapterlab_model::engine`.
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let mut files = Vec::new();
    rust_files(&host, &mut files);
    assert!(
        files.len() > 20,
        "host sources not found at {}",
        host.display()
    );
    let mut wrong = Vec::new();
    for f in &files {
        let code = production_code(&std::fs::read_to_string(f).unwrap());
        for (i, _) in code.match_indices("adapterlab_model::") {
            let rest = &code[i + "adapterlab_model::".len()..];
            if !rest.starts_with("engine") {
                let what: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                wrong.push(format!("{}: adapterlab_model::{what}", f.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the host goes around engine:\n{}",
        wrong.join("\n")
    );
}
