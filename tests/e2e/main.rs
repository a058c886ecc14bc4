//! End-to-end tests of the real `adapterlab` binary.

mod util;

mod bench;
mod browser;
mod cli;
mod eval;
mod judge;
mod model;
mod polyglot;
mod sandbox;
mod serve_models;
mod server;
mod server_faults;
mod train;
