//! The four G-Eval criteria, written for dialogue summarization, and the chat messages that
//! ask a judge model to score one summary on one of them.
//!
//! The wording follows G-Eval's SummEval prompts (Liu et al., 2023, `prompts/summeval/*_detailed.txt`):
//! the same introduction, "Evaluation Criteria", "Evaluation Steps" and "Evaluation Form
//! (scores ONLY)", with the news article replaced by a dialogue and its speakers. One
//! deliberate difference: G-Eval scores fluency 1-3, but this project's contract gives all
//! four scores the range 1-5, so fluency has a five-level rubric here like the others.

use adapterlab_sdk::metric::chat::Message;

/// Whether a criterion's prompt shows the source dialogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceUse {
    /// The criterion compares the summary with the dialogue: without one it cannot be judged.
    Required,
    /// Shown when known; the criterion can still be judged from the summary alone.
    Optional,
    /// Not shown, as in G-Eval: the criterion judges the summary's language alone.
    Unused,
}

/// One evaluation step, and whether it applies with or without the dialogue at hand.
#[derive(Clone, Copy, Debug)]
enum Step {
    Always(&'static str),
    WithSource(&'static str),
    WithoutSource(&'static str),
}

#[derive(Debug)]
pub struct Criterion {
    /// The score name the metric reports.
    pub name: &'static str,
    /// The name as the prompt writes it.
    pub title: &'static str,
    pub definition: &'static str,
    pub source: SourceUse,
    steps: &'static [Step],
}

/// Every criterion, in the order G-Eval lists them; also the order scores are reported in.
pub const CRITERIA: [Criterion; 4] = [RELEVANCE, COHERENCE, CONSISTENCY, FLUENCY];

const RELEVANCE: Criterion = Criterion {
    name: "relevance",
    title: "Relevance",
    definition: "selection of important content from the dialogue. The summary should include \
only important information from the dialogue: who is talking, what they discuss, and what they \
decide, ask for or plan. Penalize summaries which contain redundancies and excess information.",
    source: SourceUse::Required,
    steps: &[
        Step::Always("Read the summary and the dialogue carefully."),
        Step::Always(
            "Compare the summary to the dialogue and identify the main points of the dialogue.",
        ),
        Step::Always(
            "Assess how well the summary covers the main points of the dialogue, and how much \
irrelevant or redundant information it contains.",
        ),
        Step::Always("Assign a relevance score from 1 to 5."),
    ],
};

const COHERENCE: Criterion = Criterion {
    name: "coherence",
    title: "Coherence",
    definition: "the collective quality of all sentences. The summary should be well-structured \
and well-organized. The summary should not just be a heap of related information, but should \
build from sentence to sentence to a coherent body of information about the dialogue.",
    source: SourceUse::Optional,
    steps: &[
        Step::WithSource("Read the dialogue carefully and identify its main topic and key points."),
        Step::WithSource(
            "Read the summary and compare it to the dialogue. Check if the summary covers the \
main topic and key points of the dialogue, and if it presents them in a clear and logical order.",
        ),
        Step::WithoutSource(
            "Read the summary carefully and identify its main topic and key points.",
        ),
        Step::WithoutSource(
            "Check if the summary presents them in a clear and logical order, each sentence \
building on the ones before it.",
        ),
        Step::Always(
            "Assign a score for coherence on a scale of 1 to 5, where 1 is the lowest and 5 is \
the highest based on the Evaluation Criteria.",
        ),
    ],
};

const CONSISTENCY: Criterion = Criterion {
    name: "consistency",
    title: "Consistency",
    definition: "the factual alignment between the summary and the dialogue. A factually \
consistent summary contains only statements that are entailed by the dialogue. Penalize \
summaries that contain hallucinated facts, or that attribute what one speaker said or did to \
another.",
    source: SourceUse::Required,
    steps: &[
        Step::Always(
            "Read the dialogue carefully and identify the main facts and details it presents, \
and which speaker says or does what.",
        ),
        Step::Always(
            "Read the summary and compare it to the dialogue. Check if the summary contains any \
factual errors that are not supported by the dialogue, including statements attributed to the \
wrong speaker.",
        ),
        Step::Always("Assign a score for consistency based on the Evaluation Criteria."),
    ],
};

const FLUENCY: Criterion = Criterion {
    name: "fluency",
    title: "Fluency",
    definition: "the quality of the summary in terms of grammar, spelling, punctuation, word \
choice, and sentence structure.\n\
- 1: Very poor. The summary is full of errors and is hard or impossible to understand.\n\
- 2: Poor. The summary has many errors that make it hard to understand or sound unnatural.\n\
- 3: Fair. The summary has some errors that affect the clarity or smoothness of the text, but \
the main points are still comprehensible.\n\
- 4: Good. The summary has a few minor errors but is easy to read and follow.\n\
- 5: Excellent. The summary has no errors and reads naturally.",
    source: SourceUse::Unused,
    steps: &[
        Step::Always("Read the summary carefully."),
        Step::Always(
            "Check it for errors in grammar, spelling, punctuation, word choice and sentence \
structure, and for anything that sounds unnatural.",
        ),
        Step::Always("Assign a fluency score from 1 to 5 based on the Evaluation Criteria."),
    ],
};

/// The criterion called `name`, if there is one.
pub fn by_name(name: &str) -> Option<&'static Criterion> {
    CRITERIA.iter().find(|c| c.name == name)
}

const INTRODUCTION: &str = "You will be given one summary written for a dialogue.\n\n\
Your task is to rate the summary on one metric.\n\n\
Please make sure you read and understand these instructions carefully. Please keep this \
document open while reviewing, and refer to it as needed.";

impl Criterion {
    /// The messages asking to score `summary` on this criterion. `source` is the dialogue,
    /// passed only when known (the caller checks [`SourceUse::Required`] first); it is left
    /// out when this criterion does not use it.
    ///
    /// The rubric goes in the system message and the texts in the user message, so the
    /// rubric is a prefix shared by every request of a criterion (cheaper with prompt caching).
    pub fn messages(&self, source: Option<&str>, summary: &str) -> Vec<Message> {
        let source = if self.source == SourceUse::Unused {
            None
        } else {
            source
        };
        let steps = self
            .steps
            .iter()
            .filter_map(|step| match (*step, source.is_some()) {
                (Step::Always(s), _)
                | (Step::WithSource(s), true)
                | (Step::WithoutSource(s), false) => Some(s),
                _ => None,
            })
            .enumerate()
            .map(|(i, s)| format!("{}. {s}", i + 1))
            .collect::<Vec<_>>()
            .join("\n");
        let system = format!(
            "{INTRODUCTION}\n\nEvaluation Criteria:\n\n{} (1-5) - {}\n\nEvaluation Steps:\n\n{steps}\n\n\
             Answer with the score only: a single digit from 1 to 5.",
            self.title, self.definition,
        );
        let mut user = String::new();
        if let Some(dialogue) = source {
            user.push_str(&format!("Dialogue:\n\n{dialogue}\n\n"));
        }
        // The form line names no range, as in G-Eval: a model that echoes
        // "- Relevance (1-5): 4" and is cut off by `max_tokens` would read as a 1.
        user.push_str(&format!(
            "Summary:\n\n{summary}\n\nEvaluation Form (scores ONLY):\n\n- {}:",
            self.title
        ));
        vec![
            Message {
                role: "system".to_string(),
                content: system,
            },
            Message {
                role: "user".to_string(),
                content: user,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use crate::criteria::{CRITERIA, SourceUse, by_name};

    #[test]
    fn names_and_source_use_match_the_contract() {
        let names: Vec<_> = CRITERIA.iter().map(|c| (c.name, c.source)).collect();
        assert_eq!(
            names,
            [
                ("relevance", SourceUse::Required),
                ("coherence", SourceUse::Optional),
                ("consistency", SourceUse::Required),
                ("fluency", SourceUse::Unused),
            ]
        );
        assert!(by_name("fluency").is_some());
        assert!(by_name("Fluency").is_none());
    }

    #[test]
    fn every_rubric_is_on_a_one_to_five_scale() {
        for c in &CRITERIA {
            let messages = c.messages(Some("A: hi"), "A greets.");
            assert!(
                messages[0]
                    .content
                    .contains(&format!("{} (1-5) - ", c.title)),
                "{}",
                c.name
            );
            assert!(
                messages[1].content.ends_with(&format!("- {}:", c.title)),
                "{}",
                c.name
            );
            assert!(!messages[0].content.contains("1-3"), "{}", c.name);
        }
        let fluency = by_name("fluency").unwrap().messages(None, "s");
        for level in ["- 1: ", "- 2: ", "- 3: ", "- 4: ", "- 5: "] {
            assert!(
                fluency[0].content.contains(level),
                "fluency rubric lacks {level}"
            );
        }
    }

    #[test]
    fn relevance_prompt_in_full() {
        let messages = by_name("relevance")
            .unwrap()
            .messages(Some("#P1#: Lunch?\n#P2#: Sure."), "They agree to lunch.");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].role, "user");
        assert!(
            messages[0]
                .content
                .starts_with("You will be given one summary written for a dialogue.")
        );
        assert!(messages[0].content.contains(
            "Evaluation Steps:\n\n1. Read the summary and the dialogue carefully.\n2. Compare"
        ));
        assert!(
            messages[0]
                .content
                .contains("\n4. Assign a relevance score from 1 to 5.\n\n")
        );
        assert!(
            messages[0]
                .content
                .ends_with("Answer with the score only: a single digit from 1 to 5.")
        );
        assert_eq!(
            messages[1].content,
            "Dialogue:\n\n#P1#: Lunch?\n#P2#: Sure.\n\nSummary:\n\nThey agree to lunch.\n\n\
             Evaluation Form (scores ONLY):\n\n- Relevance:"
        );
    }

    #[test]
    fn coherence_steps_follow_whether_the_dialogue_is_known() {
        let coherence = by_name("coherence").unwrap();
        let with = coherence.messages(Some("A: hi"), "s");
        assert!(with[0].content.contains("1. Read the dialogue carefully"));
        assert!(with[0].content.contains("3. Assign a score for coherence"));
        assert!(with[1].content.starts_with("Dialogue:\n\nA: hi\n\n"));

        let without = coherence.messages(None, "s");
        assert!(without[0].content.contains("1. Read the summary carefully"));
        assert!(
            without[0]
                .content
                .contains("3. Assign a score for coherence")
        );
        assert!(!without[0].content.contains("Read the dialogue"));
        assert!(without[1].content.starts_with("Summary:\n\ns\n\n"));
    }

    #[test]
    fn fluency_never_shows_the_dialogue() {
        let messages = by_name("fluency")
            .unwrap()
            .messages(Some("SECRET DIALOGUE"), "s");
        assert!(!messages[1].content.contains("SECRET DIALOGUE"));
        assert!(messages[1].content.starts_with("Summary:\n\ns\n\n"));
    }
}
