//! The one error type of the shared crate, with the answer every caller needs:
//! is it worth trying again?

/// Errors from connecting, declaring and publishing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Never holds the URL as written: it may carry a password.
    #[error("invalid AMQP URL: {0}")]
    Url(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker closed the connection during the TLS handshake; if it requires a client certificate, set amqp.tls_cert_file and amqp.tls_key_file to one it trusts ({0})")]
    TlsReset(lapin::Error),
    #[error("timed out after {} connecting to the broker", humantime::format_duration(*.0))]
    ConnectTimeout(std::time::Duration),
    #[error("{object} already exists with a different `{argument}`; delete it or make the config match (broker said: {detail})")]
    TopologyConflict {
        object: String,
        argument: String,
        detail: String,
    },
    #[error("declaring {object} failed: {detail}")]
    Declare { object: String, detail: String },
    #[error("{object} does not exist; declare it with a role that has configure permission, or set topology.declare = true")]
    Missing { object: String },
    #[error("broker nacked the publish to `{exchange}` with key `{routing_key}`")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "unroutable: no queue is bound to `{exchange}` for routing key `{routing_key}` ({reply})"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
        reply: String,
    },
    #[error("no publisher confirm within {} (is the broker blocking publishers under a resource alarm?)", humantime::format_duration(*.0))]
    ConfirmTimeout(std::time::Duration),
    #[error("the channel is not in confirm mode")]
    NotConfirmed,
    #[error("the publishing channel went away before the broker confirmed")]
    ChannelGone,
    /// Signing or encrypting a task failed (never holds key or payload).
    #[error("cannot seal the task: {0}")]
    Seal(String),
}

impl Error {
    /// Whether the same operation may succeed later (after a reconnect or once
    /// an alarm clears). Configuration and routing mistakes never do.
    pub fn is_transient(&self) -> bool {
        match self {
            // The broker refusing the credentials (403) or the vhost (530)
            // will refuse them again; lapin counts every protocol error as
            // recoverable.
            Self::Amqp(e) => e.can_be_recovered() && !refused(e),
            Self::ConnectTimeout(_)
            | Self::ConfirmTimeout(_)
            | Self::Nacked { .. }
            | Self::ChannelGone
            | Self::TlsReset(_) => true,
            Self::Url(_)
            | Self::Tls(_)
            | Self::TopologyConflict { .. }
            | Self::Declare { .. }
            | Self::Missing { .. }
            | Self::Unroutable { .. }
            | Self::NotConfirmed
            | Self::Seal(_) => false,
        }
    }

    /// The broker refused the credentials or the vhost: no retry will help.
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Amqp(e) if refused(e))
    }
}

/// Access refused (403) or not allowed (530, e.g. no such vhost).
fn refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => matches!(
            p.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ),
        _ => false,
    }
}
