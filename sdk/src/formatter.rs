//! Formatter plugins: implement [`Formatter`], then `export_formatter!(YourType)`.

pub use crate::bindings::formatter::exports::adapterlab::plugin::formatter::{
    Formatted, FormatterInfo, Row,
};

/// The value of `field` in `row`.
pub fn field<'a>(row: &'a Row, field: &str) -> Option<&'a str> {
    row.iter()
        .find(|(k, _)| k == field)
        .map(|(_, v)| v.as_str())
}

pub trait Formatter {
    fn info() -> FormatterInfo;

    /// Format one row. An error names what is wrong with the row (e.g. a missing field).
    fn format_row(row: &Row) -> Result<Formatted, String>;
}

/// Export a [`Formatter`] implementation as the plugin's `formatter` interface.
#[macro_export]
macro_rules! export_formatter {
    ($ty:ty) => {
        const _: () = {
            struct __AdapterlabFormatter;
            impl $crate::bindings::formatter::exports::adapterlab::plugin::formatter::Guest
                for __AdapterlabFormatter
            {
                fn info() -> $crate::formatter::FormatterInfo {
                    <$ty as $crate::formatter::Formatter>::info()
                }
                fn format(
                    rows: ::std::vec::Vec<$crate::formatter::Row>,
                ) -> ::std::vec::Vec<::std::result::Result<$crate::formatter::Formatted, ::std::string::String>> {
                    rows.iter().map(<$ty as $crate::formatter::Formatter>::format_row).collect()
                }
            }
            // The export names hold `:` and `@`, which native linkers reject in a cdylib's
            // symbol list; exporting only on wasm lets plugin crates (`cdylib` + `rlib`) run
            // their unit tests natively, while the impl above is still type-checked there.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::formatter::__export_formatter_world!(__AdapterlabFormatter with_types_in $crate::bindings::formatter);
        };
    };
}
