//! Integration tests of `warren-producer` against a real broker
//! (`warren::testing::broker_url()`), each test on its own topology prefix
//! (deleted when the test's `World` drops): the built binary as child
//! processes, and the HTTP API in process through `warren_producer::App`.
#![allow(clippy::unwrap_used)]

mod access;
mod admin;
mod alarm;
mod api;
mod auth;
mod broker_loss;
mod browser;
mod cli;
mod clock_step;
mod cluster;
mod console;
mod console_workflows;
mod faults;
mod helpers;
mod http;
mod leader;
mod publish;
mod reload;
mod schedules;
mod schedules_api;
mod security;
mod surroundings;
mod tasks;
mod trace;
mod workflows;
