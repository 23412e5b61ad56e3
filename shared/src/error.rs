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
    /// Shown as [`broker_reason`]; no `source()`, so a chain printed with
    /// `{:#}` says the broker's words once.
    #[error("{}", broker_reason(.0))]
    Amqp(lapin::Error),
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

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Self::Amqp(e)
    }
}

/// What went wrong, in the broker's words when it said something: for a
/// channel or connection it closed, its reply text alone, which names the
/// code and the object (`ACCESS_REFUSED - access to queue 'warren.dead' in
/// vhost '/' refused for user 'u'`); otherwise lapin's description
/// (`AMQP: IO error: …`). lapin's own text would repeat the code three times.
pub fn broker_reason(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) if !p.get_message().as_str().is_empty() => {
            p.get_message().as_str().to_owned()
        }
        _ => format!("AMQP: {e}"),
    }
}

/// What a caught panic said: the `&str` or `String` it was given, else
/// `non-string panic payload`. Pass the payload itself (`&*boxed`): a
/// `&Box<dyn Any>` is an `Any` too, and never a string.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

/// An error and its causes on one line (`a: b: c`), a lapin error in the
/// broker's words ([`broker_reason`], which already holds its causes),
/// leaving out a cause whose text the line already holds.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let (text, next) = match c.downcast_ref::<lapin::Error>() {
            Some(l) => (broker_reason(l), None),
            None => (c.to_string(), c.source()),
        };
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cur = next;
    }
    line
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

    /// An error no reconnect can fix: refused credentials or vhost, a bad
    /// URL or TLS file, a topology that conflicts with the broker's or is
    /// missing. Both roles stop on it with the clear error instead of
    /// retrying forever.
    pub fn is_fatal(&self) -> bool {
        self.is_refused()
            || matches!(
                self,
                Self::Url(_)
                    | Self::Tls(_)
                    | Self::TopologyConflict { .. }
                    | Self::Declare { .. }
                    | Self::Missing { .. }
            )
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

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPSoftError};

    #[test]
    fn a_panic_says_what_it_was_given() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let literal = caught(|| panic!("kaboom"));
        let formatted = caught(|| panic!("n = {}", 3));
        let other = caught(|| std::panic::panic_any(7_u8));
        std::panic::set_hook(hook);
        assert_eq!(panic_message(&*literal), "kaboom");
        assert_eq!(panic_message(&*formatted), "n = 3");
        assert_eq!(panic_message(&*other), "non-string panic payload");
    }

    const REFUSAL: &str =
        "ACCESS_REFUSED - access to queue 'warren.dead' in vhost '/' refused for user 'u'";

    fn refused() -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPSoftError::ACCESSREFUSED.into(),
            REFUSAL.into(),
        ))
        .into()
    }

    /// lapin's own text says the code three times and `{:#}` adds its
    /// source again; warren says the broker's reply once.
    #[test]
    fn a_refusal_reads_once_in_the_brokers_words() {
        assert_eq!(broker_reason(&refused()), REFUSAL);
        assert_eq!(Error::from(refused()).to_string(), REFUSAL);
        assert!(Error::from(refused()).is_refused());
        let io: lapin::Error = std::io::Error::other("reset").into();
        assert_eq!(broker_reason(&io), "AMQP: IO error: reset");

        let wrapped = anyhow::Error::from(Error::from(refused())).context("cannot purge");
        assert_eq!(report(wrapped.as_ref()), format!("cannot purge: {REFUSAL}"));
        let raw = anyhow::Error::from(refused()).context("publishing task `t`");
        assert_eq!(
            report(raw.as_ref()),
            format!("publishing task `t`: {REFUSAL}")
        );
        assert_eq!(format!("{raw:#}").matches("ACCESS_REFUSED -").count(), 2);
        assert_eq!(report(raw.as_ref()).matches("ACCESS").count(), 1);
    }
}
