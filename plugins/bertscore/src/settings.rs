//! The plugin's settings (`--set bertscore.KEY=VALUE`) and the choice of baseline.
//!
//! `model` and `layer` pick the encoder (passed to the host's `embed`), `idf` turns on idf
//! weighting over the batch's references, `baseline=P,R,F` rescales with the given baseline,
//! and `rescale_with_baseline=true` rescales with the baseline known for the encoder.

/// Baselines known per (encoder, layer), as bert-score ships them per model. None are shipped
/// yet: bert-score has none for the host's default encoder (all-MiniLM-L6-v2), and one for
/// another encoder is only valid with that encoder's exact layer.
const KNOWN_BASELINES: &[(&str, u32, [f64; 3])] = &[];

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    pub model: Option<String>,
    pub layer: Option<u32>,
    pub idf: bool,
    pub baseline: Option<[f64; 3]>,
    pub rescale_with_baseline: Option<bool>,
}

impl Settings {
    /// Reads the settings from the host (capability `config`).
    pub fn from_config() -> Result<Settings, String> {
        use adapterlab_sdk::config;

        let model = config::get("model")
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty());
        let layer = match config::get("layer") {
            None => None,
            Some(_) => Some(config::get_parsed::<u32>("layer", 0)?),
        };
        let baseline = config::get("baseline")
            .map(|raw| parse_baseline(&raw))
            .transpose()?;
        let rescale_with_baseline = match config::get("rescale_with_baseline") {
            None => None,
            Some(_) => Some(config::get_bool("rescale_with_baseline", false)?),
        };
        Ok(Settings {
            model,
            layer,
            idf: config::get_bool("idf", false)?,
            baseline,
            rescale_with_baseline,
        })
    }

    /// The baseline to rescale with, if any, for the encoder that answered `embed::info`.
    pub fn resolve_baseline(&self, model: &str, layer: u32) -> Result<Option<[f64; 3]>, String> {
        match (self.baseline, self.rescale_with_baseline) {
            (Some(_), Some(false)) => Err(
                "settings `baseline` and `rescale_with_baseline=false` contradict each other: \
                 drop one"
                    .to_string(),
            ),
            (Some(b), _) => Ok(Some(b)),
            (None, Some(true)) => known_baseline(model, layer).map(Some).ok_or_else(|| {
                format!(
                    "setting `rescale_with_baseline`: no baseline is known for encoder `{model}` \
                     layer {layer}; set `baseline=P,R,F` instead"
                )
            }),
            (None, _) => Ok(None),
        }
    }
}

fn known_baseline(model: &str, layer: u32) -> Option<[f64; 3]> {
    KNOWN_BASELINES
        .iter()
        .find(|(m, l, _)| *m == model && *l == layer)
        .map(|(_, _, b)| *b)
}

/// `P,R,F`: three finite numbers below 1 (rescaling divides by `1 - b`).
pub fn parse_baseline(raw: &str) -> Result<[f64; 3], String> {
    let invalid = |why: &str| {
        format!("setting `baseline`: expected three numbers P,R,F below 1, got {raw:?} ({why})")
    };
    let values: Vec<&str> = raw.split(',').map(str::trim).collect();
    let [p, r, f] = values[..] else {
        return Err(invalid(&format!("{} values", values.len())));
    };
    let mut out = [0.0; 3];
    for (slot, text) in out.iter_mut().zip([p, r, f]) {
        let value: f64 = text
            .parse()
            .map_err(|_| invalid(&format!("{text:?} is not a number")))?;
        if !value.is_finite() || value >= 1.0 {
            return Err(invalid(&format!("{text} is not a finite number below 1")));
        }
        *slot = value;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::settings::{Settings, parse_baseline};

    #[test]
    fn baseline_parsing() {
        assert_eq!(parse_baseline("0.83, 0.84,0.835"), Ok([0.83, 0.84, 0.835]));
        assert_eq!(parse_baseline("-0.5,0,0.1"), Ok([-0.5, 0.0, 0.1]));
        for bad in [
            "",
            "0.8,0.8",
            "0.8,0.8,0.8,0.8",
            "a,b,c",
            "1,0,0",
            "0.5,NaN,0.5",
            "0.5,inf,0.5",
        ] {
            let e = parse_baseline(bad).unwrap_err();
            assert!(e.starts_with("setting `baseline`"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn baseline_resolution() {
        let none = Settings::default();
        assert_eq!(none.resolve_baseline("m", 6), Ok(None));

        let given = Settings {
            baseline: Some([0.1, 0.2, 0.3]),
            ..Settings::default()
        };
        assert_eq!(given.resolve_baseline("m", 6), Ok(Some([0.1, 0.2, 0.3])));
        let given_and_on = Settings {
            rescale_with_baseline: Some(true),
            ..given.clone()
        };
        assert_eq!(
            given_and_on.resolve_baseline("m", 6),
            Ok(Some([0.1, 0.2, 0.3]))
        );
        let contradiction = Settings {
            rescale_with_baseline: Some(false),
            ..given
        };
        assert!(
            contradiction
                .resolve_baseline("m", 6)
                .unwrap_err()
                .contains("contradict")
        );

        let unknown = Settings {
            rescale_with_baseline: Some(true),
            ..Settings::default()
        };
        let e = unknown
            .resolve_baseline("sentence-transformers/all-MiniLM-L6-v2", 6)
            .unwrap_err();
        assert!(e.starts_with("setting `rescale_with_baseline`"), "{e}");
        assert!(e.contains("all-MiniLM-L6-v2"), "{e}");
    }
}
