//! The shapes of settings, shared by the training config and the generation settings: the
//! bounds of numeric ones ([`Range`]) and the named choices ([`named_choice!`] enums).
//! Validation, the published schema (`GET /api/schema`, `/api/openapi.json`) and the
//! dashboard's forms all read these, so a bound or a name is written once.

/// The allowed range of one numeric setting: the one table that validation, the published
/// schema (`GET /api/schema`, `/api/openapi.json`) and the dashboard's forms all read.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The key, dotted inside a table (`lora.r`).
    pub key: &'static str,
    pub min: f64,
    /// The minimum itself is excluded (a learning rate of 0 is not allowed).
    pub min_open: bool,
    pub max: f64,
    pub integer: bool,
}

impl Range {
    pub const fn int(key: &'static str, min: u64, max: u64) -> Self {
        Range {
            key,
            min: min as f64,
            min_open: false,
            max: max as f64,
            integer: true,
        }
    }

    pub const fn real(key: &'static str, min: f64, min_open: bool, max: f64) -> Self {
        Range {
            key,
            min,
            min_open,
            max,
            integer: false,
        }
    }

    /// This range as JSON Schema keywords on `node`.
    pub fn describe(&self, node: &mut serde_json::Value) {
        node["type"] = serde_json::json!(if self.integer { "integer" } else { "number" });
        node[if self.min_open {
            "exclusiveMinimum"
        } else {
            "minimum"
        }] = serde_json::json!(self.min);
        node["maximum"] = serde_json::json!(self.max);
    }

    pub fn check(&self, v: f64) -> std::result::Result<(), String> {
        let below = if self.min_open {
            v <= self.min
        } else {
            v < self.min
        };
        if v.is_finite() && !below && v <= self.max && (!self.integer || v.fract() == 0.0) {
            return Ok(());
        }
        // 1e308 reads better than its 309 digits.
        let shown = if v.abs() >= 1e6 {
            format!("{v:e}")
        } else {
            format!("{v}")
        };
        Err(if self.integer {
            format!("is {shown}; allowed range: {} to {}", self.min, self.max)
        } else {
            let open = if self.min_open { "(" } else { "[" };
            format!(
                "is {shown}; allowed range: {open}{}, {}]",
                self.min, self.max
            )
        })
    }
}

/// An enum of named choices as HF spells them: serde reads and writes the names (and the
/// aliases), and `NAMES` lists the names for the schema and the error messages.
#[macro_export]
macro_rules! named_choice {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)*),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $($(#[$vmeta])* #[serde(rename = $text $(, alias = $alias)*)] $variant),+
        }

        impl $name {
            /// Every name this setting accepts, aliases included.
            pub const NAMES: &'static [&'static str] = &[$($text $(, $alias)*),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }
    };
}
