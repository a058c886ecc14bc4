//! End-to-end tests of the real `adapterlab` binary.

mod util;

mod attach;
mod bench;
mod bertscore_reference;
mod browser;
mod cli;
mod contract;
mod dist;
mod eval;
mod gate;
mod hostile;
mod judge;
mod model;
mod plugins_new;
mod polyglot;
mod push;
mod sandbox;
mod serve_models;
mod server;
mod server_faults;
mod track;
mod train;
