//! Reporter plugins: implement [`Reporter`], then `export_reporter!(YourType)`.

pub use crate::bindings::reporter::exports::adapterlab::plugin::reporter::{
    Aggregate, Delta, Document, Estimate, Report, ReporterInfo, Run, SampleView,
};

pub trait Reporter {
    fn info() -> ReporterInfo;
    fn render(report: Report) -> Result<Document, String>;
}

/// Export a [`Reporter`] implementation as the plugin's `reporter` interface.
#[macro_export]
macro_rules! export_reporter {
    ($ty:ty) => {
        const _: () = {
            struct __AdapterlabReporter;
            impl $crate::bindings::reporter::exports::adapterlab::plugin::reporter::Guest
                for __AdapterlabReporter
            {
                fn info() -> $crate::reporter::ReporterInfo {
                    <$ty as $crate::reporter::Reporter>::info()
                }
                fn render(
                    report: $crate::reporter::Report,
                ) -> ::std::result::Result<$crate::reporter::Document, ::std::string::String> {
                    <$ty as $crate::reporter::Reporter>::render(report)
                }
            }
            // The export names hold `:` and `@`, which native linkers reject in a cdylib's
            // symbol list; exporting only on wasm lets plugin crates (`cdylib` + `rlib`) run
            // their unit tests natively, while the impl above is still type-checked there.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::reporter::__export_reporter_world!(__AdapterlabReporter with_types_in $crate::bindings::reporter);
        };
    };
}
