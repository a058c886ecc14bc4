//! The judge's settings (`judge.KEY=VALUE`) and the chat request they shape.

use adapterlab_sdk::config;
use adapterlab_sdk::metric::chat::{Message, Request};

use crate::criteria::{self, CRITERIA, Criterion};

#[derive(Debug)]
pub struct Settings {
    /// The judge model, as the host's LLM client names it.
    pub model: String,
    pub temperature: f64,
    /// Room for the answer. A score is one token; a few more let the text fallback see an
    /// answer such as "Score: 4" when the first token is not a score.
    pub max_tokens: u32,
    /// Alternatives per position, 0-20 (the OpenAI API's range, as the WIT says).
    pub top_logprobs: u32,
    /// The criteria to score, each once, in the order given.
    pub criteria: Vec<&'static Criterion>,
}

pub const DEFAULT_MODEL: &str = "gpt-3.5-turbo";
pub const DEFAULT_TEMPERATURE: f64 = 0.0;
pub const DEFAULT_MAX_TOKENS: u32 = 5;
pub const DEFAULT_TOP_LOGPROBS: u32 = 5;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: DEFAULT_MODEL.to_string(),
            temperature: DEFAULT_TEMPERATURE,
            max_tokens: DEFAULT_MAX_TOKENS,
            top_logprobs: DEFAULT_TOP_LOGPROBS,
            criteria: CRITERIA.iter().collect(),
        }
    }
}

impl Settings {
    /// The user's settings, read through the host's `config` capability.
    pub fn from_config() -> Result<Self, String> {
        Settings::new(
            config::get("model"),
            config::get_parsed("temperature", DEFAULT_TEMPERATURE)?,
            config::get_parsed("max_tokens", DEFAULT_MAX_TOKENS)?,
            config::get_parsed("top_logprobs", DEFAULT_TOP_LOGPROBS)?,
            config::get("criteria"),
        )
    }

    /// Check parsed settings; `None` means unset. Errors name the setting.
    pub fn new(
        model: Option<String>,
        temperature: f64,
        max_tokens: u32,
        top_logprobs: u32,
        criteria: Option<String>,
    ) -> Result<Self, String> {
        let model = match model {
            None => DEFAULT_MODEL.to_string(),
            Some(m) if m.trim().is_empty() => return Err("setting `model` is empty".to_string()),
            Some(m) => m.trim().to_string(),
        };
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!(
                "setting `temperature`: {temperature} is not in 0..=2"
            ));
        }
        if max_tokens == 0 {
            return Err("setting `max_tokens`: must be at least 1".to_string());
        }
        if top_logprobs > 20 {
            return Err(format!(
                "setting `top_logprobs`: {top_logprobs} is not in 0..=20"
            ));
        }
        let criteria = match criteria {
            None => CRITERIA.iter().collect(),
            Some(list) => parse_criteria(&list)?,
        };
        Ok(Settings {
            model,
            temperature,
            max_tokens,
            top_logprobs,
            criteria,
        })
    }

    /// The request for one (sample, criterion).
    pub fn request(&self, messages: Vec<Message>) -> Request {
        Request {
            model: Some(self.model.clone()),
            messages,
            temperature: Some(self.temperature),
            max_tokens: Some(self.max_tokens),
            logprobs: true,
            top_logprobs: Some(self.top_logprobs),
            seed: None,
        }
    }
}

/// A comma-separated subset of the criteria, e.g. `relevance, consistency`. Names are
/// case-insensitive; a repeated name counts once.
pub fn parse_criteria(list: &str) -> Result<Vec<&'static Criterion>, String> {
    let mut chosen: Vec<&'static Criterion> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let Some(criterion) = criteria::by_name(&name.to_ascii_lowercase()) else {
            let known: Vec<_> = CRITERIA.iter().map(|c| c.name).collect();
            return Err(format!(
                "setting `criteria`: unknown criterion {name:?} (known: {})",
                known.join(", ")
            ));
        };
        if !chosen.iter().any(|c| c.name == criterion.name) {
            chosen.push(criterion);
        }
    }
    if chosen.is_empty() {
        return Err("setting `criteria`: names no criterion".to_string());
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use crate::settings::{Settings, parse_criteria};

    fn names(list: &str) -> Result<Vec<&'static str>, String> {
        parse_criteria(list).map(|cs| cs.iter().map(|c| c.name).collect())
    }

    #[test]
    fn defaults() {
        let s = Settings::new(None, 0.0, 5, 5, None).unwrap();
        assert_eq!(s.model, "gpt-3.5-turbo");
        let all: Vec<_> = s.criteria.iter().map(|c| c.name).collect();
        assert_eq!(all, ["relevance", "coherence", "consistency", "fluency"]);
        let d = Settings::default();
        assert_eq!(
            (
                d.model.as_str(),
                d.temperature,
                d.max_tokens,
                d.top_logprobs
            ),
            ("gpt-3.5-turbo", 0.0, 5, 5)
        );
    }

    #[test]
    fn criteria_subsets() {
        assert_eq!(names("fluency"), Ok(vec!["fluency"]));
        assert_eq!(
            names(" Consistency , relevance,"),
            Ok(vec!["consistency", "relevance"])
        );
        assert_eq!(names("coherence,coherence"), Ok(vec!["coherence"]));
    }

    #[test]
    fn bad_criteria_name_the_setting() {
        assert_eq!(
            names("relevance,accuracy"),
            Err("setting `criteria`: unknown criterion \"accuracy\" (known: relevance, coherence, consistency, fluency)"
                .to_string())
        );
        assert_eq!(
            names(" , "),
            Err("setting `criteria`: names no criterion".to_string())
        );
        assert!(Settings::new(None, 0.0, 5, 5, Some(String::new())).is_err());
    }

    #[test]
    fn out_of_range_values_name_the_setting() {
        let err = |t: f64, m: u32, k: u32, model: Option<&str>| {
            Settings::new(model.map(str::to_string), t, m, k, None).unwrap_err()
        };
        assert!(err(-0.1, 5, 5, None).starts_with("setting `temperature`"));
        assert!(err(f64::NAN, 5, 5, None).starts_with("setting `temperature`"));
        assert!(err(0.0, 0, 5, None).starts_with("setting `max_tokens`"));
        assert!(err(0.0, 5, 21, None).starts_with("setting `top_logprobs`"));
        assert!(err(0.0, 5, 5, Some(" ")).starts_with("setting `model`"));
    }

    #[test]
    fn requests_ask_for_log_probabilities() {
        let s = Settings::new(Some(" gpt-4o-mini ".into()), 0.5, 3, 20, None).unwrap();
        let r = s.request(Vec::new());
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            (r.temperature, r.max_tokens, r.logprobs, r.top_logprobs),
            (Some(0.5), Some(3), true, Some(20))
        );
    }
}
