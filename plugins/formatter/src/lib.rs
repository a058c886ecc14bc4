//! The reference formatter `summarize`: turns a dialogue-summarization row into an
//! instruction prompt and, when the row has one, the summary as the completion.
//!
//! Row fields:
//! - `dialogue` (required): the text to summarize;
//! - `summary` (optional): the target summary, the completion when training;
//! - `instruction` (optional): overrides the instruction for this row.
//!
//! Setting: `summarize.instruction` overrides the default instruction for every row that
//! has none of its own.
//!
//! The prompt is
//!
//! ```text
//! ### Instruction:
//! {instruction}
//!
//! ### Dialogue:
//! {dialogue}
//!
//! ### Summary:
//! ```
//!
//! followed by a newline; fields are inserted verbatim so that the template is predictable.

use adapterlab_sdk::formatter::{Formatted, Formatter, FormatterInfo, Row, field};
use adapterlab_sdk::{Manifest, config};

/// The instruction used when neither the row nor the settings give one.
pub const DEFAULT_INSTRUCTION: &str = "Write a concise summary of the following dialogue.";

/// Format one row. `instruction_setting` is the user's `instruction` setting, if any.
///
/// Blank fields count as absent: a blank cell in a CSV or JSONL dataset means "no value",
/// and an empty completion would teach the model to stop at once.
pub fn format_row(row: &Row, instruction_setting: Option<&str>) -> Result<Formatted, String> {
    let dialogue = match field(row, "dialogue") {
        None => return Err("row has no `dialogue` field".to_string()),
        Some(d) if d.trim().is_empty() => return Err("field `dialogue` is empty".to_string()),
        Some(d) => d,
    };
    let instruction = non_blank(field(row, "instruction"))
        .or(non_blank(instruction_setting))
        .unwrap_or(DEFAULT_INSTRUCTION);
    let prompt =
        format!("### Instruction:\n{instruction}\n\n### Dialogue:\n{dialogue}\n\n### Summary:\n");
    let completion = non_blank(field(row, "summary")).map(str::to_string);
    Ok(Formatted { prompt, completion })
}

fn non_blank(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

pub struct Summarize;

impl Formatter for Summarize {
    fn info() -> FormatterInfo {
        FormatterInfo {
            manifest: Manifest::new(
                "summarize",
                env!("CARGO_PKG_VERSION"),
                "Dialogue summarization: an instruction prompt over `dialogue`, `summary` as the completion",
            ),
            required_fields: vec!["dialogue".to_string()],
        }
    }

    fn format_row(row: &Row) -> Result<Formatted, String> {
        // Read per row rather than cached: a host call is microseconds, and a cache in a
        // static could outlive the settings if the host ever reused an instance.
        let setting = config::get("instruction");
        format_row(row, setting.as_deref())
    }
}

adapterlab_sdk::export_formatter!(Summarize);

#[cfg(test)]
mod tests {
    use crate::{DEFAULT_INSTRUCTION, format_row};

    fn row(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The template, written out independently of `format_row`.
    fn prompt(instruction: &str, dialogue: &str) -> String {
        format!("### Instruction:\n{instruction}\n\n### Dialogue:\n{dialogue}\n\n### Summary:\n")
    }

    fn check(
        fields: &[(&str, &str)],
        setting: Option<&str>,
        prompt: &str,
        completion: Option<&str>,
    ) {
        let formatted = format_row(&row(fields), setting).expect("row formats");
        assert_eq!(formatted.prompt, prompt);
        assert_eq!(formatted.completion.as_deref(), completion);
    }

    #[test]
    fn training_row_has_prompt_and_completion() {
        // The exact text, spelled out once so the template itself is pinned.
        check(
            &[
                ("dialogue", "#Person1#: Hi.\n#Person2#: Hello."),
                ("summary", "They greet."),
            ],
            None,
            "### Instruction:\nWrite a concise summary of the following dialogue.\n\n\
             ### Dialogue:\n#Person1#: Hi.\n#Person2#: Hello.\n\n### Summary:\n",
            Some("They greet."),
        );
    }

    #[test]
    fn generation_row_has_no_completion() {
        check(
            &[("dialogue", "A: x")],
            None,
            &prompt(DEFAULT_INSTRUCTION, "A: x"),
            None,
        );
    }

    #[test]
    fn blank_summary_is_absent() {
        let fields = [("dialogue", "A: x"), ("summary", "  \n")];
        check(&fields, None, &prompt(DEFAULT_INSTRUCTION, "A: x"), None);
    }

    #[test]
    fn fields_are_inserted_verbatim() {
        let dialogue = "  A: ### Summary:\n{instruction}\n\n";
        let fields = [("dialogue", dialogue), ("summary", " s \n")];
        check(
            &fields,
            None,
            &prompt(DEFAULT_INSTRUCTION, dialogue),
            Some(" s \n"),
        );
    }

    #[test]
    fn setting_overrides_default_instruction() {
        let setting = "Summarize in one sentence.";
        check(
            &[("dialogue", "A: x")],
            Some(setting),
            &prompt(setting, "A: x"),
            None,
        );
    }

    #[test]
    fn row_instruction_overrides_setting() {
        let fields = [("instruction", "TL;DR:"), ("dialogue", "A: x")];
        check(
            &fields,
            Some("Summarize in one sentence."),
            &prompt("TL;DR:", "A: x"),
            None,
        );
    }

    #[test]
    fn blank_instructions_fall_back() {
        let fields = [("instruction", " "), ("dialogue", "A: x")];
        check(
            &fields,
            Some(""),
            &prompt(DEFAULT_INSTRUCTION, "A: x"),
            None,
        );
    }

    #[test]
    fn extra_fields_are_ignored() {
        let fields = [
            ("id", "train_1"),
            ("topic", "greeting"),
            ("dialogue", "A: x"),
            ("summary", "s"),
        ];
        check(
            &fields,
            None,
            &prompt(DEFAULT_INSTRUCTION, "A: x"),
            Some("s"),
        );
    }

    #[test]
    fn missing_dialogue_is_an_error_naming_the_field() {
        let err = format_row(&row(&[("summary", "s")]), None).unwrap_err();
        assert_eq!(err, "row has no `dialogue` field");
    }

    #[test]
    fn empty_dialogue_is_an_error_naming_the_field() {
        for blank in ["", "  ", "\n\t"] {
            let err = format_row(&row(&[("dialogue", blank), ("summary", "s")]), None).unwrap_err();
            assert_eq!(err, "field `dialogue` is empty");
        }
    }

    #[test]
    fn info_requires_dialogue() {
        use adapterlab_sdk::formatter::Formatter;
        let info = crate::Summarize::info();
        assert_eq!(info.manifest.name, "summarize");
        assert_eq!(info.required_fields, vec!["dialogue".to_string()]);
    }
}
