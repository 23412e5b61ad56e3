//! Payload encryption: AES-256-GCM, marked by
//! `content-encoding: warren-aes256gcm;k=<key id>`, the body being a random
//! 96-bit nonce followed by the ciphertext and its 16-byte tag. No
//! associated data: the signature covers the metadata (encrypt-then-MAC).

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, Nonce};
use lapin::BasicProperties;
use rand::RngCore;

use super::keys::Keyring;

/// The `content-encoding` of an encrypted task, before `;k=<key id>`.
pub const ENCODING: &str = "warren-aes256gcm";
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// `content-encoding` for a body encrypted with key `id`.
pub fn encoding(id: &str) -> String {
    format!("{ENCODING};k={id}")
}

/// Whether a message's body is encrypted by warren (its bytes are not the
/// JSON payload).
pub fn is_encrypted(props: &BasicProperties) -> bool {
    props
        .content_encoding()
        .as_ref()
        .is_some_and(|e| is_ours(e.as_str()))
}

fn is_ours(encoding: &str) -> bool {
    encoding
        .strip_prefix(ENCODING)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(';'))
}

/// The key id of a warren `content-encoding`; `None` when it is not ours.
pub fn key_id(encoding: &str) -> Option<Result<&str, String>> {
    if !is_ours(encoding) {
        return None;
    }
    let id = encoding[ENCODING.len()..]
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("k="))
        .next();
    Some(match id {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(format!(
            "content-encoding `{ENCODING}` names no key (expected `{ENCODING};k=<key id>`)"
        )),
    })
}

/// Encrypt `plain` with `cipher`: nonce ‖ ciphertext ‖ tag.
pub fn seal(cipher: &Aes256Gcm, plain: &[u8]) -> Result<Vec<u8>, String> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), plain)
        .map_err(|_| "payload too large to encrypt".to_owned())?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

impl Keyring {
    /// Decrypt a body encrypted with key `id`. The error is a dead-letter
    /// reason.
    pub fn decrypt(&self, id: &str, body: &[u8]) -> Result<Vec<u8>, String> {
        let Some(cipher) = self.encrypt.get(id) else {
            return Err(format!(
                "encrypted with key `{}`, which this consumer does not hold",
                id.chars().take(32).collect::<String>()
            ));
        };
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(format!(
                "encrypted body of {} bytes is shorter than a nonce and a tag ({} bytes)",
                body.len(),
                NONCE_LEN + TAG_LEN
            ));
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| format!("cannot decrypt with key `{id}`: the ciphertext or its tag was altered, or it was encrypted with another key"))
    }

    /// Encrypt with key `id` (`None`: no such key).
    pub fn encrypt(&self, id: &str, plain: &[u8]) -> Option<Result<Vec<u8>, String>> {
        self.encrypt.get(id).map(|c| seal(c, plain))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::security::SecurityConfig;

    fn ring() -> Keyring {
        let cfg: SecurityConfig = toml::from_str(
            "[[keys]]\nid = \"e1\"\nkind = \"encrypt\"\nsecret_env = \"E1\"\n\
             [[keys]]\nid = \"e2\"\nkind = \"encrypt\"\nsecret_env = \"E2\"\n",
        )
        .unwrap();
        cfg.keyring_with(|v| Some(if v == "E1" { "11" } else { "22" }.repeat(32)))
            .unwrap()
    }

    #[test]
    fn round_trip_with_a_fresh_nonce_each_time() {
        let ring = ring();
        let plain = br#"{"ssn":"078-05-1120"}"#;
        let a = ring.encrypt("e1", plain).unwrap().unwrap();
        let b = ring.encrypt("e1", plain).unwrap().unwrap();
        assert_ne!(a, b, "nonces differ");
        assert_eq!(a.len(), NONCE_LEN + plain.len() + TAG_LEN);
        assert!(!a.windows(3).any(|w| w == b"ssn"));
        assert_eq!(ring.decrypt("e1", &a).unwrap(), plain);
        let e = ring.decrypt("e2", &a).unwrap_err();
        assert!(e.contains("another key"), "{e}");
        let mut flipped = a.clone();
        flipped[NONCE_LEN] ^= 1;
        assert!(ring.decrypt("e1", &flipped).is_err());
        assert!(ring
            .decrypt("e9", &a)
            .unwrap_err()
            .contains("does not hold"));
        assert!(ring
            .decrypt("e1", &a[..20])
            .unwrap_err()
            .contains("shorter"));
    }

    #[test]
    fn encoding_marker() {
        assert_eq!(key_id(&encoding("e1")), Some(Ok("e1")));
        assert_eq!(key_id("gzip"), None);
        assert_eq!(key_id("warren-aes256gcmX"), None);
        assert!(matches!(key_id("warren-aes256gcm"), Some(Err(_))));
        let p = BasicProperties::default().with_content_encoding(encoding("e1").into());
        assert!(is_encrypted(&p));
        assert!(!is_encrypted(&BasicProperties::default()));
    }

    /// The example of docs/contract.md decrypts with the documented key.
    #[test]
    fn the_contract_example_decrypts() {
        use base64::Engine;
        let contract = include_str!("../../../docs/contract.md");
        let body = "ZGVmZ2hpamtsbW5vMzmqCVvTdP9aAx+NogQHjS6nKGnkAdEPhJ1A4HXcNV1OJcek/8f38Q==";
        assert!(contract.contains(&format!("`{body}`")));
        let body = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(body.len(), 52);
        assert_eq!(body[..NONCE_LEN], (100..112).collect::<Vec<u8>>());
        let cfg: SecurityConfig =
            toml::from_str("[[keys]]\nid = \"e1\"\nkind = \"encrypt\"\nsecret_env = \"E1\"\n")
                .unwrap();
        let key: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        let ring = cfg.keyring_with(|_| Some(key.clone())).unwrap();
        assert_eq!(
            ring.decrypt("e1", &body).unwrap(),
            br#"{"to":"ada@example.com"}"#
        );
    }
}
