//! What a bearer token may do: the [`Scope`]s, the [`Grant`] of each
//! configured token (matched by its SHA-256 digest) and [`grants`], which
//! reads every token of `[api]`, tokens file included. No HTTP and no JWT
//! here: [`super`] and [`crate::jwt`] both build on it, and the config's
//! validation calls [`grants`] so that `run`, `schedules check` and SIGHUP
//! refuse the same files.

use std::path::Path;

use serde::{Deserialize, Serialize};
use warren::config::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Publish,
    /// Pausing schedules and purging dead letters.
    Admin,
}

impl Scope {
    /// The name as configs and error messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Publish => "publish",
            Scope::Admin => "admin",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Scope::Read),
            "publish" => Some(Scope::Publish),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// The authenticated grant behind a request: its name (`publish_token`,
/// `tokens[2]`, a configured name, `<file>:<line>`) and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Caller {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// One configured token and what it may do (see [`grants`]).
#[derive(PartialEq)]
pub struct Grant {
    /// SHA-256 of the token: requests are matched by digest, so the config
    /// may hold the digest alone (`sha256:<hex>`) and every comparison has
    /// the same length.
    pub digest: [u8; 32],
    pub scopes: Vec<Scope>,
    /// Who presents it, in logs and audit lines (never the token itself):
    /// the config key (`publish_token`, `tokens[2]`), a configured name, or
    /// `<file>:<line>`.
    pub name: String,
}

/// One `[[api.tokens]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: Secret,
    pub scopes: Vec<Scope>,
    /// Who uses it, in logs and audit lines (default `tokens[<index>]`).
    #[serde(default)]
    pub name: Option<String>,
}

/// The four places `[api]` names tokens in (see
/// `ApiConfig::token_sources`).
pub struct TokenSources<'a> {
    pub read_token: Option<&'a Secret>,
    pub publish_token: Option<&'a Secret>,
    pub admin_token: Option<&'a Secret>,
    pub tokens: &'a [TokenConfig],
    pub tokens_file: Option<&'a Path>,
}

/// Every token of `src`, from all four places (the tokens file is read
/// now), each at least 16 characters or a digest. The error names the key
/// (or file line) at fault, never the token.
pub fn grants(src: &TokenSources<'_>) -> anyhow::Result<Vec<Grant>> {
    let mut out = Vec::new();
    let fixed = [
        (src.read_token, "read_token", &[Scope::Read][..]),
        (
            src.publish_token,
            "publish_token",
            &[Scope::Read, Scope::Publish],
        ),
        (
            src.admin_token,
            "admin_token",
            &[Scope::Read, Scope::Publish, Scope::Admin],
        ),
    ];
    for (token, key, scopes) in fixed {
        if let Some(t) = token {
            let origin = format!("api.{key}");
            out.push(grant(t.expose(), scopes.to_vec(), &origin, key.into())?);
        }
    }
    for (i, t) in src.tokens.iter().enumerate() {
        let origin = format!("api.tokens[{i}]");
        if t.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            anyhow::bail!("{origin}.name: must not be empty");
        }
        let name = t.name.clone().unwrap_or_else(|| format!("tokens[{i}]"));
        out.push(grant(t.token.expose(), t.scopes.clone(), &origin, name)?);
    }
    if let Some(path) = src.tokens_file {
        file_grants(path, &mut out)?;
    }
    Ok(out)
}

/// The grant of one token as configured (`origin` names where, for errors).
fn grant(token: &str, scopes: Vec<Scope>, origin: &str, name: String) -> anyhow::Result<Grant> {
    let digest = match token.strip_prefix(HASHED) {
        Some(hex) => parse_digest(hex).ok_or_else(|| {
            anyhow::anyhow!(
                "{origin}: `sha256:` must be followed by the 64 hex digits of the \
                 token's SHA-256 (`warren-producer token hash` prints it)"
            )
        })?,
        None if token.len() < 16 => {
            anyhow::bail!("{origin}: API tokens must be at least 16 characters")
        }
        None => token_digest(token.as_bytes()),
    };
    Ok(Grant {
        digest,
        scopes,
        name,
    })
}

/// The tokens file: one per line, `<scope>[,<scope>] <token> [name]`, `#`
/// comments.
fn file_grants(path: &Path, out: &mut Vec<Grant>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("api.tokens_file {}: cannot read: {e}", path.display()))?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let origin = format!("api.tokens_file {} line {}", path.display(), n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (scopes, token, name) = match fields.as_slice() {
            [scopes, token] => (*scopes, *token, None),
            [scopes, token, name] => (*scopes, *token, Some(*name)),
            _ => anyhow::bail!("{origin}: expected `<scope>[,<scope>] <token> [name]`"),
        };
        let scopes = scopes
            .split(',')
            .map(|s| {
                Scope::parse(s).ok_or_else(|| {
                    anyhow::anyhow!("{origin}: unknown scope `{s}` (read, publish, admin)")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name = name.map_or_else(|| format!("{}:{}", path.display(), n + 1), str::to_owned);
        out.push(grant(token, scopes, &origin, name)?);
    }
    Ok(())
}

/// A configured token given as its digest: `sha256:<64 hex digits>`.
pub const HASHED: &str = "sha256:";

/// SHA-256 of a token, as stored and compared.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token).into()
}

/// `sha256:<hex>` as a config holds it.
pub fn hashed_token(token: &[u8]) -> String {
    format!("{HASHED}{}", hex::encode(token_digest(token)))
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex.trim(), &mut out).ok()?;
    Some(out)
}
