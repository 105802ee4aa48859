//! edge-est: an EST (RFC 7030 / RFC 8951) server and registration authority for layered
//! Azure IoT Edge hierarchies.
//!
//! Layers, each in its own module: [`est`] (the protocol, no I/O), [`transport`] (listener,
//! TLS), [`auth`] (who is asking), [`policy`] (what they may get), [`issue`] (signing),
//! [`config`] and [`runtime`] (configuration as data), [`journal`] (audit), [`server`] (the
//! request pipeline) and [`error`] (the one mapping to HTTP).
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod demo;
pub mod edge;
pub mod error;
pub mod est;
pub mod health;
pub mod issue;
pub mod journal;
pub mod keygen;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod runtime;
pub mod server;
pub mod transport;
