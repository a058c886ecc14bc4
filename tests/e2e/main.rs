//! End-to-end tests of the real `adapterlab` binary.

mod util;

mod cli;
mod eval;
mod judge;
mod sandbox;
mod polyglot;
mod server;
mod train;
