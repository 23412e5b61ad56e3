//! The consuming side: check the signature as `security.verify` asks, then
//! decrypt. Either refusal dead-letters the delivery at once, before any
//! handler sees it. With `verify = off` and an unencrypted message this is
//! two property lookups and no allocation.

use lapin::types::AMQPValue;
use lapin::BasicProperties;

use super::canonical::Fields;
use super::encrypt;
use super::keys::{InvalidSecurity, Keyring, SecurityConfig, Verify};
use super::sign::BadSignature;
use crate::envelope::headers;

/// Dead-letter kinds (`x-warren-dead-kind`) of a refused delivery.
pub mod kind {
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const UNDECRYPTABLE: &str = "undecryptable";
}

/// Why a delivery is refused; its `Display` is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    BadSignature(#[from] BadSignature),
    #[error("{0}")]
    Undecryptable(String),
}

impl Refusal {
    /// The `x-warren-dead-kind` and metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadSignature(_) => kind::BAD_SIGNATURE,
            Self::Undecryptable(_) => kind::UNDECRYPTABLE,
        }
    }
}

/// Verifies and decrypts deliveries.
#[derive(Debug, Clone)]
pub struct Opener {
    ring: Keyring,
    verify: Verify,
}

impl Opener {
    pub fn from_config(cfg: &SecurityConfig) -> Result<Self, InvalidSecurity> {
        Ok(Self::new(cfg.keyring()?, cfg.verify_mode()))
    }

    pub fn new(ring: Keyring, verify: Verify) -> Self {
        Self { ring, verify }
    }

    /// Neither verifies nor decrypts (what a config without `[security]` gives).
    pub fn off() -> Self {
        Self::new(Keyring::default(), Verify::Off)
    }

    pub fn verify_mode(&self) -> Verify {
        self.verify
    }

    /// The keys, e.g. for dead-letter tooling that shows plaintext to a
    /// holder of the key.
    pub fn keyring(&self) -> &Keyring {
        &self.ring
    }

    /// Check a delivery. `Ok(Some(plaintext))` for an encrypted body,
    /// `Ok(None)` when the body is the payload as delivered.
    pub fn open(
        &self,
        routing_key: &str,
        props: &BasicProperties,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, Refusal> {
        if self.verify != Verify::Off {
            self.check_signature(routing_key, props, body)?;
        }
        let Some(encoding) = props.content_encoding() else {
            return Ok(None);
        };
        match encrypt::key_id(encoding.as_str()) {
            None => Ok(None),
            Some(Err(why)) => Err(Refusal::Undecryptable(why)),
            Some(Ok(id)) => self
                .ring
                .decrypt(id, body)
                .map(Some)
                .map_err(Refusal::Undecryptable),
        }
    }

    fn check_signature(
        &self,
        routing_key: &str,
        props: &BasicProperties,
        body: &[u8],
    ) -> Result<(), BadSignature> {
        let value = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(headers::SIGNATURE));
        let text = match value {
            None if self.verify == Verify::Required => return Err(BadSignature::Missing),
            None => return Ok(()),
            Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
                .map_err(|_| BadSignature::Malformed("not UTF-8 text".into()))?,
            Some(AMQPValue::ShortString(s)) => s.as_str(),
            // RabbitMQ's tables have no short string; a byte array (`x`) is
            // what pika makes of `bytes` and amqplib of a `Buffer`: refused
            // by name, so the sender sees which type to send instead.
            Some(other) => {
                return Err(BadSignature::Malformed(format!(
                    "the header is {}, not a long string (AMQP field type `S`)",
                    field_type(other)
                )))
            }
        };
        let fields = Fields::of(routing_key, props, body)
            .map_err(|why| BadSignature::Malformed(why.to_owned()))?;
        self.ring.verify(text, &fields)
    }
}

/// How a header's AMQP field type reads in a dead-letter reason.
fn field_type(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::ByteArray(_) => "a byte array (`x`)",
        AMQPValue::FieldTable(_) => "a table (`F`)",
        AMQPValue::FieldArray(_) => "an array (`A`)",
        AMQPValue::Boolean(_) => "a boolean (`t`)",
        AMQPValue::Void => "void (`V`)",
        _ => "a number or timestamp",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::security::Seal;
    use lapin::types::{ByteArray, FieldTable};

    fn ring() -> Keyring {
        let cfg: SecurityConfig =
            toml::from_str("[[keys]]\nid = \"k1\"\nsecret_env = \"K1\"\n").unwrap();
        cfg.keyring_with(|_| Some("0123456789abcdef0123456789abcdef".into()))
            .unwrap()
    }

    /// docs/contract.md: the header is a long string (`S`); a byte array
    /// holding the very same text, or any other type, is malformed.
    #[test]
    fn the_signature_header_is_a_long_string() {
        let task = crate::Task::new("a", &serde_json::json!({}));
        let seal = Seal::new(ring(), Some("k1".into()), None).unwrap();
        let (signed, body) = seal.apply(task.properties(), &task.payload).unwrap();
        let value = signed.headers().as_ref().unwrap().inner()[headers::SIGNATURE].clone();
        let AMQPValue::LongString(text) = value else {
            panic!("warren sends a long string: {value:?}")
        };
        let opener = Opener::new(ring(), Verify::Required);
        assert_eq!(opener.open("a", &signed, &body), Ok(None));
        let with = |v: AMQPValue| {
            let mut h: FieldTable = signed.headers().clone().unwrap();
            h.insert(headers::SIGNATURE.into(), v);
            signed.clone().with_headers(h)
        };
        for (v, says) in [
            (
                AMQPValue::ByteArray(ByteArray::from(text.as_bytes().to_vec())),
                "a byte array (`x`), not a long string (AMQP field type `S`)",
            ),
            (AMQPValue::LongLongInt(1), "a number or timestamp"),
            (
                AMQPValue::LongString(b"v1:k1:\xff".to_vec().into()),
                "not UTF-8",
            ),
        ] {
            let e = opener.open("a", &with(v), &body).unwrap_err();
            assert_eq!(e.kind(), kind::BAD_SIGNATURE);
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
