//! The `x-warren-signature` header: `v1:<key id>:<base64 HMAC-SHA256 of the
//! canonical form>` (standard base64 with padding), and the ways a check
//! fails. Comparison is constant-time (`hmac`'s `verify_slice`).

use base64::Engine;
use hmac::Mac;

use super::canonical::Fields;
use super::keys::Keyring;

/// Version tag of the header value.
pub const VERSION: &str = "v1";
/// Bytes of an HMAC-SHA256.
pub const MAC_LEN: usize = 32;

/// Why a task's signature is not accepted. Displayed as the dead-letter
/// reason: says what failed, never a secret or a payload byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSignature {
    #[error("no x-warren-signature header (security.verify = required)")]
    Missing,
    #[error("malformed x-warren-signature: {0}")]
    Malformed(String),
    #[error("signed with key `{0}`, which this consumer does not hold")]
    UnknownKey(String),
    #[error(
        "x-warren-signature (key `{0}`) does not match the task: its name, id, timestamp, \
         content type, content encoding or body changed since it was signed, or it was \
         signed with another secret"
    )]
    Mismatch(String),
}

/// The header value for `fields`, signed with key `id`.
pub fn header_value(id: &str, key: &hmac::Hmac<sha2::Sha256>, fields: &Fields<'_>) -> String {
    let mut mac = key.clone();
    fields.write(|b| mac.update(b));
    let tag = mac.finalize().into_bytes();
    format!(
        "{VERSION}:{id}:{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Split a header value into key id and MAC bytes.
pub fn parse(value: &str) -> Result<(&str, [u8; MAC_LEN]), BadSignature> {
    let malformed = |why: &str| {
        BadSignature::Malformed(format!(
            "{why} (expected {VERSION}:<key id>:<base64 HMAC-SHA256>)"
        ))
    };
    let mut parts = value.splitn(3, ':');
    let (Some(version), Some(id), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("not three `:`-separated parts"));
    };
    if version != VERSION {
        return Err(malformed(&format!(
            "unknown version `{}`",
            shorten(version)
        )));
    }
    if id.is_empty() {
        return Err(malformed("empty key id"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(mac.trim())
        .map_err(|_| malformed("the MAC is not valid base64 (truncated?)"))?;
    let tag = <[u8; MAC_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        malformed(&format!(
            "the MAC has {} bytes, not {MAC_LEN} (truncated?)",
            bytes.len()
        ))
    })?;
    Ok((id, tag))
}

/// At most 32 characters of something a sender wrote, for a reason text.
fn shorten(s: &str) -> String {
    s.chars().take(32).collect()
}

impl Keyring {
    /// Check `header` against `fields` with the key it names.
    pub fn verify(&self, header: &str, fields: &Fields<'_>) -> Result<(), BadSignature> {
        let (id, tag) = parse(header)?;
        let Some(key) = self.sign.get(id) else {
            return Err(BadSignature::UnknownKey(shorten(id)));
        };
        let mut mac = key.clone();
        fields.write(|b| mac.update(b));
        mac.verify_slice(&tag)
            .map_err(|_| BadSignature::Mismatch(id.to_owned()))
    }

    /// The header value for `fields` under signing key `id` (`None`: no such key).
    pub fn sign(&self, id: &str, fields: &Fields<'_>) -> Option<String> {
        self.sign.get(id).map(|k| header_value(id, k, fields))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::security::SecurityConfig;
    use lapin::BasicProperties;

    fn ring() -> Keyring {
        let cfg: SecurityConfig = toml::from_str(
            "[[keys]]\nid = \"k1\"\nsecret_env = \"K1\"\n[[keys]]\nid = \"k2\"\nsecret_env = \"K2\"\n",
        )
        .unwrap();
        cfg.keyring_with(|v| Some(format!("{v}-0123456789abcdef0123456789abcdef")))
            .unwrap()
    }

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_message_id("id-1".into())
            .with_timestamp(1_700_000_000)
    }

    #[test]
    fn sign_then_verify_and_every_refusal() {
        let ring = ring();
        let p = props();
        let f = Fields::of("email.send", &p, b"{}").unwrap();
        let h = ring.sign("k1", &f).unwrap();
        assert!(h.starts_with("v1:k1:"), "{h}");
        assert_eq!(ring.verify(&h, &f), Ok(()));

        let tampered = Fields { body: b"{ }", ..f };
        assert_eq!(
            ring.verify(&h, &tampered),
            Err(BadSignature::Mismatch("k1".into()))
        );
        let renamed = Fields {
            name: "email.sent",
            ..f
        };
        assert!(matches!(
            ring.verify(&h, &renamed),
            Err(BadSignature::Mismatch(_))
        ));
        // Same id, other key's secret.
        let k2 = ring.sign("k2", &f).unwrap();
        let forged = k2.replacen("v1:k2:", "v1:k1:", 1);
        assert!(matches!(
            ring.verify(&forged, &f),
            Err(BadSignature::Mismatch(_))
        ));

        let unknown = h.replacen("v1:k1:", "v1:k9:", 1);
        assert_eq!(
            ring.verify(&unknown, &f),
            Err(BadSignature::UnknownKey("k9".into()))
        );
        let truncated = &h[..h.len() - 8];
        let e = ring.verify(truncated, &f).unwrap_err().to_string();
        assert!(e.starts_with("malformed") && e.contains("truncated"), "{e}");
        for bad in ["", "v1:k1", "v2:k1:AAAA", "v1::AAAA"] {
            assert!(
                matches!(ring.verify(bad, &f), Err(BadSignature::Malformed(_))),
                "{bad}"
            );
        }
    }

    const CONTRACT: &str = include_str!("../../../docs/contract.md");

    /// The example of docs/contract.md, byte for byte: its canonical form
    /// and its header under the documented secret.
    #[test]
    fn the_contract_example_signs_as_documented() {
        let cfg: SecurityConfig =
            toml::from_str("[[keys]]\nid = \"k1\"\nsecret_env = \"K1\"\n").unwrap();
        let ring = cfg
            .keyring_with(|_| Some("0123456789abcdef0123456789abcdef".into()))
            .unwrap();
        let p = props();
        let f = Fields::of("email.send", &p, b"{}").unwrap();
        let form = String::from_utf8(f.to_bytes())
            .unwrap()
            .replace('\n', "\\n");
        assert!(CONTRACT.contains(&format!("`{form}`")), "{form}");
        let header = ring.sign("k1", &f).unwrap();
        assert!(CONTRACT.contains(&format!("`{header}`")), "{header}");
        assert_eq!(header.len(), "v1:k1:".len() + 44);
        assert!(header.ends_with('='));
    }

    /// docs/contract.md: standard base64 with its padding; whitespace
    /// around it ignored; unpadded and URL-safe refused.
    #[test]
    fn the_mac_is_standard_padded_base64() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
        let mac = [0xfb; MAC_LEN];
        let std = STANDARD.encode(mac);
        assert!(std.contains('+') && std.contains('/') && std.ends_with('='));
        assert_eq!(parse(&format!("v1:k1:{std}")), Ok(("k1", mac)));
        assert_eq!(parse(&format!("v1:k1: {std}\n")), Ok(("k1", mac)));
        for bad in [STANDARD_NO_PAD.encode(mac), URL_SAFE.encode(mac)] {
            let e = parse(&format!("v1:k1:{bad}")).unwrap_err().to_string();
            assert!(e.contains("not valid base64"), "{bad}: {e}");
        }
        let short = STANDARD.encode([0xfb; 31]);
        let e = parse(&format!("v1:k1:{short}")).unwrap_err().to_string();
        assert!(e.contains("31 bytes, not 32"), "{e}");
        for bad in ["V1:k1:AAAA", " v1:k1:AAAA"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown version"), "{e}");
        }
    }
}
