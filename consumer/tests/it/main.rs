//! Integration tests against a real RabbitMQ (`WARREN_TEST_AMQP_URL`, or a
//! node this process starts). Each test uses its own topology prefix.
#![allow(clippy::unwrap_used)]

mod access;
mod cli;
mod cluster;
mod dead;
mod dead_engine;
#[cfg(feature = "failpoints")]
mod faults;
mod flow;
mod handlers;
mod helpers;
mod outcomes;
mod priorities;
mod processes;
mod reconnect;
mod security;
mod surroundings;
mod trace;
mod workflows;
