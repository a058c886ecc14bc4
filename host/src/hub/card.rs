//! The model card (`README.md`) pushed with an adapter, as PEFT writes it: YAML front matter
//! the Hub reads (`library_name: peft`, `base_model`, the `base_model:adapter:` tag,
//! `pipeline_tag`) plus a `model-index` with the adapter's stored evaluation results, which the
//! Hub shows as an evaluation table; then a short human description.

/// One evaluation result: a metric's value on a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    pub metric: String,
    pub value: f64,
    pub dataset: String,
}

/// What the card describes.
#[derive(Debug, Clone)]
pub struct Card {
    /// `owner/name` on the Hub.
    pub repo: String,
    pub base_model: Option<String>,
    /// An adapter (PEFT) or a merged full model (transformers).
    pub is_adapter: bool,
    pub settings: Vec<(String, String)>,
    pub results: Vec<EvalResult>,
}

/// A YAML double-quoted scalar: JSON's string syntax is valid YAML and escapes everything.
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl Card {
    pub fn render(&self) -> String {
        let mut y = String::from("---\n");
        if let Some(base) = &self.base_model {
            y.push_str(&format!("base_model: {}\n", quoted(base)));
        }
        y.push_str(&format!(
            "library_name: {}\n",
            if self.is_adapter {
                "peft"
            } else {
                "transformers"
            }
        ));
        y.push_str("pipeline_tag: text-generation\ntags:\n");
        if let Some(base) = &self.base_model {
            let tag = if self.is_adapter {
                format!("base_model:adapter:{base}")
            } else {
                format!("base_model:merge:{base}")
            };
            y.push_str(&format!("- {}\n", quoted(&tag)));
        }
        for tag in ["lora", "transformers", "adapterlab"] {
            y.push_str(&format!("- {tag}\n"));
        }
        if !self.results.is_empty() {
            let name = self.repo.rsplit('/').next().unwrap_or(&self.repo);
            y.push_str(&format!(
                "model-index:\n- name: {}\n  results:\n",
                quoted(name)
            ));
            let mut datasets: Vec<&str> = self.results.iter().map(|r| r.dataset.as_str()).collect();
            datasets.dedup();
            for dataset in datasets {
                y.push_str("  - task:\n      type: text-generation\n      name: Text Generation\n");
                y.push_str(&format!(
                    "    dataset:\n      name: {}\n      type: {}\n    metrics:\n",
                    quoted(dataset),
                    quoted(dataset)
                ));
                for r in self.results.iter().filter(|r| r.dataset == dataset) {
                    y.push_str(&format!(
                        "    - type: {}\n      value: {}\n      name: {}\n",
                        quoted(&r.metric),
                        r.value,
                        quoted(&r.metric)
                    ));
                }
            }
        }
        y.push_str("---\n\n");
        let name = self.repo.rsplit('/').next().unwrap_or(&self.repo);
        y.push_str(&format!("# {name}\n\n"));
        match (&self.base_model, self.is_adapter) {
            (Some(base), true) => y.push_str(&format!(
                "A LoRA adapter for [{base}](https://huggingface.co/{base}), trained with adapterlab. Load it with PEFT:\n\n```python\nfrom peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"{}\")\n```\n\n",
                self.repo
            )),
            (Some(base), false) => y.push_str(&format!(
                "[{base}](https://huggingface.co/{base}) with a LoRA adapter merged in by adapterlab.\n\n"
            )),
            (None, _) => y.push_str("Made with adapterlab.\n\n"),
        }
        if !self.results.is_empty() {
            y.push_str("## Evaluation\n\n| dataset | metric | value |\n| --- | --- | ---: |\n");
            for r in &self.results {
                y.push_str(&format!(
                    "| {} | {} | {:.4} |\n",
                    r.dataset, r.metric, r.value
                ));
            }
            y.push('\n');
        }
        if !self.settings.is_empty() {
            y.push_str("## Training settings\n\n| setting | value |\n| --- | --- |\n");
            for (k, v) in &self.settings {
                y.push_str(&format!("| {k} | {} |\n", v.replace('|', "\\|")));
            }
            y.push('\n');
        }
        y.push_str(&format!(
            "### Framework versions\n\n- adapterlab {}\n",
            env!("CARGO_PKG_VERSION")
        ));
        y
    }
}
