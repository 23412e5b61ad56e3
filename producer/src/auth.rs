//! Bearer-token authorization of the `/v1` API as an axum extractor: a
//! handler that takes [`RequireScope<Publish>`] runs only for a request
//! whose `Authorization: Bearer <token>` names a configured token holding
//! the `publish` scope (401 without a known token, 403 without the scope).
//!
//! The extractor yields the [`Caller`]: the grant's name (never the token)
//! for logs and audit lines, and its scopes.
//!
//! A presented token is hashed (SHA-256) and its digest compared in constant
//! time against every configured token's digest: the comparison leaks
//! neither content nor length, and a config may hold digests alone
//! (`sha256:<hex>`). A token shaped like a JWT goes to [`crate::jwt`] when
//! `[api.jwt]` is configured. The scheme `Bearer` is matched in any case.
//! The set lives in a [`TokenStore`] that SIGHUP replaces whole, so a rotated
//! token works on the next request; the extractor finds the store in any
//! router state that provides it through [`FromRef`].

use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use subtle::ConstantTimeEq;

pub mod grant;

use grant::{token_digest, Grant};
pub use grant::{Caller, Scope};

use crate::error::ApiError;
use crate::jwt::{looks_like_jwt, JwtVerifier};

/// Configured tokens and their scopes, and the JWT check if configured.
#[derive(Default)]
pub struct Tokens {
    grants: Vec<Grant>,
    jwt: Option<JwtVerifier>,
}

/// Equal when a reload would change nothing a comparison can see: with JWT
/// keys (files that may have changed on disk) never, so SIGHUP re-reads them.
impl PartialEq for Tokens {
    fn eq(&self, other: &Self) -> bool {
        self.grants == other.grants && self.jwt.is_none() && other.jwt.is_none()
    }
}

impl Tokens {
    /// `grants` (see [`grant::grants`]), and JWTs checked by `jwt`.
    pub fn new(grants: Vec<Grant>, jwt: Option<JwtVerifier>) -> Self {
        Self { grants, jwt }
    }

    /// No static token and no JWT check: every request is refused.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.jwt.is_none()
    }

    /// How many static tokens.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// The grant of `presented`: its digest against every configured
    /// digest in constant time, with no early exit (how long it takes says
    /// nothing about which matched, nor about any length).
    fn grant(&self, presented: &[u8]) -> Option<&Grant> {
        let digest = token_digest(presented);
        let mut found = None;
        for grant in &self.grants {
            if bool::from(grant.digest.ct_eq(&digest)) {
                found = Some(grant);
            }
        }
        found
    }

    /// Who presents static `token`, if anyone.
    pub fn authenticate(&self, token: &[u8]) -> Option<Caller> {
        self.grant(token).map(|g| Caller {
            name: g.name.clone(),
            scopes: g.scopes.clone(),
        })
    }

    /// Who presents `token`, static or JWT; the refusal says why not.
    fn identify(&self, token: &str) -> Result<Caller, String> {
        if let (Some(jwt), true) = (&self.jwt, looks_like_jwt(token)) {
            return jwt.verify(token).map_err(|r| r.to_string());
        }
        self.authenticate(token.as_bytes())
            .ok_or_else(|| "unknown token".to_owned())
    }

    /// What a request presenting `authorization` (the header's value, if
    /// any) may do about `scope`.
    fn authorize(
        &self,
        authorization: Option<&HeaderValue>,
        scope: Scope,
    ) -> Result<Caller, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let value = authorization
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(bearer)
            .ok_or_else(|| unauthorized("expected `Authorization: Bearer <token>`"))?;
        let caller = self.identify(token).map_err(|why| unauthorized(&why))?;
        if caller.has(scope) {
            Ok(caller)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this token lacks the `{}` scope", scope.name()),
            ))
        }
    }
}

/// The credentials of an `Authorization` value of scheme `Bearer`, which
/// RFC 9110 makes case-insensitive.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The audit line of a refused mutating request (the accepted ones are
/// written by their handlers, [`crate::audit`]): who, as far as known
/// (`anonymous` without a valid credential), the method and path, never
/// the token.
fn audit_refusal(tokens: &Tokens, header: Option<&HeaderValue>, parts: &Parts, e: &ApiError) {
    let who = header
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .and_then(|t| tokens.identify(t).ok())
        .map_or_else(|| "anonymous".to_owned(), |c| c.name);
    let status = e.status().as_u16();
    tracing::info!(
        target: "warren::audit",
        who,
        action = %parts.method,
        target = parts.uri.path(),
        result = "refused",
        status,
        "audit"
    );
}

/// The tokens in force, shared by every request and replaced whole on
/// SIGHUP (a request sees the old set or the new one, never a mix).
#[derive(Clone, Default)]
pub struct TokenStore(Arc<RwLock<Arc<Tokens>>>);

impl TokenStore {
    pub fn new(tokens: Tokens) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(tokens))))
    }

    /// Who presents `token` under the tokens in force (constant time, as
    /// for requests): the console checks a pasted token with it.
    #[allow(dead_code)] // until the console (issue 10) signs in with it
    pub fn authenticate(&self, token: &[u8]) -> Option<Caller> {
        self.current().authenticate(token)
    }

    pub fn current(&self) -> Arc<Tokens> {
        match self.0.read() {
            Ok(g) => g.clone(),
            // A writer panicked mid-swap: the Arc inside is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, tokens: Tokens) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(tokens),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(tokens),
        }
    }
}

/// A scope as a type, so a handler states what it needs in its signature.
pub trait ScopeMarker: Send + Sync + 'static {
    const SCOPE: Scope;
}

/// The `read` scope: listing schedules and dead letters.
pub struct Read;

/// The `publish` scope: publishing tasks, triggering schedules, replaying
/// dead letters (a `publish_token` also holds `read`).
pub struct Publish;

/// The `admin` scope: pausing schedules, purging dead letters (an
/// `admin_token` also holds `read` and `publish`).
pub struct Admin;

impl ScopeMarker for Read {
    const SCOPE: Scope = Scope::Read;
}

impl ScopeMarker for Publish {
    const SCOPE: Scope = Scope::Publish;
}

impl ScopeMarker for Admin {
    const SCOPE: Scope = Scope::Admin;
}

/// Proof that the request holds scope `S`; extracting it is the check.
pub struct RequireScope<S> {
    caller: Caller,
    scope: PhantomData<S>,
}

impl<S> RequireScope<S> {
    /// Who made the request.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }
}

impl<S, St> FromRequestParts<St> for RequireScope<S>
where
    S: ScopeMarker,
    TokenStore: FromRef<St>,
    St: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION);
        let tokens = TokenStore::from_ref(state).current();
        let caller = tokens.authorize(header, S::SCOPE).inspect_err(|e| {
            if !parts.method.is_safe() {
                audit_refusal(&tokens, header, parts, e);
            }
        })?;
        Ok(Self {
            caller,
            scope: PhantomData,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ApiConfig;
    use warren::config::Secret;

    fn tokens() -> Tokens {
        let cfg = ApiConfig {
            read_token: Some(Secret::new("read-token-0123456789")),
            publish_token: Some(Secret::new("publish-token-0123456789")),
            admin_token: Some(Secret::new("admin-token-0123456789")),
            ..ApiConfig::default()
        };
        cfg.tokens().unwrap()
    }

    fn status(r: Result<Caller, ApiError>) -> Option<u16> {
        use axum::response::IntoResponse;
        r.err().map(|e| e.into_response().status().as_u16())
    }

    fn bearer(v: &'static str) -> HeaderValue {
        HeaderValue::from_static(v)
    }

    #[test]
    fn scopes_by_token() {
        let t = tokens();
        let read = bearer("Bearer read-token-0123456789");
        let publish = bearer("bearer publish-token-0123456789");
        assert_eq!(status(t.authorize(Some(&read), Scope::Read)), None);
        assert_eq!(status(t.authorize(Some(&read), Scope::Publish)), Some(403));
        assert_eq!(status(t.authorize(Some(&publish), Scope::Publish)), None);
        assert_eq!(status(t.authorize(Some(&publish), Scope::Read)), None);
        assert_eq!(status(t.authorize(None, Scope::Read)), Some(401));
        let basic = bearer("Basic cmVhZA==");
        assert_eq!(status(t.authorize(Some(&basic), Scope::Read)), Some(401));
        let prefix = bearer("Bearer read-token-012345678");
        assert_eq!(status(t.authorize(Some(&prefix), Scope::Read)), Some(401));
    }

    #[test]
    fn admin_token_holds_every_scope_and_publish_lacks_admin() {
        let t = tokens();
        let admin = bearer("Bearer admin-token-0123456789");
        let publish = bearer("Bearer publish-token-0123456789");
        for scope in [Scope::Read, Scope::Publish, Scope::Admin] {
            assert_eq!(status(t.authorize(Some(&admin), scope)), None);
        }
        assert_eq!(status(t.authorize(Some(&publish), Scope::Admin)), Some(403));
    }

    #[test]
    fn the_caller_is_named_after_its_grant() {
        let store = TokenStore::new(tokens());
        let admin = store.authenticate(b"admin-token-0123456789").unwrap();
        assert_eq!(admin.name, "admin_token");
        assert!(admin.has(Scope::Admin));
        let read = store.authenticate(b"read-token-0123456789").unwrap();
        assert_eq!(read.name, "read_token");
        assert_eq!(read.scopes, vec![Scope::Read]);
        assert_eq!(store.authenticate(b"read-token-012345678"), None);
        let via_header = store
            .current()
            .authorize(
                Some(&bearer("Bearer publish-token-0123456789")),
                Scope::Read,
            )
            .unwrap();
        assert_eq!(via_header.name, "publish_token");
    }

    #[test]
    fn a_replaced_store_answers_with_the_new_tokens() {
        let store = TokenStore::new(tokens());
        let old = bearer("Bearer read-token-0123456789");
        let new = bearer("Bearer rotated-token-0123456789");
        store.replace(
            ApiConfig {
                read_token: Some(Secret::new("rotated-token-0123456789")),
                ..ApiConfig::default()
            }
            .tokens()
            .unwrap(),
        );
        let now = store.current();
        assert_eq!(status(now.authorize(Some(&old), Scope::Read)), Some(401));
        assert_eq!(status(now.authorize(Some(&new), Scope::Read)), None);
    }
}
