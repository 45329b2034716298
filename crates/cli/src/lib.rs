//! The `ferroserve` binary's parts, as a library so that the whole-system tests can start the same servers
//! the binary does. Each subcommand parses settings, builds the parts and wires them; nothing more.
#![forbid(unsafe_code)]

pub mod args;
pub mod commands;
pub mod config;
mod progress;
pub mod running;

pub use progress::Bars;
