//! Integration tests of `warren-producer`: the built binary as child
//! processes against a real broker (`warren::testing::broker_url()`), each
//! test on its own topology prefix.
#![allow(clippy::unwrap_used)]

mod alarm;
mod broker_loss;
mod cli;
mod clock_step;
mod faults;
mod helpers;
mod http;
mod leader;
mod publish;
mod reload;
mod schedules;
mod surroundings;
