//! Signed and encrypted tasks: keys by id, the HMAC-SHA256 signature over a
//! task's canonical form, and AES-256-GCM payload encryption.
//!
//! | module | owns |
//! |---|---|
//! | [`keys`] | the `[security]` config section and the [`Keyring`] it loads (secrets never printed) |
//! | [`canonical`] | the canonical form a signature covers (documented in `docs/contract.md`) |
//! | [`sign`] | the `x-warren-signature` header: `v1:<key id>:<base64 HMAC>`, and why a check failed |
//! | [`encrypt`] | `content-encoding: warren-aes256gcm;k=<key id>`: nonce ‖ ciphertext ‖ tag |
//! | [`seal`] | the publishing side: encrypt, then sign ([`Seal`]) |
//! | [`open`] | the consuming side: verify, then decrypt ([`Opener`]) |
//!
//! Encrypt-then-MAC: the signature covers the body as it travels, so a
//! consumer checks a task before it spends a decryption on it, and a bad
//! ciphertext is refused without holding the encryption key.

pub mod canonical;
pub mod encrypt;
pub mod keys;
pub mod open;
pub mod seal;
pub mod sign;

pub use encrypt::is_encrypted;
pub use keys::{InvalidSecurity, KeyConfig, KeyKind, Keyring, SecurityConfig, Verify};
pub use open::{Opener, Refusal};
pub use seal::Seal;
pub use sign::BadSignature;
