//! The `[security]` config section both roles share, and the [`Keyring`] it
//! loads: signing secrets and encryption keys by id, read from files or
//! environment variables at start. A secret never reaches a log, an error
//! message or a `Debug` print: errors name the key and the file, never the
//! bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Shortest signing secret accepted, in bytes (HMAC-SHA256's block of
/// security: 256 bits).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest key id: ids travel in every signed message's header.
pub const MAX_ID_LEN: usize = 64;

/// `[security]`: keys, and what each role does with them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Every key this process may use, by id.
    pub keys: Vec<KeyConfig>,
    /// Producer: sign everything it publishes with this signing key.
    pub sign_with: Option<String>,
    /// Producer: encrypt every payload it publishes with this encryption key.
    pub encrypt_with: Option<String>,
    /// Consumer: which deliveries must carry a valid signature. Unset:
    /// `when_present` once a signing key is configured, else `off`.
    pub verify: Option<Verify>,
}

/// How a consumer treats `x-warren-signature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// Signatures are not looked at.
    Off,
    /// A signature that is present must be valid; unsigned tasks run.
    WhenPresent,
    /// Every task must carry a valid signature.
    Required,
}

impl Verify {
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::WhenPresent => "when_present",
            Self::Required => "required",
        }
    }
}

/// One key: an id, what it is for, and where its secret is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Named in `sign_with` / `encrypt_with` and in every message it
    /// signs or encrypts: letters, digits, `.`, `_`, `-`.
    pub id: String,
    #[serde(default)]
    pub kind: KeyKind,
    /// A file holding the secret (surrounding whitespace ignored: [`SPACE`]).
    pub secret_file: Option<PathBuf>,
    /// An environment variable holding the secret.
    pub secret_env: Option<String>,
}

/// A key serves one purpose only: an HMAC secret is never an AES key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// HMAC-SHA256 secret: any bytes, at least [`MIN_SECRET_LEN`].
    #[default]
    Sign,
    /// AES-256-GCM key: exactly 32 bytes, written as 64 hex digits or base64.
    Encrypt,
}

/// Why the `[security]` section is unusable: names the key (and a file or
/// variable name), never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSecurity {
    pub key: String,
    /// Shown as `key = value` when not empty; never a secret.
    pub value: String,
    pub why: String,
}

impl fmt::Display for InvalidSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)?;
        if !self.value.is_empty() {
            write!(f, " = {}", self.value)?;
        }
        write!(f, ": {}", self.why)
    }
}

impl std::error::Error for InvalidSecurity {}

fn invalid(
    key: impl Into<String>,
    value: impl Into<String>,
    why: impl Into<String>,
) -> InvalidSecurity {
    InvalidSecurity {
        key: key.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// The loaded keys. `Debug` shows ids only.
#[derive(Clone, Default)]
pub struct Keyring {
    pub(crate) sign: BTreeMap<String, Hmac<Sha256>>,
    pub(crate) encrypt: BTreeMap<String, Aes256Gcm>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("sign", &self.sign.keys().collect::<Vec<_>>())
            .field("encrypt", &self.encrypt.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    pub fn is_empty(&self) -> bool {
        self.sign.is_empty() && self.encrypt.is_empty()
    }

    /// The signing keys' ids.
    pub fn signing_ids(&self) -> impl Iterator<Item = &str> {
        self.sign.keys().map(String::as_str)
    }

    /// The encryption keys' ids.
    pub fn encryption_ids(&self) -> impl Iterator<Item = &str> {
        self.encrypt.keys().map(String::as_str)
    }
}

impl SecurityConfig {
    /// The verification mode in force (see [`SecurityConfig::verify`]).
    pub fn verify_mode(&self) -> Verify {
        self.verify
            .unwrap_or(if self.keys.iter().any(|k| k.kind == KeyKind::Sign) {
                Verify::WhenPresent
            } else {
                Verify::Off
            })
    }

    /// Read every secret (files, and this process's environment) and check
    /// the whole section: the one validation `check`, `run` and a reload
    /// share.
    pub fn keyring(&self) -> Result<Keyring, InvalidSecurity> {
        self.keyring_with(|var| std::env::var(var).ok())
    }

    /// As [`SecurityConfig::keyring`], with the environment given.
    pub fn keyring_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Keyring, InvalidSecurity> {
        let mut ring = Keyring::default();
        for (i, k) in self.keys.iter().enumerate() {
            let at = format!("security.keys[{i}]");
            check_id(&k.id)
                .map_err(|why| invalid(format!("{at}.id"), format!("{:?}", k.id), why))?;
            if ring.sign.contains_key(&k.id) || ring.encrypt.contains_key(&k.id) {
                return Err(invalid(
                    format!("{at}.id"),
                    format!("{:?}", k.id),
                    "used by an earlier key: ids must be unique",
                ));
            }
            let (origin, raw) = read_secret(&at, k, &env)?;
            let text = trim_ascii(&raw);
            match k.kind {
                KeyKind::Sign => {
                    if text.len() < MIN_SECRET_LEN {
                        return Err(invalid(
                            origin.0,
                            origin.1,
                            format!(
                                "a signing secret must be at least {MIN_SECRET_LEN} bytes, this one has {} \
                                 (make one with `openssl rand -hex 32`)",
                                text.len()
                            ),
                        ));
                    }
                    let mac = <Hmac<Sha256> as Mac>::new_from_slice(text).map_err(|_| {
                        invalid(origin.0.clone(), origin.1.clone(), "unusable HMAC key")
                    })?;
                    ring.sign.insert(k.id.clone(), mac);
                }
                KeyKind::Encrypt => {
                    let key = aes_key(text)
                        .map_err(|why| invalid(origin.0.clone(), origin.1.clone(), why))?;
                    let cipher = Aes256Gcm::new_from_slice(&key)
                        .map_err(|_| invalid(origin.0, origin.1, "unusable AES-256 key"))?;
                    ring.encrypt.insert(k.id.clone(), cipher);
                }
            }
        }
        if let Some(id) = &self.sign_with {
            if !ring.sign.contains_key(id) {
                return Err(invalid(
                    "security.sign_with",
                    format!("{id:?}"),
                    not_configured(id, KeyKind::Sign, self),
                ));
            }
        }
        if let Some(id) = &self.encrypt_with {
            if !ring.encrypt.contains_key(id) {
                return Err(invalid(
                    "security.encrypt_with",
                    format!("{id:?}"),
                    not_configured(id, KeyKind::Encrypt, self),
                ));
            }
        }
        if self.verify == Some(Verify::Required) && ring.sign.is_empty() {
            return Err(invalid(
                "security.verify",
                "\"required\"",
                "no signing key in security.keys to verify with",
            ));
        }
        Ok(ring)
    }
}

fn not_configured(id: &str, want: KeyKind, cfg: &SecurityConfig) -> String {
    let (want_name, other_name) = match want {
        KeyKind::Sign => ("sign", "encrypt"),
        KeyKind::Encrypt => ("encrypt", "sign"),
    };
    if cfg.keys.iter().any(|k| k.id == id) {
        format!(
            "key {id:?} has kind = \"{other_name}\"; this needs a key with kind = \"{want_name}\""
        )
    } else {
        format!("no key with this id in security.keys (kind = \"{want_name}\")")
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("expected 1 to {MAX_ID_LEN} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(
            "only letters, digits, `.`, `_` and `-` (the id travels in message headers)".into(),
        );
    }
    Ok(())
}

/// `((key, shown value), secret bytes)`: where the secret came from, for
/// errors, and the secret itself.
fn read_secret(
    at: &str,
    k: &KeyConfig,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<((String, String), Vec<u8>), InvalidSecurity> {
    match (&k.secret_file, &k.secret_env) {
        (Some(path), None) => {
            let origin = (
                format!("{at}.secret_file"),
                format!("{:?}", path.display().to_string()),
            );
            match std::fs::read(path) {
                Ok(bytes) if trim_ascii(&bytes).is_empty() => {
                    Err(invalid(origin.0, origin.1, "the file is empty"))
                }
                Ok(bytes) => Ok((origin, bytes)),
                Err(e) => Err(invalid(origin.0, origin.1, format!("cannot read: {e}"))),
            }
        }
        (None, Some(var)) => {
            let origin = (format!("{at}.secret_env"), format!("{var:?}"));
            match env(var) {
                Some(v) if !v.trim().is_empty() => Ok((origin, v.into_bytes())),
                _ => Err(invalid(
                    origin.0,
                    origin.1,
                    "the variable is not set or empty",
                )),
            }
        }
        (Some(_), Some(_)) => Err(invalid(
            at,
            "",
            "set one of secret_file or secret_env, not both",
        )),
        (None, None) => Err(invalid(at, "", "set secret_file or secret_env")),
    }
}

/// Bytes trimmed from both ends of a secret: space, tab, LF, vertical tab,
/// form feed, CR — what Python's `bytes.strip()`, C's `isspace` and the
/// ASCII part of every language's `trim` remove, so a client that trims its
/// copy of the key file gets the same secret. Nothing else (a non-breaking
/// space or a byte-order mark stays part of the secret).
const SPACE: &[u8] = b" \t\n\x0b\x0c\r";

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !SPACE.contains(c)).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !SPACE.contains(c))
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// 32 bytes from 64 hex digits (either case) or from standard, padded
/// base64 (`openssl rand -base64 32`: 44 characters ending in `=`); URL-safe
/// or unpadded base64 is refused.
fn aes_key(text: &[u8]) -> Result<[u8; 32], String> {
    let decoded = if text.len() == 64 && text.iter().all(u8::is_ascii_hexdigit) {
        hex::decode(text).ok()
    } else {
        base64::engine::general_purpose::STANDARD.decode(text).ok()
    };
    decoded
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| {
            format!(
                "an encryption key must be 32 bytes written as 64 hex digits or base64 \
                 (make one with `openssl rand -hex 32`); this one has {} characters",
                text.len()
            )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-s3cret";

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn parse(text: &str) -> SecurityConfig {
        toml::from_str(text).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn keys_from_files_and_env() {
        let s = file(&format!("{SECRET}\n"));
        let cfg = parse(&format!(
            r#"
            sign_with = "k1"
            encrypt_with = "e1"
            [[keys]]
            id = "k1"
            secret_file = "{}"
            [[keys]]
            id = "e1"
            kind = "encrypt"
            secret_env = "E1"
            "#,
            s.path().display()
        ));
        let ring = cfg
            .keyring_with(|v| (v == "E1").then(|| "ab".repeat(32)))
            .unwrap();
        assert_eq!(ring.signing_ids().collect::<Vec<_>>(), ["k1"]);
        assert_eq!(ring.encryption_ids().collect::<Vec<_>>(), ["e1"]);
        let shown = format!("{ring:?}");
        assert!(shown.contains("k1") && !shown.contains("s3cret"), "{shown}");
        assert_eq!(cfg.verify_mode(), Verify::WhenPresent);
        assert_eq!(SecurityConfig::default().verify_mode(), Verify::Off);
    }

    fn error(cfg: &SecurityConfig) -> String {
        let e = cfg.keyring_with(no_env).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        e
    }

    #[test]
    fn every_mistake_names_its_key_and_never_the_secret() {
        let short = file("too-short-s3cret");
        let key = |extra: &str| parse(&format!("[[keys]]\nid = \"k1\"\n{extra}\n"));
        let e = error(&key(&format!(
            "secret_file = \"{}\"",
            short.path().display()
        )));
        assert!(e.starts_with("security.keys[0].secret_file = \""), "{e}");
        assert!(e.contains("at least 32 bytes, this one has 16"), "{e}");
        let e = error(&key("secret_file = \"/nonexistent/k1\""));
        assert!(
            e.starts_with("security.keys[0].secret_file = \"/nonexistent/k1\": cannot read"),
            "{e}"
        );
        let e = error(&key("secret_env = \"NOPE\""));
        assert_eq!(
            e,
            "security.keys[0].secret_env = \"NOPE\": the variable is not set or empty"
        );
        let e = error(&key(""));
        assert_eq!(e, "security.keys[0]: set secret_file or secret_env");
        let good = file(SECRET);
        let path = good.path().display().to_string();
        let e = error(&parse(&format!(
            "[[keys]]\nid = \"a:b\"\nsecret_file = \"{path}\"\n"
        )));
        assert!(e.starts_with("security.keys[0].id = \"a:b\""), "{e}");
        let e = error(&parse(&format!(
            "[[keys]]\nid = \"k\"\nsecret_file = \"{path}\"\n[[keys]]\nid = \"k\"\nsecret_file = \"{path}\"\n"
        )));
        assert!(e.starts_with("security.keys[1].id"), "{e}");
        let e = error(&parse(&format!(
            "[[keys]]\nid = \"e\"\nkind = \"encrypt\"\nsecret_file = \"{path}\"\n"
        )));
        assert!(
            e.contains("32 bytes written as 64 hex digits or base64"),
            "{e}"
        );
        let e = error(&parse(&format!(
            "sign_with = \"k9\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"{path}\"\n"
        )));
        assert_eq!(
            e,
            "security.sign_with = \"k9\": no key with this id in security.keys (kind = \"sign\")"
        );
        let e = error(&parse(&format!(
            "encrypt_with = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"{path}\"\n"
        )));
        assert!(
            e.starts_with("security.encrypt_with = \"k1\": key \"k1\" has kind = \"sign\""),
            "{e}"
        );
        let e = error(&parse("verify = \"required\"\n"));
        assert!(e.starts_with("security.verify = \"required\""), "{e}");
    }

    /// docs/security.md: 64 hex digits in any case, or standard base64
    /// with its padding; URL-safe and unpadded base64 refused.
    #[test]
    fn aes_keys_in_hex_or_base64() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE};
        assert_eq!(aes_key("00".repeat(32).as_bytes()).unwrap(), [0u8; 32]);
        let key = [0xfb; 32];
        for hex in [
            "fb".repeat(32),
            "FB".repeat(32),
            "fB".repeat(32),
            "Fb".repeat(32),
        ] {
            assert_eq!(aes_key(hex.as_bytes()).unwrap(), key, "{hex}");
        }
        let b64 = STANDARD.encode(key);
        assert_eq!((b64.len(), b64.ends_with('=')), (44, true));
        assert_eq!(aes_key(b64.as_bytes()).unwrap(), key);
        for bad in [STANDARD_NO_PAD.encode(key), URL_SAFE.encode(key)] {
            assert!(aes_key(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(aes_key(b"abcd").is_err());
    }

    /// The header a keyring with key `k` made of `secret` puts on a task.
    fn signed_with(secret: &[u8]) -> Option<String> {
        let f = file("");
        std::fs::write(f.path(), secret).unwrap();
        let cfg = parse(&format!(
            "[[keys]]\nid = \"k\"\nsecret_file = \"{}\"\n",
            f.path().display()
        ));
        let ring = cfg.keyring_with(no_env).ok()?;
        let p = lapin::BasicProperties::default()
            .with_message_id("i".into())
            .with_timestamp(1);
        let fields = crate::security::canonical::Fields::of("t", &p, b"{}").unwrap();
        ring.sign("k", &fields)
    }

    /// docs/security.md: what "surrounding whitespace" is, and that the
    /// secret is its bytes as written (a hex secret is not decoded).
    #[test]
    fn a_signing_secret_is_its_bytes_less_surrounding_ascii_space() {
        let bare = signed_with(SECRET.as_bytes()).unwrap();
        for padded in [
            format!("{SECRET}\n"),
            format!(" \t\n\x0b\x0c\r{SECRET}\r\n\x0b\x0c\t "),
        ] {
            assert_eq!(signed_with(padded.as_bytes()).unwrap(), bare, "{padded:?}");
        }
        for kept in [
            format!("\u{feff}{SECRET}"),
            format!("{SECRET}\u{a0}"),
            format!("{} {}", &SECRET[..20], &SECRET[20..]),
        ] {
            assert_ne!(signed_with(kept.as_bytes()).unwrap(), bare, "{kept:?}");
        }
        // `openssl rand -hex 32`: 64 ASCII bytes are the HMAC key.
        let hex = "ab".repeat(32);
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(hex.as_bytes()).unwrap();
        let p = lapin::BasicProperties::default()
            .with_message_id("i".into())
            .with_timestamp(1);
        let fields = crate::security::canonical::Fields::of("t", &p, b"{}").unwrap();
        assert_eq!(
            signed_with(format!("{hex}\n").as_bytes()).unwrap(),
            crate::security::sign::header_value("k", &mac, &fields)
        );
        assert_eq!(trim_ascii(b" \n\x0b"), b"");
    }
}
