//! Host bindings of the plugin contract, one module per frozen WIT version. The rest of the
//! host uses `latest`; an older version, when one exists, is served by converting its types
//! to and from `latest` (as Zed's extension host does).

/// One contract version's bindings: the host capabilities bound once, then each plugin world
/// reusing them, so every world of a version shares one set of host traits and types.
macro_rules! contract_version {
    ($module:ident, $path:literal, $version:literal) => {
        pub mod $module {
            pub mod imports {
                wasmtime::component::bindgen!({
                    path: $path,
                    world: "imports",
                    additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
                });
            }

            macro_rules! plugin_world {
                ($world_module:ident, $world:tt) => {
                    pub mod $world_module {
                        wasmtime::component::bindgen!({
                            path: $path,
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
            pub const VERSION: &str = $version;
        }
    };
}

contract_version!(since_v0_1_0, "../sdk/wit/since_v0.1.0", "0.1.0");
contract_version!(since_v0_2_0, "../sdk/wit/since_v0.2.0", "0.2.0");

pub use since_v0_2_0 as latest;

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
        BatchResult, MetricInfo, Sample, SampleResult, ScoreSpec, Statistic,
    };
    pub use super::latest::reporter::exports::adapterlab::plugin::reporter::{
        Aggregate, Delta, Document, Estimate, Report, ReporterInfo, Run as ReportRun, SampleView,
    };
}
