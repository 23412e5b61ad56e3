//! The publishing side: encrypt the payload (`security.encrypt_with`), then
//! sign what travels (`security.sign_with`). Built once from the config; a
//! [`Publisher`](crate::amqp::Publisher) holding one seals every task it
//! sends, so no publish path of the producer can forget it.

use std::borrow::Cow;
use std::fmt;

use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;

use super::canonical::Fields;
use super::encrypt;
use super::keys::{InvalidSecurity, Keyring, SecurityConfig};
use crate::envelope::headers;

/// Keys and choices of a sealing publisher. `Debug` shows ids only.
pub struct Seal {
    ring: Keyring,
    sign_with: Option<String>,
    encrypt_with: Option<String>,
}

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seal")
            .field("sign_with", &self.sign_with)
            .field("encrypt_with", &self.encrypt_with)
            .finish()
    }
}

impl Seal {
    /// `None` when the config neither signs nor encrypts.
    pub fn from_config(cfg: &SecurityConfig) -> Result<Option<Self>, InvalidSecurity> {
        let ring = cfg.keyring()?;
        Ok(Self::new(
            ring,
            cfg.sign_with.clone(),
            cfg.encrypt_with.clone(),
        ))
    }

    /// From a loaded keyring; `None` when there is nothing to do.
    pub fn new(
        ring: Keyring,
        sign_with: Option<String>,
        encrypt_with: Option<String>,
    ) -> Option<Self> {
        (sign_with.is_some() || encrypt_with.is_some()).then_some(Self {
            ring,
            sign_with,
            encrypt_with,
        })
    }

    /// The properties and body a message goes out with. `props` must carry
    /// `type`, `message_id` and `timestamp` (every [`Task`](crate::Task)'s
    /// properties do). A body that already has a content encoding is not
    /// encrypted again, and a message that already carries a signature keeps
    /// it: a dead task republished through a sealing publisher is never
    /// re-signed, so a forged one stays refused.
    pub fn apply<'b>(
        &self,
        mut props: BasicProperties,
        body: &'b [u8],
    ) -> Result<(BasicProperties, Cow<'b, [u8]>), String> {
        let mut body = Cow::Borrowed(body);
        if let Some(id) = &self.encrypt_with {
            if props.content_encoding().is_none() {
                let sealed = self
                    .ring
                    .encrypt(id, &body)
                    .ok_or_else(|| format!("no encryption key `{id}`"))??;
                body = Cow::Owned(sealed);
                props = props.with_content_encoding(encrypt::encoding(id).as_str().into());
            }
        }
        let signed = props
            .headers()
            .as_ref()
            .is_some_and(|h| h.contains_key(headers::SIGNATURE));
        if let Some(id) = self.sign_with.as_ref().filter(|_| !signed) {
            let value = {
                let fields = Fields::of("", &props, &body).map_err(str::to_owned)?;
                self.ring
                    .sign(id, &fields)
                    .ok_or_else(|| format!("no signing key `{id}`"))?
            };
            let mut h = props.headers().clone().unwrap_or_default();
            h.insert(
                ShortString::from(headers::SIGNATURE),
                AMQPValue::LongString(value.as_str().into()),
            );
            props = props.with_headers(h);
        }
        Ok((props, body))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::security::{Opener, Refusal, Verify};
    use crate::Task;

    fn ring() -> Keyring {
        let cfg: SecurityConfig = toml::from_str(
            "[[keys]]\nid = \"k1\"\nsecret_env = \"K1\"\n\
             [[keys]]\nid = \"e1\"\nkind = \"encrypt\"\nsecret_env = \"E1\"\n",
        )
        .unwrap();
        cfg.keyring_with(|v| {
            Some(match v {
                "E1" => "ab".repeat(32),
                _ => "k1-0123456789abcdef0123456789abcdef".into(),
            })
        })
        .unwrap()
    }

    /// What a retry, a park or a dead-letter copy does to a task: decode,
    /// change what changes between attempts, publish the properties again.
    #[test]
    fn a_sealed_task_stays_valid_through_republishes() {
        let seal = Seal::new(ring(), Some("k1".into()), Some("e1".into())).unwrap();
        let opener = Opener::new(ring(), Verify::Required);
        let task = Task::new("pii.send", &serde_json::json!({"name": "Ada"}));
        let (props, body) = seal.apply(task.properties(), &task.payload).unwrap();
        assert!(!body.windows(3).any(|w| w == b"Ada"), "ciphertext only");
        assert_eq!(
            opener.open("pii.send", &props, &body).unwrap().as_deref(),
            Some(task.payload.as_slice())
        );

        let mut copy = Task::decode("pii.send", &props, &body, usize::MAX).unwrap();
        assert_eq!(copy.payload, body.as_ref(), "the copy keeps the ciphertext");
        copy.attempt = 3;
        copy.last_error = Some("boom".into());
        let again = copy.properties();
        let delayed = crate::delay::routing_key(std::time::Duration::from_secs(2), "pii.send");
        assert!(opener.open(&delayed, &again, &copy.payload).is_ok());

        // A replay under another name is refused.
        let renamed = again.clone().with_type("pii.delete".into());
        assert!(matches!(
            opener.open("pii.delete", &renamed, &copy.payload),
            Err(Refusal::BadSignature(_))
        ));
        // Without the encryption key: verified, but undecryptable.
        let no_aes = Opener::new(
            {
                let mut r = ring();
                r.encrypt.clear();
                r
            },
            Verify::Required,
        );
        let e = no_aes.open("pii.send", &again, &copy.payload).unwrap_err();
        assert_eq!(e.kind(), "undecryptable");
        assert!(e.to_string().contains("`e1`"), "{e}");
    }

    /// docs/contract.md: an encrypted task keeps `content_type:
    /// application/json` (the plaintext's) and the signature covers it.
    #[test]
    fn an_encrypted_task_keeps_its_json_content_type() {
        let seal = Seal::new(ring(), Some("k1".into()), Some("e1".into())).unwrap();
        let task = Task::new("pii.send", &serde_json::json!({}));
        let (props, body) = seal.apply(task.properties(), &task.payload).unwrap();
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.content_encoding().as_ref().map(|s| s.as_str()),
            Some("warren-aes256gcm;k=e1")
        );
        let fields = Fields::of("pii.send", &props, &body).unwrap();
        assert_eq!(fields.content_type, "application/json");
        // Another content type on the same ciphertext no longer verifies.
        let opener = Opener::new(ring(), Verify::Required);
        let octets = props.with_content_type("application/octet-stream".into());
        assert!(matches!(
            opener.open("pii.send", &octets, &body),
            Err(Refusal::BadSignature(_))
        ));
    }

    #[test]
    fn verify_modes() {
        let task = Task::new("a", &serde_json::json!({}));
        let plain = task.properties();
        let when = Opener::new(ring(), Verify::WhenPresent);
        assert_eq!(when.open("a", &plain, &task.payload), Ok(None));
        let required = Opener::new(ring(), Verify::Required);
        let e = required.open("a", &plain, &task.payload).unwrap_err();
        assert_eq!(e.kind(), "bad_signature");
        assert!(e.to_string().contains("no x-warren-signature"), "{e}");
        let seal = Seal::new(ring(), Some("k1".into()), None).unwrap();
        let (signed, body) = seal.apply(plain, &task.payload).unwrap();
        assert_eq!(required.open("a", &signed, &body), Ok(None));
        // A forged signature is kept, never replaced by a valid one.
        let forged = signed.clone().with_type("b".into());
        let (kept, _) = seal.apply(forged.clone(), &body).unwrap();
        assert_eq!(kept.headers(), forged.headers());
        assert!(required.open("b", &kept, &body).is_err());
        let off = Opener::off();
        assert_eq!(off.open("a", &signed, b"tampered"), Ok(None));
        assert!(when.open("a", &signed, b"tampered").is_err());
    }
}
