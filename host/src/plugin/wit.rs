//! Host bindings of the plugin contract, one module per frozen WIT version. The rest of the
//! host uses `latest`; an older version, when one exists, is served by converting its types
//! to and from `latest` (as Zed's extension host does).

pub mod since_v0_1_0 {
    /// The host capabilities, bound once and shared by every world below.
    pub mod imports {
        wasmtime::component::bindgen!({
            path: "../sdk/wit/since_v0.1.0",
            world: "imports",
            additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
        });
    }

    /// A plugin world's bindings, reusing the capability bindings above so every world shares
    /// one set of host traits and types.
    macro_rules! plugin_world {
        ($module:ident, $world:tt) => {
            pub mod $module {
                wasmtime::component::bindgen!({
                    path: "../sdk/wit/since_v0.1.0",
                    world: $world,
                    with: {
                        "adapterlab:plugin/types": super::imports::adapterlab::plugin::types,
                        "adapterlab:plugin/log": super::imports::adapterlab::plugin::log,
                        "adapterlab:plugin/config": super::imports::adapterlab::plugin::config,
                        "adapterlab:plugin/embed": super::imports::adapterlab::plugin::embed,
                        "adapterlab:plugin/chat": super::imports::adapterlab::plugin::chat,
                    },
                    additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
                });
            }
        };
    }

    plugin_world!(metric, "metric-plugin");
    plugin_world!(formatter, "formatter-plugin");
    plugin_world!(reporter, "reporter-plugin");

    /// The contract version these bindings implement.
    pub const VERSION: &str = "0.1.0";
}

pub use since_v0_1_0 as latest;

/// The contract types the rest of the host works with.
pub mod types {
    pub use super::latest::formatter::exports::adapterlab::plugin::formatter::{
        Formatted, FormatterInfo,
    };
    pub use super::latest::imports::adapterlab::plugin::chat::{
        Message as ChatMessage, Request as ChatRequest, Response as ChatResponse, TokenLogprob,
        TopLogprob,
    };
    pub use super::latest::imports::adapterlab::plugin::embed::{EncoderInfo, TokenEmbeddings};
    pub use super::latest::imports::adapterlab::plugin::log::Level;
    pub use super::latest::imports::adapterlab::plugin::types::{Capability, Manifest, PluginKind};
    pub use super::latest::metric::exports::adapterlab::plugin::metric::{
        BatchResult, MetricInfo, Sample, SampleResult, ScoreSpec,
    };
    pub use super::latest::reporter::exports::adapterlab::plugin::reporter::{
        Aggregate, Delta, Document, Estimate, Report, ReporterInfo, Run as ReportRun, SampleView,
    };
}
