//! The one error type of the shared crate, with the answer every caller needs:
//! is it worth trying again?

/// Errors from connecting, declaring and publishing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid AMQP URL: {0}")]
    Url(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("timed out after {0:?} connecting to the broker")]
    ConnectTimeout(std::time::Duration),
    #[error("{object} already exists with a different `{argument}`; delete it or make the config match (broker said: {detail})")]
    TopologyConflict {
        object: String,
        argument: String,
        detail: String,
    },
    #[error("declaring {object} failed: {detail}")]
    Declare { object: String, detail: String },
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
    #[error("no publisher confirm within {0:?} (is the broker blocking publishers under a resource alarm?)")]
    ConfirmTimeout(std::time::Duration),
    #[error("the channel is not in confirm mode")]
    NotConfirmed,
    #[error("the publishing channel went away before the broker confirmed")]
    ChannelGone,
}

impl Error {
    /// Whether the same operation may succeed later (after a reconnect or once
    /// an alarm clears). Configuration and routing mistakes never do.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Amqp(e) => e.can_be_recovered(),
            Self::ConnectTimeout(_)
            | Self::ConfirmTimeout(_)
            | Self::Nacked { .. }
            | Self::ChannelGone => true,
            Self::Url(_)
            | Self::Tls(_)
            | Self::TopologyConflict { .. }
            | Self::Declare { .. }
            | Self::Unroutable { .. }
            | Self::NotConfirmed => false,
        }
    }
}
