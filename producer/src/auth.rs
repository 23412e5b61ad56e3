//! Bearer-token authorization of the `/v1` API as an axum extractor: a
//! handler that takes [`RequireScope<Publish>`] runs only for a request
//! whose `Authorization: Bearer <token>` names a configured token holding
//! the `publish` scope (401 without a known token, 403 without the scope).
//!
//! Tokens are compared in constant time against every configured token. The
//! set lives in a [`TokenStore`] that SIGHUP replaces whole, so a rotated
//! token works on the next request; the extractor finds the store in any
//! router state that provides it through [`FromRef`].

use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use subtle::ConstantTimeEq;

use crate::config::{ApiConfig, Grant, Scope};
use crate::error::ApiError;

/// Configured tokens and their scopes.
#[derive(Default, PartialEq)]
pub struct Tokens(Vec<Grant>);

impl Tokens {
    pub fn from_config(cfg: &ApiConfig) -> anyhow::Result<Self> {
        Ok(Self(cfg.grants()?))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Scopes of a token typed into the console's sign-in form.
    pub fn scopes_of(&self, presented: &[u8]) -> Option<Vec<Scope>> {
        self.scopes(presented).map(<[Scope]>::to_vec)
    }

    /// Scopes of `presented`, comparing against every token in constant time
    /// (no early exit: how long it takes says nothing about which matched).
    fn scopes(&self, presented: &[u8]) -> Option<&[Scope]> {
        let mut found = None;
        for grant in &self.0 {
            if bool::from(grant.token.as_slice().ct_eq(presented)) {
                found = Some(grant.scopes.as_slice());
            }
        }
        found
    }

    /// What a request presenting `authorization` (the header's value, if
    /// any) may do about `scope`.
    fn authorize(&self, authorization: Option<&HeaderValue>, scope: Scope) -> Result<(), ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let value = authorization
            .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>` header"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| unauthorized("expected `Authorization: Bearer <token>`"))?;
        let scopes = self
            .scopes(token.as_bytes())
            .ok_or_else(|| unauthorized("unknown token"))?;
        if scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this token lacks the `{}` scope", scope.name()),
            ))
        }
    }
}

/// The tokens in force, shared by every request and replaced whole on
/// SIGHUP (a request sees the old set or the new one, never a mix).
#[derive(Clone, Default)]
pub struct TokenStore(Arc<RwLock<Arc<Tokens>>>);

impl TokenStore {
    pub fn new(tokens: Tokens) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(tokens))))
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

/// The `read` scope: listing schedules.
pub struct Read;

/// The `publish` scope: publishing tasks, triggering schedules (a
/// `publish_token` also holds `read`).
pub struct Publish;

impl ScopeMarker for Read {
    const SCOPE: Scope = Scope::Read;
}

impl ScopeMarker for Publish {
    const SCOPE: Scope = Scope::Publish;
}

/// Proof that the request holds scope `S`; extracting it is the check.
pub struct RequireScope<S>(PhantomData<S>);

impl<S, St> FromRequestParts<St> for RequireScope<S>
where
    S: ScopeMarker,
    TokenStore: FromRef<St>,
    St: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION);
        TokenStore::from_ref(state)
            .current()
            .authorize(header, S::SCOPE)?;
        Ok(Self(PhantomData))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use warren::config::Secret;

    fn tokens() -> Tokens {
        let cfg = ApiConfig {
            read_token: Some(Secret::new("read-token-0123456789")),
            publish_token: Some(Secret::new("publish-token-0123456789")),
            ..ApiConfig::default()
        };
        Tokens::from_config(&cfg).unwrap()
    }

    fn status(r: Result<(), ApiError>) -> Option<u16> {
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
    fn a_replaced_store_answers_with_the_new_tokens() {
        let store = TokenStore::new(tokens());
        let old = bearer("Bearer read-token-0123456789");
        let new = bearer("Bearer rotated-token-0123456789");
        store.replace(
            Tokens::from_config(&ApiConfig {
                read_token: Some(Secret::new("rotated-token-0123456789")),
                ..ApiConfig::default()
            })
            .unwrap(),
        );
        let now = store.current();
        assert_eq!(status(now.authorize(Some(&old), Scope::Read)), Some(401));
        assert_eq!(status(now.authorize(Some(&new), Scope::Read)), None);
    }
}
