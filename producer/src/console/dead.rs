//! The dead-letter workbench on top of [`warren::dead`]: groups by task,
//! kind and fingerprint from a bounded scan (counts from the broker), the
//! messages of one group, one message in full, and replay (one, a
//! selection, a group, all), edit-and-replay and purge (after a
//! confirmation page).
//!
//! Scans of the dead queue run one at a time per replica: two concurrent
//! scans would each hide from the other the messages they hold unacked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use serde::Deserialize;
use tokio::sync::Mutex;
use warren::dead::{self, DeadError, Overview, Selector};

use super::actions;
use super::guard::{refused, wants_fresh, Fields, Signed};
use super::layout::{self, Nav};
use super::session::Session;
use super::Console;
use crate::config::Scope;

/// Age after which a page shows the grouping it has and has it rescanned
/// in the background (an action on this replica forgets it at once).
const FRESH: Duration = Duration::from_secs(5);

/// Most messages listed on a group's page.
const GROUP_PAGE: usize = 200;

/// The one-at-a-time scans and the latest grouping.
#[derive(Default)]
pub struct Workbench {
    /// Held by whoever reads the dead queue.
    scan: Mutex<()>,
    latest: std::sync::Mutex<Option<(Instant, Arc<Overview>)>>,
    refreshing: AtomicBool,
}

impl Workbench {
    /// The grouping of the first `console.dead_scan_limit` dead letters.
    /// A page never waits for a rescan while it has a grouping to show:
    /// an old one is shown and rescanned in the background (the page says
    /// how old). Only the first page, one after an action, and a hard
    /// reload (`fresh`) wait for the scan.
    pub async fn overview(&self, c: &Console, fresh: bool) -> Result<Arc<Overview>, String> {
        let cached = self.latest.lock().ok().and_then(|g| g.clone());
        match cached {
            Some((at, o)) if !fresh => {
                if at.elapsed() >= FRESH && !self.refreshing.swap(true, Ordering::SeqCst) {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _ = c.dead.rescan(&c).await;
                        c.dead.refreshing.store(false, Ordering::SeqCst);
                    });
                }
                Ok(o)
            }
            _ => self.rescan(c).await,
        }
    }

    async fn rescan(&self, c: &Console) -> Result<Arc<Overview>, String> {
        let _scan = self.scan.lock().await;
        let conn = c.broker.connection(&c.ctx).await?;
        let limit = c.ctx.cfg().console.dead_scan_limit;
        let o = Arc::new(
            dead::overview(&conn, c.ctx.topo(), limit)
                .await
                .map_err(|e| e.to_string())?,
        );
        if let Ok(mut g) = self.latest.lock() {
            *g = Some((Instant::now(), o.clone()));
        }
        Ok(o)
    }

    /// How old the grouping shown is.
    pub fn age(&self) -> Option<Duration> {
        self.latest
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|(at, _)| at.elapsed()))
    }

    /// Run `op` alone on the dead queue, then forget the grouping.
    async fn exclusive<T, F, Fut>(&self, op: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let _scan = self.scan.lock().await;
        let out = op().await;
        if let Ok(mut g) = self.latest.lock() {
            *g = None;
        }
        out
    }
}

/// Which group a request names (`?task=&kind=&fingerprint=`).
#[derive(Deserialize, Default)]
pub struct GroupKey {
    #[serde(default)]
    task: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    fingerprint: String,
    flash: Option<String>,
}

impl GroupKey {
    fn selector(&self) -> Selector {
        Selector::Group {
            task: self.task.clone(),
            kind: self.kind.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    fn of(f: &Fields) -> Self {
        Self {
            task: f.get("task").unwrap_or("").to_owned(),
            kind: f.get("kind").unwrap_or("").to_owned(),
            fingerprint: f.get("fingerprint").unwrap_or("").to_owned(),
            flash: None,
        }
    }

    fn query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("task", &self.task)
            .append_pair("kind", &self.kind)
            .append_pair("fingerprint", &self.fingerprint)
            .finish()
    }

    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="task" value=(self.task);
            input type="hidden" name="kind" value=(self.kind);
            input type="hidden" name="fingerprint" value=(self.fingerprint);
        }
    }
}

fn problem(s: &Session, e: &str) -> Response {
    let mut r = layout::page(
        "Dead letters",
        Some(s),
        Nav::Dead,
        html! { p.error { "The dead-letter queue cannot be read now: " (e) } },
    );
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

pub async fn page(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<GroupKey>,
    headers: HeaderMap,
) -> Response {
    let o = match c.dead.overview(&c, wants_fresh(&headers)).await {
        Ok(o) => o,
        Err(e) => return problem(&s, &e),
    };
    let can_replay = s.may(Scope::Publish);
    let can_purge = s.may(Scope::Admin);
    let body = html! {
        (layout::flash(q.flash.as_deref()))
        p.hint {
            code { (c.ctx.topo().dead_queue()) } " holds " strong { (o.total) } " dead letters"
            @if o.truncated {
                " — " strong.warn { "showing the first " (o.scanned) " of " (o.total) }
                " (" code { "console.dead_scan_limit" } "); replay and purge act on the whole queue"
            }
            "."
            @if let Some(age) = c.dead.age() { " Grouped " (age.as_secs()) " s ago." }
        }
        @if o.groups.is_empty() {
            p.notice { "Nothing is dead." }
        } @else {
            div.scroll { table.groups {
                thead { tr {
                    th { "Task" } th { "Kind" } th { "Reason (fingerprint)" } th.num { "Count" }
                    th { "Example" } th { "Newest" } th { "Actions" }
                } }
                tbody {
                    @for g in &o.groups {
                        @let key = GroupKey { task: g.task.clone(), kind: g.kind.clone(), fingerprint: g.fingerprint.clone(), flash: None };
                        tr.group data-task=(g.task) data-kind=(g.kind) {
                            td { a href=(format!("/ui/dead/group?{}", key.query())) { code { (g.task) } } }
                            td { (g.kind) }
                            td { (g.fingerprint) }
                            td.num.count { (g.count) }
                            td.example { (clip(&g.example, 160)) }
                            td.nowrap { (g.newest.as_deref().unwrap_or("—")) }
                            td.actions {
                                form method="post" action="/ui/dead/replay" {
                                    (layout::csrf(&s)) input type="hidden" name="what" value="group"; (key.hidden())
                                    button.replay type="submit" disabled[!can_replay] { "Replay" }
                                }
                                " "
                                form method="post" action="/ui/dead/purge" {
                                    (layout::csrf(&s)) input type="hidden" name="what" value="group"; (key.hidden())
                                    button.danger.purge type="submit" disabled[!can_purge] { "Purge…" }
                                }
                            }
                        }
                    }
                }
            } }
            div.bulk {
                form method="post" action="/ui/dead/replay" {
                    (layout::csrf(&s)) input type="hidden" name="what" value="all";
                    button.secondary type="submit" disabled[!can_replay] { "Replay all " (o.total) }
                }
                " "
                form method="post" action="/ui/dead/purge" {
                    (layout::csrf(&s)) input type="hidden" name="what" value="all";
                    button.danger type="submit" disabled[!can_purge] { "Purge all…" }
                }
            }
        }
    };
    layout::page("Dead letters", Some(&s), Nav::Dead, body)
}

/// The latest failures for the overview: the groups with the newest dead
/// letters first.
pub async fn latest(c: &Console, fresh: bool) -> Markup {
    let o = match c.dead.overview(c, fresh).await {
        Ok(o) => o,
        Err(e) => return html! { p.error { (e) } },
    };
    let mut groups: Vec<_> = o.groups.iter().collect();
    groups.sort_by(|a, b| b.newest.cmp(&a.newest));
    html! {
        @if groups.is_empty() { p.hint { "No dead letters." } } @else {
            div.scroll { table.latest {
                thead { tr { th { "Newest" } th { "Task" } th { "Kind" } th.num { "Count" } th { "Example" } } }
                tbody { @for g in groups.iter().take(5) {
                    @let key = GroupKey { task: g.task.clone(), kind: g.kind.clone(), fingerprint: g.fingerprint.clone(), flash: None };
                    tr {
                        td.nowrap { (g.newest.as_deref().unwrap_or("—")) }
                        td { a href=(format!("/ui/dead/group?{}", key.query())) { code { (g.task) } } }
                        td { (g.kind) }
                        td.num { (g.count) }
                        td { (clip(&g.example, 120)) }
                    }
                } }
            } }
            @if o.truncated { p.hint { "From the first " (o.scanned) " of " (o.total) " dead letters." } }
        }
    }
}

pub async fn group(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<GroupKey>,
) -> Response {
    let selector = q.selector();
    let limit = c.ctx.cfg().console.dead_scan_limit;
    let listing = c
        .dead
        .exclusive(|| async {
            let conn = c.broker.connection(&c.ctx).await?;
            dead::list_where(&conn, c.ctx.topo(), limit, GROUP_PAGE, |t| {
                selector.matches(t)
            })
            .await
            .map_err(|e| e.to_string())
        })
        .await;
    let l = match listing {
        Ok(l) => l,
        Err(e) => return problem(&s, &e),
    };
    let can_replay = s.may(Scope::Publish);
    let body = html! {
        (layout::flash(q.flash.as_deref()))
        p.hint {
            code { (q.task) } " · " (q.kind) " · " (q.fingerprint) br;
            (l.tasks.len()) " messages shown"
            @if l.truncated { ", from the first " (l.scanned) " of " (l.total) " dead letters" }
            "."
        }
        form method="post" action="/ui/dead/replay" {
            (layout::csrf(&s))
            input type="hidden" name="what" value="ids";
            div.scroll { table.messages {
                thead { tr {
                    th { input type="checkbox" data-select-all="id" aria-label="select all"; }
                    th { "Id" } th.num { "Attempts" } th { "Dead at" } th { "Reason" }
                } }
                tbody { @for t in &l.tasks {
                    tr {
                        td { @if let Some(id) = &t.id { input type="checkbox" name="id" value=(id); } }
                        td { @if let Some(id) = &t.id {
                            a href=(format!("/ui/dead/message?{}", form_urlencoded::Serializer::new(String::new()).append_pair("id", id).finish())) { code { (id) } }
                        } @else { "(no id)" } }
                        td.num { (t.attempts.map_or("—".into(), |a| a.to_string())) }
                        td.nowrap { (t.failed_at.as_deref().unwrap_or("—")) }
                        td { (clip(&t.reason, 200)) }
                    }
                } }
            } }
            button type="submit" disabled[!can_replay] { "Replay selected" }
        }
    };
    layout::page("Dead letters: one group", Some(&s), Nav::Dead, body)
}

#[derive(Deserialize)]
pub struct MessageKey {
    id: String,
    flash: Option<String>,
}

pub async fn message(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<MessageKey>,
) -> Response {
    let limit = c.ctx.cfg().console.dead_scan_limit;
    let found = c
        .dead
        .exclusive(|| async {
            let conn = c.broker.connection(&c.ctx).await?;
            dead::inspect(&conn, c.ctx.topo(), &q.id, limit)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    let m = match found {
        Ok(Some(m)) => m,
        Ok(None) => {
            let mut r = layout::page(
                "Dead letter",
                Some(&s),
                Nav::Dead,
                html! { p.notice { "No dead letter with id " code { (q.id) } " among the first " (limit) " (replayed or purged meanwhile?)." } },
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
        Err(e) => return problem(&s, &e),
    };
    let pretty = if m.payload_base64 {
        m.payload.clone()
    } else {
        serde_json::from_str::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| m.payload.clone())
    };
    let can_replay = s.may(Scope::Publish);
    let body = html! {
        (layout::flash(q.flash.as_deref()))
        p { code { (m.task.task) } " · " (m.task.kind) " · " (m.task.reason) }
        div.cards {
            div.card { h2 { "Properties" } (kv(&m.properties)) }
            div.card { h2 { "Headers" } (kv(&m.headers)) }
        }
        h2 { "Payload" @if m.payload_base64 { " (not UTF-8: base64)" } }
        pre.payload { (pretty) }
        form method="post" action="/ui/dead/replay" {
            (layout::csrf(&s))
            input type="hidden" name="what" value="ids";
            input type="hidden" name="id" value=(q.id);
            button.replay type="submit" disabled[!can_replay] { "Replay as is" }
        }
        h2 { "Edit and replay" }
        form.edit method="post" action="/ui/dead/edit" {
            (layout::csrf(&s))
            input type="hidden" name="id" value=(q.id);
            textarea #payload name="payload" rows="10" data-json spellcheck="false" { (pretty) }
            p.json-error aria-live="polite" {}
            label { input type="checkbox" name="new_id" value="1"; " give it a new id" }
            p.hint { "Replayed as attempt 1 with the header " code { "x-warren-edited-by: " (s.who) } "." }
            button type="submit" disabled[!can_replay] { "Replay edited" }
        }
    };
    layout::page("Dead letter", Some(&s), Nav::Dead, body)
}

fn kv(v: &serde_json::Value) -> Markup {
    html! {
        table.kv { tbody {
            @if let Some(map) = v.as_object() {
                @for (k, v) in map {
                    tr { th { code { (k) } } td { code { (v.as_str().map_or_else(|| v.to_string(), str::to_owned)) } } }
                }
            }
        } }
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n).collect();
        out.push('…');
        out
    }
}

/// What a replay or purge form selects, with words for the audit line.
fn selection(f: &Fields) -> Result<(Selector, String), String> {
    match f.get("what") {
        Some("all") => Ok((Selector::All, "all".into())),
        Some("group") => {
            let k = GroupKey::of(f);
            let target = format!("group {}/{}/{}", k.task, k.kind, k.fingerprint);
            Ok((k.selector(), target))
        }
        Some("ids") => {
            let ids: Vec<String> = f.all("id").into_iter().map(str::to_owned).collect();
            if ids.is_empty() {
                return Err("Nothing selected.".into());
            }
            let target = format!("{} selected", ids.len());
            Ok((Selector::Ids(ids), target))
        }
        _ => Err("Unknown selection.".into()),
    }
}

/// Where to go back to after an action on `f`'s selection.
fn back(f: &Fields) -> String {
    match f.get("what") {
        Some("group") => format!("/ui/dead/group?{}", GroupKey::of(f).query()),
        _ => "/ui/dead".into(),
    }
}

pub async fn replay(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let (selector, target) = match selection(&f) {
        Ok(x) => x,
        Err(e) => return layout::see_other(&back(&f), &e),
    };
    let timeout = c.ctx.cfg().amqp.confirm_timeout;
    let report = c
        .dead
        .exclusive(|| async {
            let conn = c.broker.connection(&c.ctx).await?;
            dead::replay(&conn, c.ctx.topo(), &selector, usize::MAX, timeout)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    match report {
        Ok(r) => {
            let ok = r.failed.is_empty();
            actions::audit(&c.ctx, &s.who, "replay", &target, r.replayed.len(), ok);
            let mut msg = format!("Replayed {} dead letters ({target}).", r.replayed.len());
            if let Some((id, why)) = r.failed.first() {
                msg.push_str(&format!(
                    " {} not replayed, e.g. {id}: {why}",
                    r.failed.len()
                ));
            }
            layout::see_other(&back(&f), &msg)
        }
        Err(e) => {
            actions::audit(&c.ctx, &s.who, "replay", &target, 0, false);
            layout::see_other(&back(&f), &format!("Replay failed: {e}"))
        }
    }
}

pub async fn edit(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let id = f.get("id").unwrap_or("").to_owned();
    let payload = f.get("payload").unwrap_or("");
    let back = format!(
        "/ui/dead/message?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("id", &id)
            .finish()
    );
    // Checked here too: the page's check is a convenience, not a guard.
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(payload) {
        return layout::see_other(
            &back,
            &format!(
                "Not replayed: the payload is not JSON ({})",
                crate::request::json_error(&e)
            ),
        );
    }
    let new_id = f.get("new_id").is_some();
    // The API's publisher seals: the edit goes out signed with the
    // producer's keys (the old signature cannot cover the new body).
    let Some(api) = c.ctx.api_publisher() else {
        return layout::see_other(&back, "Not replayed: not connected to the broker");
    };
    let report = c
        .dead
        .exclusive(|| async {
            let conn = c.broker.connection(&c.ctx).await.map_err(|e| (false, e))?;
            dead::replay_edited(
                &conn,
                c.ctx.topo(),
                &id,
                payload.as_bytes().to_vec(),
                new_id,
                &s.who,
                &api.publisher,
            )
            .await
            .map_err(|e| (matches!(e, DeadError::NotFound(_)), e.to_string()))
        })
        .await;
    match report {
        Ok(r) if r.failed.is_empty() => {
            actions::audit(&c.ctx, &s.who, "replay_edited", &id, 1, true);
            let new = r.replayed.first().cloned().unwrap_or_default();
            layout::see_other(
                "/ui/dead",
                &format!("Replayed {id} with the edited payload as task {new}."),
            )
        }
        Ok(r) => {
            actions::audit(&c.ctx, &s.who, "replay_edited", &id, 0, false);
            let why = r.failed.first().map(|(_, w)| w.clone()).unwrap_or_default();
            layout::see_other(&back, &format!("Not replayed: {why}"))
        }
        Err((gone, e)) => {
            actions::audit(&c.ctx, &s.who, "replay_edited", &id, 0, false);
            let to = if gone { "/ui/dead".to_owned() } else { back };
            layout::see_other(&to, &format!("Not replayed: {e}"))
        }
    }
}

pub async fn purge(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Admin) {
        return r;
    }
    let (selector, target) = match selection(&f) {
        Ok(x) => x,
        Err(e) => return layout::see_other(&back(&f), &e),
    };
    if f.get("confirm") != Some("yes") {
        return confirm_purge(&c, &s, &f, &selector, &target).await;
    }
    let purged = c
        .dead
        .exclusive(|| async {
            let conn = c.broker.connection(&c.ctx).await?;
            dead::purge(&conn, c.ctx.topo(), &selector, usize::MAX)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    match purged {
        Ok(n) => {
            actions::audit(&c.ctx, &s.who, "purge", &target, n as usize, true);
            layout::see_other("/ui/dead", &format!("Purged {n} dead letters ({target})."))
        }
        Err(e) => {
            actions::audit(&c.ctx, &s.who, "purge", &target, 0, false);
            layout::see_other("/ui/dead", &format!("Purge failed: {e}"))
        }
    }
}

/// The confirmation step: what would go, and the same form once more with
/// `confirm=yes`.
async fn confirm_purge(
    c: &Console,
    s: &Session,
    f: &Fields,
    selector: &Selector,
    target: &str,
) -> Response {
    let estimate = match (selector, c.dead.overview(c, false).await) {
        (Selector::All, Ok(o)) => format!("all {} dead letters", o.total),
        (
            Selector::Group {
                task,
                kind,
                fingerprint,
            },
            Ok(o),
        ) => {
            let n: u64 = o
                .groups
                .iter()
                .filter(|g| g.task == *task && g.kind == *kind && g.fingerprint == *fingerprint)
                .map(|g| g.count)
                .sum();
            if o.truncated {
                format!(
                    "{n} dead letters of this group among the first {} (and any in the rest of the queue)",
                    o.scanned
                )
            } else {
                format!("{n} dead letters")
            }
        }
        _ => target.to_owned(),
    };
    let body = html! {
        p.notice { "Purge " strong { (estimate) } " (" (target) ")? They are deleted for good." }
        form.confirm method="post" action="/ui/dead/purge" {
            (layout::csrf(s))
            input type="hidden" name="what" value=(f.get("what").unwrap_or(""));
            @if f.get("what") == Some("group") { (GroupKey::of(f).hidden()) }
            input type="hidden" name="confirm" value="yes";
            button.danger type="submit" { "Yes, purge" }
            " "
            a href="/ui/dead" { "Cancel" }
        }
    };
    layout::page("Confirm purge", Some(s), Nav::Dead, body).into_response()
}
