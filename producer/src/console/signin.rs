//! Console sign-ins ([`SignIn`], the session of an operator in a browser):
//! a random id in an HttpOnly, SameSite=Strict cookie
//! points into a server-side table; each entry remembers who signed in
//! (grant name and scopes), its CSRF token and when it was last used. An
//! entry unused for `console.session_ttl` is gone.
//!
//! The entry also keeps the token it was opened with, in memory only (the
//! token store holds it there anyway), so that every request checks it
//! again against the tokens in force: a token removed or narrowed by SIGHUP
//! ends or narrows its sessions at once.
//!
//! The table lives in one process: a session is valid on the replica that
//! created it (a load balancer in front of several replicas needs sticky
//! sessions, or the operator signs in again).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use rand::RngCore;
use secrecy::SecretString;
use subtle::ConstantTimeEq;

use crate::auth::Scope;

/// The cookie's name.
pub const COOKIE: &str = "warren_session";

/// Most live sessions kept; signing in past it drops the least recently used.
const MAX_SESSIONS: usize = 10_000;

/// Notices a session keeps until shown (several tabs may act at once);
/// past it the oldest is dropped.
const MAX_FLASHES: usize = 16;

/// Who is signed in, as the console sees them.
#[derive(Debug, Clone)]
pub struct SignIn {
    pub id: String,
    /// The grant's name (for the audit trail and the header line).
    pub who: String,
    pub scopes: Vec<Scope>,
    pub csrf: String,
    /// The token signed in with (`SecretString`: redacted in `Debug`, zeroed
    /// on drop, never shown).
    pub token: SecretString,
}

impl SignIn {
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(self.csrf.as_bytes())))
    }
}

struct Entry {
    session: SignIn,
    last_used: Instant,
    /// Notices for the page after an action, by one-time id (oldest first).
    flashes: VecDeque<(String, String)>,
}

/// The server-side session table.
pub struct SignIns {
    ttl: Duration,
    table: Mutex<HashMap<String, Entry>>,
}

impl SignIns {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// A new session for `who` with `scopes`, signed in with `token`.
    pub fn create(&self, who: String, scopes: Vec<Scope>, token: SecretString) -> SignIn {
        let session = SignIn {
            id: random_hex(32),
            who,
            scopes,
            csrf: random_hex(32),
            token,
        };
        let now = Instant::now();
        if let Ok(mut t) = self.table.lock() {
            t.retain(|_, e| now.duration_since(e.last_used) < self.ttl);
            if t.len() >= MAX_SESSIONS {
                let oldest = t
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    t.remove(&k);
                }
            }
            t.insert(
                session.id.clone(),
                Entry {
                    session: session.clone(),
                    last_used: now,
                    flashes: VecDeque::new(),
                },
            );
        }
        session
    }

    /// The live session `id` names, its idle clock restarted.
    pub fn touch(&self, id: &str) -> Option<SignIn> {
        self.touch_at(id, Instant::now())
    }

    fn touch_at(&self, id: &str, now: Instant) -> Option<SignIn> {
        let mut t = self.table.lock().ok()?;
        let expired = match t.get_mut(id) {
            None => return None,
            Some(e) if now.duration_since(e.last_used) >= self.ttl => true,
            Some(e) => {
                e.last_used = now;
                return Some(e.session.clone());
            }
        };
        if expired {
            t.remove(id);
        }
        None
    }

    /// Keep `html` (markup the server built) for the next page of session
    /// `id`; the returned one-time id goes in that page's URL. The text
    /// itself never travels in a URL, so a link cannot make a page say
    /// anything.
    pub fn put_flash(&self, id: &str, html: maud::Markup) -> Option<String> {
        let mut t = self.table.lock().ok()?;
        let e = t.get_mut(id)?;
        let key = random_hex(8);
        if e.flashes.len() >= MAX_FLASHES {
            e.flashes.pop_front();
        }
        e.flashes.push_back((key.clone(), html.into_string()));
        Some(key)
    }

    /// The notice `key` of session `id`, once: a reload shows it no more.
    pub fn take_flash(&self, id: &str, key: &str) -> Option<maud::Markup> {
        let mut t = self.table.lock().ok()?;
        let e = t.get_mut(id)?;
        let at = e.flashes.iter().position(|(k, _)| k == key)?;
        e.flashes.remove(at).map(|(_, html)| maud::PreEscaped(html))
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut t) = self.table.lock() {
            t.remove(id);
        }
    }
}

/// The session id in a `Cookie` header value, if any.
pub fn from_cookie_header(value: &str) -> Option<&str> {
    value
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for a new session; `secure` when served over TLS.
///
/// A session cookie (no `Max-Age`, no `Expires`): the browser keeps it
/// until it closes, and the server ends the session after
/// `console.session_ttl` without use. A lifetime on the cookie would end a
/// session in use that long after sign-in, since nothing refreshes it.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that makes the browser forget the session.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session cookie's value, from any `Cookie` header.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(from_cookie_header)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_session_expires_after_idle_ttl_and_use_extends_it() {
        let s = SignIns::new(Duration::from_secs(60));
        let a = s.create("ops".into(), vec![Scope::Read], SecretString::from("t"));
        let t0 = Instant::now();
        assert!(s.touch_at(&a.id, t0 + Duration::from_secs(50)).is_some());
        // Used at 50 s: still alive at 100 s.
        assert!(s.touch_at(&a.id, t0 + Duration::from_secs(100)).is_some());
        assert!(s.touch_at(&a.id, t0 + Duration::from_secs(161)).is_none());
        // Gone for good, not revived by a later lookup.
        assert!(s.touch_at(&a.id, t0 + Duration::from_secs(100)).is_none());
    }

    #[test]
    fn ids_and_csrf_tokens_are_random_and_distinct() {
        let s = SignIns::new(Duration::from_secs(60));
        let a = s.create("a".into(), vec![], SecretString::from("t"));
        let b = s.create("a".into(), vec![], SecretString::from("t"));
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, a.id);
        assert_eq!(a.id.len(), 64);
        assert!(s.touch("nope").is_none());
        s.remove(&a.id);
        assert!(s.touch(&a.id).is_none());
        assert!(s.touch(&b.id).is_some());
    }

    #[test]
    fn a_flash_is_shown_once_and_only_to_its_session() {
        let s = SignIns::new(Duration::from_secs(60));
        let a = s.create("a".into(), vec![], SecretString::from("t"));
        let b = s.create("b".into(), vec![], SecretString::from("t"));
        let key = s
            .put_flash(&a.id, maud::html! { "Paused " code { "x" } "." })
            .unwrap();
        assert!(
            s.take_flash(&b.id, &key).is_none(),
            "another session's notice"
        );
        assert!(s.take_flash(&a.id, "Session expired").is_none());
        assert_eq!(
            s.take_flash(&a.id, &key).unwrap().into_string(),
            "Paused <code>x</code>."
        );
        assert!(s.take_flash(&a.id, &key).is_none(), "shown twice");
        assert!(s
            .put_flash("no-such-session", maud::html! { "x" })
            .is_none());
        let keys: Vec<_> = (0..MAX_FLASHES + 1)
            .map(|i| s.put_flash(&a.id, maud::html! { (i) }).unwrap())
            .collect();
        assert!(
            s.take_flash(&a.id, &keys[0]).is_none(),
            "the oldest dropped"
        );
        assert!(s.take_flash(&a.id, &keys[MAX_FLASHES]).is_some());
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let s = SignIns::new(Duration::from_secs(60)).create(
            "a".into(),
            vec![],
            SecretString::from("sekrit-0123456789abcdef"),
        );
        assert!(!format!("{s:?}").contains("sekrit"));
    }

    #[test]
    fn csrf_check() {
        let s = SignIns::new(Duration::from_secs(60)).create(
            "a".into(),
            vec![],
            SecretString::from("t"),
        );
        let good = s.csrf.clone();
        assert!(s.csrf_ok(Some(&good)));
        assert!(!s.csrf_ok(None));
        assert!(!s.csrf_ok(Some("")));
        assert!(!s.csrf_ok(Some(&good[1..])));
    }

    #[test]
    fn cookie_parsing_and_attributes() {
        assert_eq!(
            from_cookie_header("a=1; warren_session=abc ; b=2"),
            Some("abc")
        );
        assert_eq!(from_cookie_header("warren_session="), None);
        assert_eq!(from_cookie_header("other=1"), None);
        let c = set_cookie("x", false);
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(!c.contains("Secure"));
        // Expiry is the server's (idle time), never the browser's.
        assert!(!c.contains("Max-Age") && !c.contains("Expires"), "{c}");
        assert!(set_cookie("x", true).ends_with("; Secure"));
    }
}
