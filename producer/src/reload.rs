//! SIGHUP: re-read the config file, swap in its schedules, API tokens and
//! `security` keys (a rotated token or signing key works at once), and name
//! the keys that only a restart applies. A file that does not validate (a
//! key file gone, too short) is rejected whole; what runs stays.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, ProducerConfig};
use crate::context::Ctx;

pub async fn on_sighup(ctx: Arc<Ctx>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload disabled");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        let Some(path) = ctx.config_path() else {
            tracing::warn!("SIGHUP: no config file to reload (started without --config)");
            continue;
        };
        match config::load_checked(Some(path)) {
            Ok(config::Checked {
                cfg: new_cfg,
                schedules,
                ..
            }) => {
                reload_tokens(&ctx, &new_cfg);
                reload_seal(&ctx, &new_cfg);
                let changed = config::restart_only_changes(ctx.cfg(), &new_cfg);
                if !changed.is_empty() {
                    let keys = changed.join(", ");
                    tracing::warn!(keys = %keys, "SIGHUP: {keys} changed; restart to apply");
                }
                ctx.timetable().apply_schedules(schedules);
                ctx.metrics().reload_success.set(1.0);
                tracing::info!("SIGHUP: schedules reloaded");
            }
            Err(e) => {
                ctx.metrics().reload_success.set(0.0);
                tracing::error!(error = %format!("{e:#}"), "SIGHUP: config rejected; keeping the running schedules");
            }
        }
    }
}

/// Swap in the keys of a reloaded config (key files re-read). Logs key
/// ids, never secrets.
fn reload_seal(ctx: &Ctx, cfg: &ProducerConfig) {
    match warren::security::Seal::from_config(&cfg.security) {
        Ok(seal) => {
            ctx.link().set_seal(seal.map(Arc::new));
            tracing::info!(
                sign_with = cfg.security.sign_with.as_deref().unwrap_or("none"),
                encrypt_with = cfg.security.encrypt_with.as_deref().unwrap_or("none"),
                "SIGHUP: security keys reloaded"
            );
        }
        // A key file changed again between validation and now.
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: security keys not reloaded; the previous ones stay")
        }
    }
}

/// Swap in the tokens of a reloaded config (tokens file re-read). Logs
/// counts, never tokens.
fn reload_tokens(ctx: &Ctx, cfg: &ProducerConfig) {
    match cfg.api.tokens() {
        Ok(tokens) => {
            if *ctx.tokens().current() == tokens {
                return;
            }
            let count = tokens.len();
            ctx.tokens().replace(tokens);
            tracing::info!(tokens = count, "SIGHUP: API tokens reloaded");
        }
        // The file changed again between validation and now.
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: API tokens not reloaded; the previous ones stay")
        }
    }
}
