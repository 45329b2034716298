//! The `ferroserve` binary's parts, as a library so that the whole-system tests can start the same servers
//! the binary does. Each subcommand parses settings, builds the parts and wires them; nothing more.
#![forbid(unsafe_code)]

pub mod args;
pub mod commands;
pub mod config;
pub mod discovery;
mod progress;
pub mod running;

pub use progress::Bars;
