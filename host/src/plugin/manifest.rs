//! What the host knows about a plugin: its manifest (from its `info` export), checked against
//! the contract's rules, plus where it came from and what language built it.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plugin::host::capability_name;
use crate::plugin::wit::types::{
    Capability, FormatterInfo, Manifest, MetricInfo, ReporterInfo, ScoreSpec,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Metric,
    Formatter,
    Reporter,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Metric => "metric",
            PluginKind::Formatter => "formatter",
            PluginKind::Reporter => "reporter",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a plugin was loaded from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type", content = "path")]
pub enum PluginSource {
    /// Compiled into the adapterlab binary.
    Builtin,
    /// A component file (installed in the data directory, or checked from anywhere).
    File(PathBuf),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Builtin => f.write_str("built-in"),
            PluginSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The `info` export of any plugin kind.
pub(crate) enum AnyInfo {
    Metric(MetricInfo),
    Formatter(FormatterInfo),
    Reporter(ReporterInfo),
}

/// Everything the host knows about a loaded plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginMeta {
    pub name: String,
    pub version: String,
    pub description: String,
    pub kind: PluginKind,
    #[serde(with = "capability_names")]
    pub capabilities: Vec<Capability>,
    pub source: PluginSource,
    /// The language that built the component, from its `producers` section.
    pub language: String,
    /// The contract version it implements.
    pub contract: String,
    /// Metric plugins: whether a sample's scores depend on it alone, so the host may split
    /// the samples across parallel instances (declared by contract 0.2.0 metrics; false for
    /// 0.1.0 ones).
    #[serde(default)]
    pub independent_samples: bool,
    pub sha256: String,
    pub size_bytes: usize,
    /// Metric plugins: the scores they produce.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<ScoreSpec>,
    /// Reporter plugins: the format name for `report --format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Formatter plugins: the fields a row must have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_fields: Vec<String>,
}

impl PluginMeta {
    pub(crate) fn from_info(
        info: AnyInfo,
        contract: &str,
        source: PluginSource,
        language: String,
        sha256: String,
        size_bytes: usize,
    ) -> Result<Self, String> {
        let independent_samples = matches!(&info, AnyInfo::Metric(i) if i.independent_samples);
        let (kind, manifest, scores, format, required_fields) = match info {
            AnyInfo::Metric(i) => (PluginKind::Metric, i.manifest, i.scores, None, Vec::new()),
            AnyInfo::Formatter(i) => (
                PluginKind::Formatter,
                i.manifest,
                Vec::new(),
                None,
                i.required_fields,
            ),
            AnyInfo::Reporter(i) => (
                PluginKind::Reporter,
                i.manifest,
                Vec::new(),
                Some(i.format),
                Vec::new(),
            ),
        };
        check_manifest(&manifest)?;
        if kind == PluginKind::Metric {
            check_scores(&scores)?;
        }
        if let Some(format) = &format
            && !is_identifier(format)
        {
            return Err(format!(
                "reporter format {format:?} must be lowercase letters, digits, '-' or '_'"
            ));
        }
        let Manifest {
            name,
            version,
            description,
            mut capabilities,
        } = manifest;
        capabilities.dedup();
        Ok(PluginMeta {
            name,
            version,
            description,
            kind,
            capabilities,
            source,
            language,
            contract: contract.to_string(),
            independent_samples,
            sha256,
            size_bytes,
            scores,
            format,
            required_fields,
        })
    }

    /// `built-in` or `user`: what a run records of where its plugin came from.
    pub fn provenance(&self) -> &'static str {
        match self.source {
            PluginSource::Builtin => "built-in",
            PluginSource::File(_) => "user",
        }
    }

    pub fn capability_names(&self) -> Vec<&'static str> {
        self.capabilities
            .iter()
            .map(|c| capability_name(*c))
            .collect()
    }
}

/// A plugin name: what `install` turns into a file name, so it never holds a path separator.
pub(crate) fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

/// Score names are flat and global (`rouge1`, `rougeLsum`, `bertscore_f1`): letters of either
/// case, digits, `-`, `_`, starting with a letter.
fn is_score_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
}

fn check_manifest(m: &Manifest) -> Result<(), String> {
    if !is_identifier(&m.name) {
        return Err(format!(
            "manifest name {:?} must start with a lowercase letter and hold only lowercase letters, digits, '-' or '_' (at most 64)",
            m.name
        ));
    }
    let parts: Vec<&str> = m
        .version
        .split(['-', '+'])
        .next()
        .unwrap_or("")
        .split('.')
        .collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "manifest version {:?} is not a semantic version such as 0.1.0",
            m.version
        ));
    }
    Ok(())
}

fn check_scores(scores: &[ScoreSpec]) -> Result<(), String> {
    if scores.is_empty() {
        return Err("a metric must declare at least one score".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in scores {
        if !is_score_name(&s.name) {
            return Err(format!(
                "score name {:?} must start with a letter and hold only letters, digits, '-' or '_'",
                s.name
            ));
        }
        if !seen.insert(&s.name) {
            return Err(format!("score {:?} is declared twice", s.name));
        }
        if !(s.min.is_finite() && s.max.is_finite() && s.min <= s.max) {
            return Err(format!(
                "score {:?} has an invalid range [{}, {}]",
                s.name, s.min, s.max
            ));
        }
    }
    Ok(())
}

/// The guest language, from the component's `producers` sections. Components built from
/// Python or JavaScript embed an interpreter written in C and Rust, so their tools' marks are
/// looked for first: ComponentizeJS records itself; componentize-py leaves no producers entry
/// but links its runtime library by name.
pub fn detect_language(bytes: &[u8]) -> String {
    let mut languages: Vec<String> = Vec::new();
    let mut tools: Vec<String> = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(wasmparser::Payload::CustomSection(reader)) = payload else {
            continue;
        };
        if reader.name() != "producers" {
            continue;
        }
        let Ok(producers) = wasmparser::ProducersSectionReader::new(wasmparser::BinaryReader::new(
            reader.data(),
            reader.data_offset(),
        )) else {
            continue;
        };
        for field in producers.into_iter().flatten() {
            let names = field
                .values
                .into_iter()
                .flatten()
                .map(|v| v.name.to_string());
            match field.name {
                "language" => languages.extend(names),
                "processed-by" => tools.extend(names),
                _ => {}
            }
        }
    }
    if tools.iter().any(|t| t == "ComponentizeJS") || languages.iter().any(|l| l == "JavaScript") {
        return "JavaScript".into();
    }
    if contains(bytes, b"componentize_py_runtime") || languages.iter().any(|l| l == "Python") {
        return "Python".into();
    }
    for (mark, name) in [
        ("Go", "Go"),
        ("C#", "C#"),
        ("Rust", "Rust"),
        ("C_plus_plus", "C++"),
        ("C", "C"),
    ] {
        if languages.iter().any(|l| l.starts_with(mark)) {
            return name.into();
        }
    }
    "unknown".into()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

mod capability_names {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::plugin::host::capability_name;
    use crate::plugin::wit::types::Capability;

    pub fn serialize<S: Serializer>(caps: &[Capability], s: S) -> Result<S::Ok, S::Error> {
        caps.iter()
            .map(|c| capability_name(*c))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Capability>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names
            .iter()
            .map(|n| match n.as_str() {
                "log" => Ok(Capability::Log),
                "config" => Ok(Capability::Config),
                "embed" => Ok(Capability::Embed),
                "chat" => Ok(Capability::Chat),
                other => Err(serde::de::Error::custom(format!(
                    "unknown capability {other:?}"
                ))),
            })
            .collect()
    }
}
