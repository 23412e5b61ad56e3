//! Built-in handlers the shipped binary maps task names to from config, one
//! per file: [`noop`], [`sleep`], [`http`], [`exec`].

pub mod exec;
pub mod http;
pub mod noop;
pub mod sleep;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::HandlerSpec;
use crate::handler::{Registry, RegistryError};

/// A registry with one built-in handler per configured task name or pattern.
/// `task_timeout` bounds `exec` handlers run outside a worker (which always
/// passes each attempt's timeout in the task) that set no timeout of their own.
pub fn registry_from_config(
    specs: &BTreeMap<String, HandlerSpec>,
    task_timeout: Duration,
) -> Result<Registry, BuildError> {
    let mut r = Registry::new();
    for (name, spec) in specs {
        match spec {
            HandlerSpec::Noop {} => r.register(name.clone(), noop::Noop)?,
            HandlerSpec::Sleep { duration } => {
                r.register(name.clone(), sleep::Sleep::new(*duration))?
            }
            HandlerSpec::Http {
                url,
                timeout,
                headers,
                ..
            } => r.register(
                name.clone(),
                http::Http::new(url, *timeout, headers).map_err(|e| BuildError::Handler {
                    name: name.clone(),
                    message: e,
                })?,
            )?,
            HandlerSpec::Exec {
                argv,
                permanent_exit_codes,
                cwd,
                env,
                pass_env,
                timeout,
            } => r.register(
                name.clone(),
                exec::Exec {
                    argv: argv.clone(),
                    permanent_exit_codes: permanent_exit_codes.clone(),
                    cwd: cwd.clone(),
                    env: env.clone(),
                    pass_env: pass_env.clone(),
                    timeout: *timeout,
                    default_timeout: task_timeout,
                },
            )?,
        };
    }
    Ok(r)
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("handlers.\"{name}\": {message}")]
    Handler { name: String, message: String },
}
