//! JWT bearer tokens for the API, so an identity provider can issue them:
//! HS256 with a shared secret file, RS256/ES256 with PEM public keys or a
//! JWKS file. A token must carry `iss`, `aud`, `exp` and `sub` (checked, with
//! `nbf` when present); its scopes come from one claim
//! (`api.jwt.scopes_claim`), as a space-separated string (OAuth 2 `scope`)
//! or an array, and its `sub` names the caller (`jwt:<sub>`) in logs and
//! audit lines.
//!
//! The algorithm a token names must match the kind of key checking it, so a
//! public key can never serve as an HMAC secret (algorithm confusion).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::auth::grant::{Caller, Scope};

/// `[api.jwt]`: which JWTs the API accepts (see [`JwtVerifier`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must include.
    pub audience: String,
    /// HS256: a file holding the shared secret (at least 32 bytes).
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// RS256/ES256: PEM public keys of the issuer.
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
    /// RS256/ES256: the issuer's key set (JWKS JSON), matched by `kid`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Claim holding the scopes: a space-separated string or an array.
    #[serde(default = "default_scopes_claim")]
    pub scopes_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

fn default_scopes_claim() -> String {
    "scope".into()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// One key a token may be signed with.
struct Key {
    algorithm: Algorithm,
    /// `kid` of a JWKS entry: a token naming a kid is checked by it alone.
    kid: Option<String>,
    key: DecodingKey,
}

/// Checks JWTs against the configured issuer, audience and keys.
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    scopes_claim: String,
    leeway_secs: u64,
}

/// Why a token was refused, for the 401 body (never the token itself).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not the configured api.jwt.issuer")]
    Issuer,
    #[error("the token's audience does not include the configured api.jwt.audience")]
    Audience,
    #[error("the token's signature does not verify with any configured key")]
    Signature,
    #[error("the token is signed with an algorithm no configured key is for")]
    Algorithm,
    #[error("the token lacks the `{0}` claim")]
    Missing(String),
    #[error("malformed token")]
    Malformed,
}

/// `api.jwt.hs256_secret_file`: a shared secret of at least 32 bytes.
fn hs256_key(path: &Path) -> anyhow::Result<Key> {
    let secret = read("api.jwt.hs256_secret_file", path)?;
    let secret = secret.trim_ascii();
    if secret.len() < 32 {
        anyhow::bail!(
            "api.jwt.hs256_secret_file {}: the secret must be at least 32 bytes",
            path.display()
        );
    }
    Ok(Key {
        algorithm: Algorithm::HS256,
        kid: None,
        key: DecodingKey::from_secret(secret),
    })
}

/// `api.jwt.public_key_files[i]`: a PEM RSA or EC (P-256) public key.
fn pem_key(i: usize, path: &Path) -> anyhow::Result<Key> {
    let origin = format!("api.jwt.public_key_files[{i}]");
    let pem = read(&origin, path)?;
    let (algorithm, key) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        (Algorithm::ES256, k)
    } else {
        anyhow::bail!(
            "{origin} {}: not a PEM RSA or EC (P-256) public key",
            path.display()
        );
    };
    Ok(Key {
        algorithm,
        kid: None,
        key,
    })
}

/// `api.jwt.jwks_file`: every key of the set, matched by `kid`.
fn jwks_keys(path: &Path) -> anyhow::Result<Vec<Key>> {
    let text = read("api.jwt.jwks_file", path)?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("api.jwt.jwks_file {}: not a JWKS: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            // Shared secrets belong in hs256_secret_file, not in a
            // key set meant to be published.
            _ => anyhow::bail!(
                "api.jwt.jwks_file {} key {i}: only RSA and EC (P-256) keys are accepted",
                path.display()
            ),
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| anyhow::anyhow!("api.jwt.jwks_file {} key {i}: {e}", path.display()))?;
        keys.push(Key {
            algorithm,
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    Ok(keys)
}

impl JwtVerifier {
    /// Read every key of `cfg` now, so a bad file is a config error (exit
    /// 2 at start, the old keys kept on SIGHUP). Errors name the key.
    pub fn from_config(cfg: &JwtConfig) -> anyhow::Result<Self> {
        if cfg.issuer.trim().is_empty() {
            anyhow::bail!("api.jwt.issuer: must be set (the `iss` every token must carry)");
        }
        if cfg.audience.trim().is_empty() {
            anyhow::bail!("api.jwt.audience: must be set (the `aud` every token must carry)");
        }
        let mut keys = Vec::new();
        if let Some(path) = &cfg.hs256_secret_file {
            keys.push(hs256_key(path)?);
        }
        for (i, path) in cfg.public_key_files.iter().enumerate() {
            keys.push(pem_key(i, path)?);
        }
        if let Some(path) = &cfg.jwks_file {
            keys.extend(jwks_keys(path)?);
        }
        if keys.is_empty() {
            anyhow::bail!(
                "api.jwt: no key to check tokens with (set hs256_secret_file, public_key_files or jwks_file)"
            );
        }
        if cfg.scopes_claim.trim().is_empty() {
            anyhow::bail!("api.jwt.scopes_claim: must not be empty");
        }
        Ok(Self {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            scopes_claim: cfg.scopes_claim.clone(),
            leeway_secs: cfg.leeway.as_secs(),
        })
    }

    /// The caller a valid token stands for.
    pub fn verify(&self, token: &str) -> Result<Caller, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(Refusal::Algorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        let mut refusal = Refusal::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return self.caller(&data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    refusal = match e.kind() {
                        K::InvalidSignature => continue,
                        K::ExpiredSignature => Refusal::Expired,
                        K::ImmatureSignature => Refusal::NotYetValid,
                        K::InvalidIssuer => Refusal::Issuer,
                        K::InvalidAudience => Refusal::Audience,
                        K::MissingRequiredClaim(c) => Refusal::Missing(c.clone()),
                        _ => Refusal::Malformed,
                    };
                    // Past the signature: another key would say the same.
                    return Err(refusal);
                }
            }
        }
        Err(refusal)
    }

    fn caller(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Caller, Refusal> {
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .ok_or_else(|| Refusal::Missing("sub".into()))?;
        let names: Vec<&str> = match claims.get(&self.scopes_claim) {
            Some(serde_json::Value::String(s)) => s.split_whitespace().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        // Scopes of other applications (`openid`, `email`) are not ours.
        let mut scopes: Vec<Scope> = names.into_iter().filter_map(Scope::parse).collect();
        scopes.dedup();
        Ok(Caller {
            name: format!("jwt:{sub}"),
            scopes,
        })
    }
}

/// Whether `token` has the shape of a JWT (three base64url parts, a JSON
/// header), so static tokens are never sent to the JWT check.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{key} {}: cannot read: {e}", path.display()))
}
