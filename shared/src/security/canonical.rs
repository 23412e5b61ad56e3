//! The canonical form a signature covers: what a task keeps unchanged from
//! its first publish through every retry, park, delay and dead-letter
//! replay. The attempt number, the last error and the dead-letter headers
//! change between copies and are not covered.
//!
//! ```text
//! "warren-signature-v1\n"
//! then for each of: task name, message_id, timestamp, content type,
//!                   content encoding, body
//!     <byte length in decimal> ":" <bytes> "\n"
//! ```
//!
//! * task name: the `type` property, or the routing key when `type` is
//!   absent or empty;
//! * `message_id`: required (a retry must keep the id it was signed with);
//! * timestamp: the AMQP `timestamp` property (Unix seconds) in decimal,
//!   required;
//! * content type: the property, `application/json` when absent;
//! * content encoding: the property, empty when absent;
//! * body: the bytes as published (the ciphertext of an encrypted task).
//!
//! Every field is length-prefixed, so no value can be shifted into its
//! neighbour and nothing needs escaping.

use lapin::BasicProperties;

use crate::envelope::CONTENT_TYPE;

/// First line of every canonical form (the version of the scheme).
pub const DOMAIN: &[u8] = b"warren-signature-v1\n";

/// The covered values of one message, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    pub name: &'a str,
    pub message_id: &'a str,
    pub timestamp: u64,
    pub content_type: &'a str,
    pub content_encoding: &'a str,
    pub body: &'a [u8],
}

impl<'a> Fields<'a> {
    /// The covered values of a message as delivered or about to be
    /// published. `Err` says which required property is missing.
    pub fn of(
        routing_key: &'a str,
        props: &'a BasicProperties,
        body: &'a [u8],
    ) -> Result<Self, &'static str> {
        let name = match props.kind() {
            Some(t) if !t.as_str().is_empty() => t.as_str(),
            _ => crate::delay::strip_prefix(routing_key),
        };
        let message_id = props
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .ok_or("a signed task needs a message_id")?;
        let timestamp = props
            .timestamp()
            .ok_or("a signed task needs a timestamp property")?;
        Ok(Self {
            name,
            message_id,
            timestamp,
            content_type: props
                .content_type()
                .as_ref()
                .map_or(CONTENT_TYPE, |s| s.as_str()),
            content_encoding: props.content_encoding().as_ref().map_or("", |s| s.as_str()),
            body,
        })
    }

    /// Feed the canonical form to `sink` piece by piece (no copy of the body).
    pub fn write(&self, mut sink: impl FnMut(&[u8])) {
        sink(DOMAIN);
        let timestamp = self.timestamp.to_string();
        for field in [
            self.name.as_bytes(),
            self.message_id.as_bytes(),
            timestamp.as_bytes(),
            self.content_type.as_bytes(),
            self.content_encoding.as_bytes(),
            self.body,
        ] {
            sink(field.len().to_string().as_bytes());
            sink(b":");
            sink(field);
            sink(b"\n");
        }
    }

    /// The canonical form as one buffer (tests and tooling).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(|b| out.extend_from_slice(b));
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_form() {
        let props = BasicProperties::default()
            .with_message_id("id-1".into())
            .with_timestamp(1_700_000_000);
        let f = Fields::of("email.send", &props, br#"{"to":"a"}"#).unwrap();
        assert_eq!(
            String::from_utf8(f.to_bytes()).unwrap(),
            "warren-signature-v1\n10:email.send\n4:id-1\n10:1700000000\n16:application/json\n0:\n10:{\"to\":\"a\"}\n"
        );
    }

    #[test]
    fn type_wins_over_the_routing_key_and_delay_prefixes_are_ignored() {
        let props = BasicProperties::default()
            .with_message_id("i".into())
            .with_timestamp(1);
        let key = crate::delay::routing_key(std::time::Duration::from_secs(3), "a.b");
        assert_eq!(Fields::of(&key, &props, b"{}").unwrap().name, "a.b");
        let typed = props.with_type("c.d".into());
        assert_eq!(Fields::of(&key, &typed, b"{}").unwrap().name, "c.d");
    }

    #[test]
    fn id_and_timestamp_are_required() {
        let p = BasicProperties::default();
        assert!(Fields::of("t", &p, b"{}")
            .unwrap_err()
            .contains("message_id"));
        let p = p.with_message_id("i".into());
        assert!(Fields::of("t", &p, b"{}")
            .unwrap_err()
            .contains("timestamp"));
    }

    fn form(key: &str, props: &BasicProperties) -> String {
        String::from_utf8(Fields::of(key, props, b"{}").unwrap().to_bytes()).unwrap()
    }

    /// docs/contract.md: an absent `content_type` signs as
    /// `application/json`, an empty one as empty; an absent or empty
    /// `content_encoding` as empty.
    #[test]
    fn an_empty_content_type_is_not_an_absent_one() {
        let p = BasicProperties::default()
            .with_message_id("i".into())
            .with_timestamp(1);
        let field4 = |p: &BasicProperties| form("t", p).lines().nth(4).unwrap().to_owned();
        assert_eq!(field4(&p), "16:application/json");
        assert_eq!(field4(&p.clone().with_content_type("".into())), "0:");
        assert_eq!(
            field4(&p.clone().with_content_type("text/plain".into())),
            "10:text/plain"
        );
        let field5 = |p: &BasicProperties| form("t", p).lines().nth(5).unwrap().to_owned();
        assert_eq!(field5(&p), "0:");
        assert_eq!(field5(&p.clone().with_content_encoding("".into())), "0:");
    }

    /// docs/contract.md: field 1 of a task sent to a delay level without
    /// `type` is its routing key without the 25 bit words.
    #[test]
    fn field_1_of_a_delayed_task_without_type_is_the_name_without_the_prefix() {
        let p = BasicProperties::default()
            .with_message_id("i".into())
            .with_timestamp(1);
        let key = crate::delay::routing_key(std::time::Duration::from_secs(90), "email.send");
        assert_eq!(key.len(), crate::delay::PREFIX_LEN + "email.send".len());
        assert!(form(&key, &p).starts_with("warren-signature-v1\n10:email.send\n"));
        let empty_type = p.with_type("".into());
        assert!(form(&key, &empty_type).starts_with("warren-signature-v1\n10:email.send\n"));
    }

    /// Length prefixes keep a byte from moving between neighbours unnoticed.
    #[test]
    fn shifting_bytes_between_fields_changes_the_form() {
        let p = |id: &str| {
            BasicProperties::default()
                .with_message_id(id.into())
                .with_timestamp(1)
        };
        let (a, b) = (p("xy"), p("y"));
        assert_ne!(
            Fields::of("t.x", &b, b"{}").unwrap().to_bytes(),
            Fields::of("t", &a, b"{}").unwrap().to_bytes()
        );
    }
}
