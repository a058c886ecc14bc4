//! Reading predictions files: JSON Lines with `id`, `prediction`, `reference` (or
//! `references`, a non-empty list of strings) and an optional `source`. Every bad line is
//! reported with its number; nothing is silently dropped.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde_json::Value;

/// One sample to evaluate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PredictionRow {
    pub id: String,
    pub prediction: String,
    /// The reference, or the first of several.
    pub reference: String,
    /// Every reference, when there are several (`reference` is the first); empty when there
    /// is one, so single-reference rows read and store as they always did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    #[serde(default)]
    pub source: Option<String>,
}

impl PredictionRow {
    /// A row with one reference.
    pub fn new(id: String, prediction: String, reference: String, source: Option<String>) -> Self {
        PredictionRow {
            id,
            prediction,
            reference,
            references: Vec::new(),
            source,
        }
    }

    /// Every reference, in order (one or more).
    pub fn all_references(&self) -> Vec<String> {
        all_references(&self.reference, &self.references)
    }
}

/// The one rule for the pair of fields that holds a sample's references (here and in the
/// store): `references` when it is set, else the one `reference`.
pub fn all_references(reference: &str, references: &[String]) -> Vec<String> {
    if references.is_empty() {
        vec![reference.to_string()]
    } else {
        references.to_vec()
    }
}

/// The two fields from a list of references: the first, and the whole list when it holds
/// more than one.
pub fn split_references(mut references: Vec<String>) -> (String, Vec<String>) {
    if references.len() > 1 {
        (references[0].clone(), references)
    } else {
        (references.pop().unwrap_or_default(), Vec::new())
    }
}

/// A problem with one line of the input.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based; 0 for the file as a whole.
    pub line: usize,
    pub message: String,
}

/// Every problem found in a predictions file.
#[derive(Debug, thiserror::Error)]
pub struct InputErrors {
    pub path: String,
    pub errors: Vec<LineError>,
}

impl fmt::Display for InputErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 20;
        // Line 0 is the file as a whole (it holds no samples): no line to point at.
        if let [only] = self.errors.as_slice()
            && only.line == 0
        {
            return write!(f, "{}: {}", self.path, only.message);
        }
        write!(f, "{}: {} bad line(s)", self.path, self.errors.len())?;
        for e in self.errors.iter().take(SHOWN) {
            write!(f, "\n  line {}: {}", e.line, e.message)?;
        }
        if self.errors.len() > SHOWN {
            write!(f, "\n  … and {} more", self.errors.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Parse a predictions file. Blank lines are skipped; everything else must be a valid row.
pub fn read_predictions(path: &Path) -> anyhow::Result<Vec<PredictionRow>> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("failed to read {}: {e}", path.display()))?;
    parse_predictions(&bytes).map_err(|mut e| {
        e.path = path.display().to_string();
        anyhow::Error::new(e)
    })
}

pub fn parse_predictions(bytes: &[u8]) -> Result<Vec<PredictionRow>, InputErrors> {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t,
            Err(e) => {
                errors.push(LineError {
                    line,
                    message: format!("not valid UTF-8 (byte {})", e.valid_up_to()),
                });
                continue;
            }
        };
        let text = text.trim_start_matches('\u{feff}');
        if text.trim().is_empty() {
            continue;
        }
        match parse_row(text) {
            Ok(row) => {
                if let Some(previous) = first_line.insert(row.id.clone(), line) {
                    errors.push(LineError {
                        line,
                        message: format!("duplicate id {:?} (first on line {previous}); ids pair samples across runs and must be unique", row.id),
                    });
                    continue;
                }
                rows.push(row);
            }
            Err(message) => errors.push(LineError { line, message }),
        }
    }
    if rows.is_empty() && errors.is_empty() {
        errors.push(LineError {
            line: 0,
            message: "the file holds no samples".into(),
        });
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(InputErrors {
            path: "<input>".into(),
            errors,
        })
    }
}

fn parse_row(text: &str) -> Result<PredictionRow, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    row_from_value(&value)
}

/// A row from an already-parsed JSON value (e.g. an API request's `predictions` array).
pub fn row_from_value(value: &Value) -> Result<PredictionRow, String> {
    let Value::Object(map) = value else {
        return Err("expected a JSON object".into());
    };
    let id = match map.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(_)) => return Err("field `id` is empty".into()),
        Some(other) => {
            return Err(format!(
                "field `id` must be a string or number, not {}",
                type_name(other)
            ));
        }
        None => return Err("missing field `id`".into()),
    };
    let text_field = |name: &str, required: bool| -> Result<Option<String>, String> {
        match map.get(name) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Null) | None if !required => Ok(None),
            None => Err(format!("missing field `{name}`")),
            Some(other) => Err(format!(
                "field `{name}` must be a string, not {}",
                type_name(other)
            )),
        }
    };
    let (reference, references) = match (map.get("reference"), map.get("references")) {
        (Some(_), Some(_)) => {
            return Err(
                "both `reference` and `references`: give one (`references` for several)".into(),
            );
        }
        (None, Some(Value::Array(items))) => {
            if items.is_empty() {
                return Err("field `references` is an empty list; give at least one".into());
            }
            let mut refs = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => refs.push(s.clone()),
                    other => {
                        return Err(format!(
                            "field `references`, item {}: must be a string, not {}",
                            i + 1,
                            type_name(other)
                        ));
                    }
                }
            }
            split_references(refs)
        }
        (None, Some(other)) => {
            return Err(format!(
                "field `references` must be a list of strings, not {}",
                type_name(other)
            ));
        }
        (_, None) => match map.get("reference") {
            None => return Err("missing field `reference` (or `references`)".into()),
            Some(_) => (
                text_field("reference", true)?.unwrap_or_default(),
                Vec::new(),
            ),
        },
    };
    Ok(PredictionRow {
        prediction: text_field("prediction", true)?.unwrap_or_default(),
        reference,
        references,
        source: text_field("source", false)?,
        id,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], expect: &[(usize, &str)]) {
        match parse_predictions(input) {
            Ok(rows) => assert!(
                expect.is_empty(),
                "expected errors {expect:?}, got rows {rows:?}"
            ),
            Err(e) => {
                let got: Vec<(usize, String)> = e
                    .errors
                    .iter()
                    .map(|e| (e.line, e.message.clone()))
                    .collect();
                assert_eq!(got.len(), expect.len(), "{got:?}");
                for ((line, msg), (eline, emsg)) in got.iter().zip(expect) {
                    assert_eq!(line, eline);
                    assert!(msg.contains(emsg), "{msg:?} should contain {emsg:?}");
                }
            }
        }
    }

    #[test]
    fn good_rows_parse() {
        let rows = parse_predictions(
            b"{\"id\":\"a\",\"prediction\":\"p\",\"reference\":\"r\"}\n\n{\"id\":7,\"prediction\":\"\",\"reference\":\"r\",\"source\":\"s\"}\r\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].id, "7");
        assert_eq!(rows[1].source.as_deref(), Some("s"));
    }

    #[test]
    fn bad_rows_are_reported_by_line() {
        check(
            b"{\"id\":\"a\",\"prediction\":\"p\",\"reference\":\"r\"}\nnot json\n{\"id\":\"b\",\"reference\":\"r\"}\n[1]\n{\"id\":\"a\",\"prediction\":\"p\",\"reference\":\"r\"}\n{\"id\":\"c\",\"prediction\":1,\"reference\":\"r\"}\n\xff\xfe\n",
            &[
                (2, "invalid JSON"),
                (3, "missing field `prediction`"),
                (4, "expected a JSON object"),
                (5, "duplicate id"),
                (6, "must be a string"),
                (7, "not valid UTF-8"),
            ],
        );
    }

    #[test]
    fn several_references_parse_and_bad_ones_are_reported() {
        let rows = parse_predictions(
            b"{\"id\":\"a\",\"prediction\":\"p\",\"references\":[\"r1\",\"r2\"]}\n{\"id\":\"b\",\"prediction\":\"p\",\"references\":[\"r\"]}\n",
        )
        .unwrap();
        assert_eq!(rows[0].reference, "r1");
        assert_eq!(rows[0].all_references(), ["r1", "r2"]);
        // One reference in a list is the same row as with `reference`.
        assert_eq!(
            rows[1],
            PredictionRow::new("b".into(), "p".into(), "r".into(), None)
        );
        check(
            b"{\"id\":\"a\",\"prediction\":\"p\",\"reference\":\"r\",\"references\":[\"r\"]}\n{\"id\":\"b\",\"prediction\":\"p\",\"references\":[]}\n{\"id\":\"c\",\"prediction\":\"p\",\"references\":[\"r\",3]}\n{\"id\":\"d\",\"prediction\":\"p\",\"references\":\"r\"}\n",
            &[
                (1, "both `reference` and `references`"),
                (2, "empty list"),
                (3, "item 2: must be a string"),
                (4, "must be a list of strings"),
            ],
        );
    }

    #[test]
    fn an_empty_file_is_an_error() {
        check(b"\n\n", &[(0, "no samples")]);
        let mut e = parse_predictions(b"\n\n").unwrap_err();
        e.path = "empty.jsonl".into();
        assert_eq!(e.to_string(), "empty.jsonl: the file holds no samples");
    }
}
