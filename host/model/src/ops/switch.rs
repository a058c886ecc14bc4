//! Speed switches read from the environment ([`SWITCHES`]):
//! each takes a closed set of names that change how fast a result comes, not what it is (the
//! kernels they pick agree with each other to rounding, and a golden test holds each to its
//! reference); an unknown name is an error naming the variable and the names it takes, not a
//! silent default. A run records the ones set in its process with its results.

/// Every speed switch: its variable and the names it takes. A run checks and records those
/// set in its process ([`set_in_environment`]) before it starts: they change no result beyond
/// rounding, but a timing or a loss curve is only reproduced with them, and a misspelt one
/// must fail the run even where its kernel is never reached (a CPU run). Each module's
/// [`Switch`] maps the same names to its values; [`parse`] refuses a set that differs from
/// this one, so the two cannot drift apart unnoticed.
pub const SWITCHES: [(&str, &[&str]); 15] = [
    ("ADAPTERLAB_NF4_QUANTIZE", &["cpu", "gpu"]),
    ("ADAPTERLAB_NF4_GEMV", &["words", "wide", "mma"]),
    (
        "ADAPTERLAB_NF4_MMA_TILING",
        &["s8u2", "s8u4", "s4u4", "s16u1"],
    ),
    (
        "ADAPTERLAB_NF4_SMALL_BATCH",
        &["dequantize", "mma", "tiled"],
    ),
    // One row's weights as bitsandbytes' batch-1 GEMV or its dequantize kernel forms them: two
    // roundings that put a weight at most two steps of the 16-bit type apart.
    ("ADAPTERLAB_NF4_ONE_ROW", &["gemv4bit", "dequantize"]),
    // Whether one row's pairs form splits a product over k where groups alone leave places idle.
    ("ADAPTERLAB_NF4_PAIRS_SPLIT", &["auto", "off"]),
    ("ADAPTERLAB_PACKED_ATTENTION", &["regroup", "mask"]),
    ("ADAPTERLAB_DECODE_ATTENTION", &["fused", "eager"]),
    ("ADAPTERLAB_DECODE_ROPE", &["fused", "split"]),
    ("ADAPTERLAB_DECODE_GELU", &["fused", "separate"]),
    ("ADAPTERLAB_DECODE_LORA_H", &["launch", "separate"]),
    ("ADAPTERLAB_DECODE_RESIDUAL", &["fused", "separate"]),
    ("ADAPTERLAB_DECODE_PDL", &["on", "early", "products", "off"]),
    ("ADAPTERLAB_LORA_TRAIN_KERNELS", &["mma", "simt"]),
    ("ADAPTERLAB_LORA_MASK", &["stored", "drawn"]),
];

/// The speed switches set in this process's environment, as `VAR=value` in [`SWITCHES`]'
/// order; a value outside its switch's names is an error naming the variable.
pub fn set_in_environment() -> Result<Vec<String>, String> {
    let mut set = Vec::new();
    for (var, names) in SWITCHES {
        let options: Vec<(&str, ())> = names.iter().map(|n| (*n, ())).collect();
        if choice(var, &options)?.is_some() {
            let value = std::env::var(var).map_err(|e| format!("{var}: {e}"))?;
            set.push(format!("{var}={value}"));
        }
    }
    Ok(set)
}

/// A switch read once per process: the first [`Switch::get`] reads `var` ([`choice`]) and
/// every later one answers the same, refusal included.
pub struct Switch<T: 'static> {
    var: &'static str,
    options: &'static [(&'static str, T)],
    read: std::sync::OnceLock<Result<Option<T>, String>>,
}

impl<T: Copy + Send + Sync> Switch<T> {
    pub const fn new(var: &'static str, options: &'static [(&'static str, T)]) -> Self {
        Switch {
            var,
            options,
            read: std::sync::OnceLock::new(),
        }
    }

    /// The names it takes and their values.
    pub fn options(&self) -> &'static [(&'static str, T)] {
        self.options
    }

    /// The value set (`None`: unset); an unknown name is an error naming the variable.
    pub fn get(&self) -> candle_core::Result<Option<T>> {
        self.read
            .get_or_init(|| choice(self.var, self.options))
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    /// Whether the switch is in [`SWITCHES`] (otherwise a run would not record it) with the
    /// same names (otherwise setting it is refused as a build out of step): each module's unit
    /// tests ask it of its switches.
    pub fn names_match(&self) -> Result<(), String> {
        if !SWITCHES.iter().any(|(v, _)| *v == self.var) {
            return Err(format!("{}: not in switch::SWITCHES", self.var));
        }
        parse(self.var, None, self.options).map(|_| ())
    }

    /// The value in force, `default` where the variable is unset, with its name in the table
    /// (for reports); a default outside the table is an error.
    pub fn in_force(&self, default: T) -> candle_core::Result<(T, &'static str)>
    where
        T: PartialEq,
    {
        let value = self.get()?.unwrap_or(default);
        self.options
            .iter()
            .find(|(_, v)| *v == value)
            .map(|&(name, v)| (v, name))
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: no name for its value", self.var)))
    }
}

/// `var`'s value among `options` (`(name, value)`); `None` when it is unset.
pub fn choice<T: Copy>(var: &str, options: &[(&str, T)]) -> Result<Option<T>, String> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{var}: {e}")),
        Ok(v) => parse(var, Some(&v), options),
    }
}

/// [`choice`] for a value already read (`None`: unset).
pub fn parse<T: Copy>(
    var: &str,
    value: Option<&str>,
    options: &[(&str, T)],
) -> Result<Option<T>, String> {
    if let Some((_, names)) = SWITCHES.iter().find(|(v, _)| *v == var)
        && !options.iter().map(|(n, _)| n).eq(names.iter())
    {
        return Err(format!(
            "{var}: the switch's names differ from switch::SWITCHES' (a build out of step)"
        ));
    }
    let Some(value) = value else {
        return Ok(None);
    };
    match options.iter().find(|(name, _)| *name == value) {
        Some(&(_, v)) => Ok(Some(v)),
        None => {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            Err(format!("{var}={value:?}: expected {}", names.join(" or ")))
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every `ADAPTERLAB_` variable the crate reads is a switch in [`super::SWITCHES`], or one
    /// of the few that are not about speed: a new switch cannot be left out of run records.
    #[test]
    fn every_switch_the_crate_reads_is_listed() {
        const NOT_SWITCHES: [&str; 2] = ["ADAPTERLAB_PROFILE", "ADAPTERLAB_TEST_DEVICE"];
        let mut files = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
        let mut found = std::collections::BTreeSet::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("\"ADAPTERLAB_") {
                let name: String = text[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name != "ADAPTERLAB_" {
                    found.insert(name);
                }
            }
        }
        for name in &found {
            assert!(
                super::SWITCHES.iter().any(|(v, _)| v == name)
                    || NOT_SWITCHES.contains(&name.as_str()),
                "{name} is read but not in switch::SWITCHES"
            );
        }
        for (var, _) in super::SWITCHES {
            assert!(found.contains(var), "{var} is listed but read nowhere");
        }
    }

    #[test]
    fn a_switch_whose_names_drifted_from_the_table_is_refused() {
        let err = super::parse("ADAPTERLAB_LORA_TRAIN_KERNELS", None, &[("mma", 1)]).unwrap_err();
        assert!(err.contains("switch::SWITCHES"), "{err}");
        let same = [("mma", 1), ("simt", 2)];
        assert_eq!(
            super::parse("ADAPTERLAB_LORA_TRAIN_KERNELS", Some("simt"), &same),
            Ok(Some(2))
        );
    }

    #[test]
    fn a_name_outside_the_set_is_refused_with_the_variable_and_the_names() {
        let options = [("a", 1), ("b", 2)];
        assert_eq!(super::parse("V", None, &options), Ok(None));
        assert_eq!(super::parse("V", Some("b"), &options), Ok(Some(2)));
        assert_eq!(
            super::parse("V", Some("c"), &options),
            Err(r#"V="c": expected "a" or "b""#.to_string())
        );
    }
}
