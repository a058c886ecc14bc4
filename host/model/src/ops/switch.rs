//! Speed switches read from the environment (`ADAPTERLAB_NF4_QUANTIZE`, `ADAPTERLAB_NF4_GEMV`,
//! `ADAPTERLAB_NF4_SMALL_BATCH`, `ADAPTERLAB_PACKED_ATTENTION`, `ADAPTERLAB_DECODE_ATTENTION`,
//! `ADAPTERLAB_DECODE_ROPE`, `ADAPTERLAB_LORA_TRAIN_KERNELS`, `ADAPTERLAB_LORA_TERM`):
//! each takes a closed set of names that change how fast a result comes, not what it is (the
//! kernels they pick agree with each other to rounding, and a golden test holds each to its
//! reference); an unknown name is an error naming the variable and the names it takes, not a
//! silent default.

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

    /// The value set (`None`: unset); an unknown name is an error naming the variable.
    pub fn get(&self) -> candle_core::Result<Option<T>> {
        self.read
            .get_or_init(|| choice(self.var, self.options))
            .clone()
            .map_err(candle_core::Error::Msg)
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
