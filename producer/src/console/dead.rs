//! The dead-letter workbench on top of [`warren::dead`]: groups by task,
//! kind and fingerprint from a bounded scan (the total from the broker),
//! the messages of one group a page at a time, a search by id or text, one
//! message in full, and replay (one, a selection, a group, all),
//! edit-and-replay and purge (a group or all, after a confirmation page).
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
use serde_json::Value;
use tokio::sync::Mutex;
use warren::dead::{self, DeadError, DeadTask, Overview, Page, Search, Selector};

use super::actions;
use super::guard::{refused, wants_fresh, Fields, Signed};
use super::layout::{self, Nav};
use super::signin::SignIn;
use super::Console;
use crate::auth::Scope;

/// Age after which a page shows the grouping it has and has it rescanned
/// in the background (an action on this replica forgets it at once).
const FRESH: Duration = Duration::from_secs(5);

/// Age after which a grouping whose total differs from the broker's count
/// is rescanned in the background (the count is at most 2 s old).
const STALE: Duration = Duration::from_secs(1);

/// Messages listed on one page of a group or of a search.
const PAGE: usize = 50;

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
    /// an old one, or one whose total is not the broker's count `broker`,
    /// is shown and rescanned in the background (the page says how old).
    /// Only the first page, one after an action, a hard reload (`fresh`),
    /// and an empty grouping while the broker counts dead letters wait for
    /// the scan.
    pub async fn overview(
        &self,
        c: &Console,
        fresh: bool,
        broker: Option<u64>,
    ) -> Result<Arc<Overview>, String> {
        let cached = self.latest.lock().ok().and_then(|g| g.clone());
        match cached {
            Some((at, o)) if !fresh => {
                let differs = broker.is_some_and(|n| n != o.total);
                if differs && o.groups.is_empty() {
                    return self.rescan(c).await;
                }
                let old = at.elapsed() >= FRESH || (differs && at.elapsed() >= STALE);
                if old && !self.refreshing.swap(true, Ordering::SeqCst) {
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
        let conn = c.conn.connection(&c.ctx).await?;
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

    /// Run `op` alone on the dead queue (it only reads).
    async fn reading<T, F, Fut>(&self, op: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let _scan = self.scan.lock().await;
        op().await
    }

    /// Run `op` alone on the dead queue, then forget the grouping and the
    /// queue sample (`sampler`): the next page shows what `op` did.
    async fn exclusive<T, F, Fut>(&self, sampler: &super::sample::Sampler, op: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let _scan = self.scan.lock().await;
        let out = op().await;
        if let Ok(mut g) = self.latest.lock() {
            *g = None;
        }
        sampler.outdate();
        out
    }
}

/// Which group a request names (`?task=&kind=&fingerprint=&page=`).
#[derive(Deserialize, Default)]
pub struct GroupKey {
    #[serde(default)]
    task: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    fingerprint: String,
    page: Option<String>,
    flash: Option<String>,
}

impl GroupKey {
    fn new(task: &str, kind: &str, fingerprint: &str) -> Self {
        Self {
            task: task.to_owned(),
            kind: kind.to_owned(),
            fingerprint: fingerprint.to_owned(),
            page: None,
            flash: None,
        }
    }

    fn selector(&self) -> Selector {
        Selector::Group {
            task: self.task.clone(),
            kind: self.kind.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    fn of(f: &Fields) -> Self {
        Self::new(
            f.get("task").unwrap_or(""),
            f.get("kind").unwrap_or(""),
            f.get("fingerprint").unwrap_or(""),
        )
    }

    fn link(&self) -> String {
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("task", &self.task)
            .append_pair("kind", &self.kind)
            .append_pair("fingerprint", &self.fingerprint)
            .finish();
        format!("/ui/dead/group?{q}")
    }

    fn hidden(&self) -> Markup {
        html! {
            input type="hidden" name="task" value=(self.task);
            input type="hidden" name="kind" value=(self.kind);
            input type="hidden" name="fingerprint" value=(self.fingerprint);
        }
    }

    /// How the group reads in a sentence.
    fn words(&self) -> Markup {
        html! { "group " code { (self.task) } " · " (self.kind) }
    }
}

/// `?page=` as a page number from 1 (anything else is page 1).
fn page_number(p: Option<&str>) -> usize {
    p.and_then(|p| p.trim().parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

fn problem(s: &SignIn, e: &str) -> Response {
    let mut r = layout::page(
        "Dead letters",
        Some(s),
        Nav::Dead,
        html! { p.error { "The dead-letter queue cannot be read now: " (layout::say(e)) } },
    );
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

fn search_form(q: &str) -> Markup {
    html! {
        form.search method="get" action="/ui/dead/search" role="search" {
            input type="search" name="q" value=(q) aria-label="search dead letters"
                placeholder="task id, or text in the name, reason or payload";
            button.secondary type="submit" { "Search" }
        }
    }
}

pub async fn page(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<GroupKey>,
    headers: HeaderMap,
) -> Response {
    let fresh = wants_fresh(&headers);
    // The total is the broker's (the overview's sample, 2 s at most);
    // the groups come from the latest scan, which may be older.
    let sample = c.sampler.get(&c.ctx, &c.conn, fresh).await;
    let broker = sample.dead.map(u64::from);
    let o = match c.dead.overview(&c, fresh, broker).await {
        Ok(o) => o,
        Err(e) => return problem(&s, &e),
    };
    let total = broker.unwrap_or(o.total);
    let body = html! {
        (layout::flash(&c, &s, q.flash.as_deref()))
        (total_hint(&c, &o, total, broker.is_none()))
        (search_form(""))
        (layout::scope_note(&s, &[("replay", Scope::Publish), ("purge", Scope::Admin)]))
        @if o.groups.is_empty() {
            @if total == 0 {
                p.notice { "Nothing is dead." }
            } @else {
                p.notice { "None of them could be read just now (another scan may hold them); reload in a moment." }
            }
        } @else {
            (groups_table(&s, &o))
            (bulk_actions(&s, total))
        }
    };
    layout::page("Dead letters", Some(&s), Nav::Dead, body)
}

/// How many are dead (the broker's count, or the scan's without it), and
/// how old and how complete the grouping below is.
fn total_hint(c: &Console, o: &Overview, total: u64, no_broker_count: bool) -> Markup {
    let age = c.dead.age().map_or(0, |a| a.as_secs());
    html! {
        p.hint.total {
            code { (c.ctx.topo().dead_queue()) } " holds "
            strong data-total=(total) { (layout::count(total, "dead letter", "dead letters")) }
            @if no_broker_count { " (the broker's count is unavailable; from the last scan)" }
            "."
            @if o.truncated {
                " " strong.warn { "Groups of the first " (layout::num(o.scanned)) " only" }
                " (" code { "console.dead_scan_limit" } "); replay and purge act on the whole queue."
            }
            @if o.total != total {
                " Grouped from " (layout::count(o.total, "dead letter", "dead letters")) " read "
                (age) " s ago; regrouping."
            } @else {
                " Grouped " (age) " s ago."
            }
        }
    }
}

/// One row per group, with its replay and purge buttons.
fn groups_table(s: &SignIn, o: &Overview) -> Markup {
    let can_replay = s.may(Scope::Publish);
    let can_purge = s.may(Scope::Admin);
    html! {
        div.scroll { table.groups {
            thead { tr {
                th { "Task" } th { "Kind" } th { "Reason (fingerprint)" } th.num { "Count" }
                th { "Example" } th { "Newest" } th { "Actions" }
            } }
            tbody {
                @for g in &o.groups {
                    @let key = GroupKey::new(&g.task, &g.kind, &g.fingerprint);
                    tr.group data-task=(g.task) data-kind=(g.kind) {
                        td { a href=(key.link()) { code { (g.task) } } }
                        td { (g.kind) }
                        td.fingerprint { a href=(key.link()) { (layout::say(&g.fingerprint)) } }
                        td.num.count data-count=(g.count) { (layout::num(g.count)) }
                        td.example title=(g.example) { (layout::say(&clip(&dead::cause_first(&g.example), 160))) }
                        td.nowrap { (g.newest.as_deref().unwrap_or("—")) }
                        td.actions {
                            form method="post" action="/ui/dead/replay" {
                                (layout::csrf(s)) input type="hidden" name="what" value="group"; (key.hidden())
                                button.replay type="submit" disabled[!can_replay]
                                    title=(layout::needs(can_replay, Scope::Publish, "republish every dead letter of this group")) { "Replay" }
                            }
                            " "
                            form method="post" action="/ui/dead/purge" {
                                (layout::csrf(s)) input type="hidden" name="what" value="group"; (key.hidden())
                                button.danger.purge type="submit" disabled[!can_purge]
                                    title=(layout::needs(can_purge, Scope::Admin, "delete this group, after a confirmation")) { "Purge…" }
                            }
                        }
                    }
                }
            }
        } }
    }
}

/// Replay all and purge all, for the whole queue.
fn bulk_actions(s: &SignIn, total: u64) -> Markup {
    let can_replay = s.may(Scope::Publish);
    let can_purge = s.may(Scope::Admin);
    html! {
        div.bulk {
            form method="post" action="/ui/dead/replay" {
                (layout::csrf(s)) input type="hidden" name="what" value="all";
                button.secondary type="submit" disabled[!can_replay]
                    title=(layout::needs(can_replay, Scope::Publish, "republish every dead letter in the queue")) { "Replay all " (layout::num(total)) }
            }
            " "
            form method="post" action="/ui/dead/purge" {
                (layout::csrf(s)) input type="hidden" name="what" value="all";
                button.danger type="submit" disabled[!can_purge]
                    title=(layout::needs(can_purge, Scope::Admin, "empty the dead-letter queue, after a confirmation")) { "Purge all…" }
            }
        }
    }
}

/// The latest failures for the overview: the groups with the newest dead
/// letters first.
pub async fn latest(c: &Console, fresh: bool, broker: Option<u64>) -> Markup {
    let o = match c.dead.overview(c, fresh, broker).await {
        Ok(o) => o,
        Err(e) => return html! { p.error { (layout::say(&e)) } },
    };
    let mut groups: Vec<_> = o.groups.iter().collect();
    groups.sort_by(|a, b| b.newest.cmp(&a.newest));
    html! {
        @if groups.is_empty() { p.hint { "No dead letters." } } @else {
            div.scroll { table.latest {
                thead { tr { th { "Newest" } th { "Task" } th { "Kind" } th.num { "Count" } th { "Reason" } } }
                tbody { @for g in groups.iter().take(5) {
                    @let key = GroupKey::new(&g.task, &g.kind, &g.fingerprint);
                    tr {
                        td.nowrap { (g.newest.as_deref().unwrap_or("—")) }
                        td { a href=(key.link()) { code { (g.task) } } }
                        td { (g.kind) }
                        td.num { (layout::num(g.count)) }
                        td.reason title=(g.example) { (layout::say(&clip(&dead::cause_first(&g.example), 120))) }
                    }
                } }
            } }
            @if o.truncated { p.hint { "From the first " (layout::num(o.scanned)) " of " (layout::count(o.total, "dead letter", "dead letters")) "." } }
        }
    }
}

/// One page of `filter`'s dead letters: scanned alone, nothing forgotten.
async fn read_page(
    c: &Console,
    page: usize,
    filter: impl Fn(&DeadTask, &[u8]) -> bool,
) -> Result<Page, String> {
    let limit = c.ctx.cfg().console.dead_scan_limit;
    c.dead
        .reading(|| async {
            let conn = c.conn.connection(&c.ctx).await?;
            dead::page_where(&conn, c.ctx.topo(), limit, (page - 1) * PAGE, PAGE, filter)
                .await
                .map_err(|e| e.to_string())
        })
        .await
}

/// "Previous · 51–100 of 312 · Next" for page `page` of `p`; `link(n)` is
/// the address of page `n`.
fn pager(p: &Page, page: usize, link: impl Fn(usize) -> String) -> Markup {
    let matched = usize::try_from(p.matched).unwrap_or(usize::MAX);
    let pages = matched.div_ceil(PAGE).max(1);
    let first = (page - 1) * PAGE + 1;
    let last = first + p.tasks.len().saturating_sub(1);
    html! {
        @if pages > 1 || page > 1 { nav.pager aria-label="pages" {
            @if page > 1 { a rel="prev" href=(link(page - 1)) { "← Previous" } } @else { span.hint { "← Previous" } }
            span.range {
                @if p.tasks.is_empty() { "page " (page) " of " (pages) }
                @else { (layout::num(first as u64)) "–" (layout::num(last as u64)) " of " (layout::num(p.matched)) }
            }
            @if page < pages { a rel="next" href=(link(page + 1)) { "Next →" } } @else { span.hint { "Next →" } }
        } }
    }
}

/// The table of one page of messages, with checkboxes to replay a
/// selection; `back` is where the replay returns to.
fn messages_table(s: &SignIn, tasks: &[DeadTask], back: &str, with_task: bool) -> Markup {
    let can_replay = s.may(Scope::Publish);
    html! {
        form method="post" action="/ui/dead/replay" {
            (layout::csrf(s))
            input type="hidden" name="what" value="ids";
            input type="hidden" name="back" value=(back);
            div.scroll { table.messages {
                thead { tr {
                    th { input type="checkbox" data-select-all="id" aria-label="select all"; }
                    th { "Id" } @if with_task { th { "Task" } th { "Kind" } }
                    th.num { "Attempts" } th { "Dead at" } th { "Reason" }
                } }
                tbody { @for t in tasks {
                    tr data-id=[t.id.as_deref()] {
                        td { @if let Some(id) = &t.id { input type="checkbox" name="id" value=(id) aria-label="select"; } }
                        td { @if let Some(id) = &t.id {
                            a href=(message_link(id)) { code { (id) } }
                        } @else { "(no id)" } }
                        @if with_task { td { code { (t.task) } } td { (t.kind) } }
                        td.num { (t.attempts.map_or("—".into(), |a| layout::num(a.unsigned_abs()))) }
                        td.nowrap { (t.failed_at.as_deref().unwrap_or("—")) }
                        td.reason title=(t.reason) { (layout::say(&clip(&dead::cause_first(&t.reason), 160))) }
                    }
                } }
            } }
            button type="submit" disabled[!can_replay]
                title=(layout::needs(can_replay, Scope::Publish, "republish the ticked dead letters")) { "Replay selected" }
        }
    }
}

fn message_link(id: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("id", id)
        .finish();
    format!("/ui/dead/message?{q}")
}

pub async fn group(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<GroupKey>,
) -> Response {
    let page = page_number(q.page.as_deref());
    let selector = q.selector();
    let p = match read_page(&c, page, |t, _| selector.matches(t)).await {
        Ok(p) => p,
        Err(e) => return problem(&s, &e),
    };
    let can_replay = s.may(Scope::Publish);
    let can_purge = s.may(Scope::Admin);
    let here = if page > 1 {
        format!("{}&page={page}", q.link())
    } else {
        q.link()
    };
    let body = html! {
        (layout::flash(&c, &s, q.flash.as_deref()))
        p.hint { a href="/ui/dead" { "Dead letters" } " · " code { (q.task) } " · " (q.kind) }
        p.fingerprint title="the reason with its numbers, ids and instants replaced" { (q.fingerprint) }
        p.size {
            strong data-size=(p.matched) { (layout::count(p.matched, "dead letter", "dead letters")) }
            " in this group"
            @if p.truncated {
                " among the first " (layout::num(p.scanned)) " of " (layout::num(p.total))
                " (" code { "console.dead_scan_limit" } "); replaying or purging the group acts on the whole queue"
            }
            "."
        }
        (layout::scope_note(&s, &[("replay", Scope::Publish), ("purge", Scope::Admin)]))
        @if p.matched == 0 {
            p.notice.empty {
                "This group has no dead letters now: they were replayed or purged, or the queue changed. "
                a href="/ui/dead" { "Back to all dead letters" }
            }
        } @else {
            div.bulk {
                form method="post" action="/ui/dead/replay" {
                    (layout::csrf(&s)) input type="hidden" name="what" value="group"; (q.hidden())
                    button.replay-group type="submit" disabled[!can_replay]
                        title=(layout::needs(can_replay, Scope::Publish, "republish every dead letter of this group")) {
                        @if p.truncated { "Replay the whole group" } @else { "Replay all " (layout::num(p.matched)) " of the group" }
                    }
                }
                " "
                form method="post" action="/ui/dead/purge" {
                    (layout::csrf(&s)) input type="hidden" name="what" value="group"; (q.hidden())
                    button.danger.purge-group type="submit" disabled[!can_purge]
                        title=(layout::needs(can_purge, Scope::Admin, "delete this group, after a confirmation")) { "Purge the group…" }
                }
            }
            @if p.tasks.is_empty() {
                p.notice { "No page " (page) " in this group." }
            } @else {
                (pager(&p, page, |n| format!("{}&page={n}", q.link())))
                (messages_table(&s, &p.tasks, &here, false))
            }
            (pager(&p, page, |n| format!("{}&page={n}", q.link())))
        }
    };
    layout::page("Dead letters: one group", Some(&s), Nav::Dead, body)
}

#[derive(Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
    page: Option<String>,
    flash: Option<String>,
}

/// Dead letters whose id, task name, kind, reason or payload contains the
/// query (among the first `console.dead_scan_limit`), a page at a time.
pub async fn search(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<SearchQuery>,
) -> Response {
    let flash = layout::flash(&c, &s, q.flash.as_deref());
    let Some(search) = Search::new(&q.q) else {
        let body = html! { (flash) (search_form("")) p.hint { "Type a task id, or text from a task name, a reason or a payload." } };
        return layout::page("Search dead letters", Some(&s), Nav::Dead, body);
    };
    let page = page_number(q.page.as_deref());
    let p = match read_page(&c, page, |t, body| search.matches(t, body)).await {
        Ok(p) => p,
        Err(e) => return problem(&s, &e),
    };
    let link = |n: usize| {
        let mut qs = form_urlencoded::Serializer::new(String::new());
        qs.append_pair("q", search.text());
        if n > 1 {
            qs.append_pair("page", &n.to_string());
        }
        format!("/ui/dead/search?{}", qs.finish())
    };
    let body = html! {
        (flash)
        p.hint { a href="/ui/dead" { "Dead letters" } }
        (search_form(search.text()))
        p.size {
            strong data-size=(p.matched) { (layout::count(p.matched, "dead letter", "dead letters")) }
            (if p.matched == 1 { " matches " } else { " match " }) code { (search.text()) }
            @if p.truncated {
                " among the first " (layout::num(p.scanned)) " of " (layout::num(p.total))
                " (" code { "console.dead_scan_limit" } ")"
            }
            "."
        }
        @if !p.tasks.is_empty() {
            (pager(&p, page, link))
            (messages_table(&s, &p.tasks, &link(page), true))
        } @else if p.matched > 0 {
            p.notice { "No page " (page) " of these results." }
            (pager(&p, page, link))
        }
    };
    layout::page("Search dead letters", Some(&s), Nav::Dead, body)
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
        .reading(|| async {
            let conn = c.conn.connection(&c.ctx).await?;
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
                html! {
                    (layout::flash(&c, &s, q.flash.as_deref()))
                    p.notice { "No dead letter with id " code { (q.id) } " among the first " (layout::num(limit as u64)) " (replayed or purged meanwhile?)." }
                    p { a href="/ui/dead" { "All dead letters" } }
                },
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
        Err(e) => return problem(&s, &e),
    };
    let pretty = if m.payload_base64 {
        m.payload.clone()
    } else {
        serde_json::from_str::<Value>(&m.payload)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| m.payload.clone())
    };
    let can_replay = s.may(Scope::Publish);
    let group = GroupKey::new(&m.task.task, &m.task.kind, &m.task.fingerprint);
    let body = html! {
        (layout::flash(&c, &s, q.flash.as_deref()))
        p.hint { a href="/ui/dead" { "Dead letters" } " · " a href=(group.link()) { (group.words()) }
            " · " a.timeline href=(super::tasks::task_link(&q.id)) { "Timeline" } }
        p.reason { (m.task.reason) }
        div.cards {
            div.card { h2 { "Properties" } (kv(&readable_properties(&m.properties))) }
            div.card { h2 { "Headers" } (kv(&readable_headers(&m.headers))) }
        }
        (layout::scope_note(&s, &[("replay", Scope::Publish)]))
        h2 { "Payload" @if m.payload_base64 { " (not UTF-8: base64)" } }
        pre.payload { (pretty) }
        form method="post" action="/ui/dead/replay" {
            (layout::csrf(&s))
            input type="hidden" name="what" value="ids";
            input type="hidden" name="id" value=(q.id);
            button.replay type="submit" disabled[!can_replay]
                title=(layout::needs(can_replay, Scope::Publish, "republish it unchanged, attempts reset")) { "Replay as is" }
        }
        h2 { "Edit and replay" }
        form.edit method="post" action="/ui/dead/edit" {
            (layout::csrf(&s))
            input type="hidden" name="id" value=(q.id);
            textarea #payload name="payload" rows="10" data-json spellcheck="false" { (pretty) }
            p.json-error aria-live="polite" {}
            label { input type="checkbox" name="new_id" value="1"; " give it a new id" }
            p.hint { "Replayed as attempt 1 with the header " code { "x-warren-edited-by: " (s.who) } "." }
            button type="submit" disabled[!can_replay]
                title=(layout::needs(can_replay, Scope::Publish, "republish it with this payload as attempt 1")) { "Replay edited" }
        }
    };
    layout::page("Dead letter", Some(&s), Nav::Dead, body)
}

/// The AMQP `timestamp` (seconds since the epoch) as RFC 3339 UTC.
fn readable_properties(props: &Value) -> Value {
    let mut p = props.clone();
    if let Some(t) = p.get_mut("timestamp") {
        humanise_epoch(t, false);
    }
    p
}

/// Instants among the headers as RFC 3339 UTC: `*-at-ms` headers
/// (milliseconds since the epoch) and the `time` of each `x-death` entry.
fn readable_headers(headers: &Value) -> Value {
    let mut h = headers.clone();
    if let Some(map) = h.as_object_mut() {
        for (k, v) in map.iter_mut() {
            if k.ends_with("-at-ms") {
                humanise_epoch(v, true);
            }
            if k == "x-death" {
                for entry in v.as_array_mut().into_iter().flatten() {
                    if let Some(t) = entry.get_mut("time") {
                        humanise_epoch(t, false);
                    }
                }
            }
        }
    }
    h
}

fn humanise_epoch(v: &mut Value, ms: bool) {
    if let Some(text) = v.as_i64().and_then(|n| layout::epoch(n, ms)) {
        *v = Value::String(text);
    }
}

fn kv(v: &Value) -> Markup {
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

/// What a replay or purge form selects: the selector, the words for the
/// audit line, and the words for the notice.
fn selection(f: &Fields) -> Result<(Selector, String, Markup), Markup> {
    match f.get("what") {
        Some("all") => Ok((
            Selector::All,
            "all".into(),
            html! { "from the whole queue" },
        )),
        Some("group") => {
            let k = GroupKey::of(f);
            let target = format!("group {}/{}/{}", k.task, k.kind, k.fingerprint);
            Ok((k.selector(), target, html! { "of " (k.words()) }))
        }
        Some("ids") => {
            let ids: Vec<String> = f.all("id").into_iter().map(str::to_owned).collect();
            if ids.is_empty() {
                return Err(html! { "Nothing selected: tick the dead letters to replay first." });
            }
            let target = format!("{} selected", ids.len());
            let words = html! { "of " (layout::num(ids.len() as u64)) " selected" };
            Ok((Selector::Ids(ids), target, words))
        }
        _ => Err(html! { "Unknown selection." }),
    }
}

/// Where to go back to after an action on `f`'s selection: the page the
/// form came from (only a workbench page: never another site), else the
/// list of groups. A replayed or purged group is gone: back to the list.
fn back(f: &Fields) -> String {
    match f.get("back") {
        Some(b) if b.starts_with("/ui/dead") && !b.contains("://") => b.to_owned(),
        _ => "/ui/dead".into(),
    }
}

pub async fn replay(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let (selector, target, words) = match selection(&f) {
        Ok(x) => x,
        Err(e) => return layout::see_other(&c, &s, &back(&f), e),
    };
    let timeout = c.ctx.cfg().amqp.confirm_timeout;
    let report = c
        .dead
        .exclusive(&c.sampler, || async {
            let conn = c.conn.connection(&c.ctx).await?;
            dead::replay(&conn, c.ctx.topo(), &selector, usize::MAX, timeout)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    match report {
        Ok(r) => {
            let ok = r.failed.is_empty();
            actions::audit(&c.ctx, &s.who, "replay", &target, r.replayed.len(), ok);
            let n = r.replayed.len() as u64;
            let msg = html! {
                "Replayed " (layout::count(n, "dead letter", "dead letters")) " " (words) "."
                @if let Some((id, why)) = r.failed.first() {
                    " " (layout::num(r.failed.len() as u64)) " not replayed, e.g. " code { (id) } ": " (layout::say(why))
                }
                @if n == 0 && ok { " Nothing matched any more: replayed or purged meanwhile?" }
            };
            // A group replayed in full is gone: its page would be empty.
            let to = if matches!(selector, Selector::Group { .. }) && ok {
                "/ui/dead".to_owned()
            } else if matches!(selector, Selector::Group { .. }) {
                GroupKey::of(&f).link()
            } else {
                back(&f)
            };
            layout::see_other(&c, &s, &to, msg)
        }
        Err(e) => {
            actions::audit(&c.ctx, &s.who, "replay", &target, 0, false);
            layout::see_other(
                &c,
                &s,
                &back(&f),
                html! { "Replay failed: " (layout::say(&e)) },
            )
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
    let back = message_link(&id);
    // Checked here too: the page's check is a convenience, not a guard.
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(payload) {
        return layout::see_other(
            &c,
            &s,
            &back,
            html! { "Not replayed: the payload is not JSON (" (layout::say(&crate::request::json_error(&e))) ")." },
        );
    }
    let new_id = f.get("new_id").is_some();
    // The API's publisher seals: the edit goes out signed with the
    // producer's keys (the old signature cannot cover the new body).
    let Some(api) = c.ctx.link().publisher() else {
        return layout::see_other(
            &c,
            &s,
            &back,
            html! { "Not replayed: not connected to the broker." },
        );
    };
    let report = replay_edited(&c, &s, &id, payload, new_id, &api.publisher).await;
    edited(&c, &s, &id, back, report)
}

/// Republish dead letter `id` with `payload`; the error says whether it is
/// gone from the dead queue (`true`) and why it was not replayed.
async fn replay_edited(
    c: &Console,
    s: &SignIn,
    id: &str,
    payload: &str,
    new_id: bool,
    publisher: &warren::amqp::Publisher,
) -> Result<dead::ReplayReport, (bool, String)> {
    c.dead
        .exclusive(&c.sampler, || async {
            let conn = c.conn.connection(&c.ctx).await.map_err(|e| (false, e))?;
            dead::replay_edited(
                &conn,
                c.ctx.topo(),
                id,
                payload.as_bytes().to_vec(),
                new_id,
                &s.who,
                publisher,
            )
            .await
            .map_err(|e| match e {
                DeadError::NotFound(_) => (true, "it is no longer in the dead queue".to_owned()),
                e => (false, e.to_string()),
            })
        })
        .await
}

/// Audit an edited replay and say how it went: back to the dead letters
/// once it is replayed or gone, else to the message (`back`).
fn edited(
    c: &Console,
    s: &SignIn,
    id: &str,
    back: String,
    report: Result<dead::ReplayReport, (bool, String)>,
) -> Response {
    match report {
        Ok(r) if r.failed.is_empty() => {
            actions::audit(&c.ctx, &s.who, "replay_edited", id, 1, true);
            let new = r.replayed.first().cloned().unwrap_or_default();
            layout::see_other(
                c,
                s,
                "/ui/dead",
                html! { "Replayed " code { (id) } " with the edited payload as task " code { (new) } "." },
            )
        }
        Ok(r) => {
            actions::audit(&c.ctx, &s.who, "replay_edited", id, 0, false);
            let why = r.failed.first().map(|(_, w)| w.clone()).unwrap_or_default();
            layout::see_other(c, s, &back, html! { "Not replayed: " (layout::say(&why)) })
        }
        Err((gone, e)) => {
            actions::audit(&c.ctx, &s.who, "replay_edited", id, 0, false);
            let to = if gone { "/ui/dead".to_owned() } else { back };
            layout::see_other(
                c,
                s,
                &to,
                html! { "Not replayed " code { (id) } ": " (layout::say(&e)) },
            )
        }
    }
}

pub async fn purge(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Admin) {
        return r;
    }
    let (selector, target, words) = match selection(&f) {
        Ok(x) => x,
        Err(e) => return layout::see_other(&c, &s, &back(&f), e),
    };
    if f.get("confirm") != Some("yes") {
        return confirm_purge(&c, &s, &f, &selector, words).await;
    }
    let purged = c
        .dead
        .exclusive(&c.sampler, || async {
            let conn = c.conn.connection(&c.ctx).await?;
            dead::purge(&conn, c.ctx.topo(), &selector, usize::MAX)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    match purged {
        Ok(n) => {
            actions::audit(&c.ctx, &s.who, "purge", &target, n as usize, true);
            layout::see_other(
                &c,
                &s,
                "/ui/dead",
                html! { "Purged " (layout::count(n, "dead letter", "dead letters")) " " (words) "." },
            )
        }
        Err(e) => {
            actions::audit(&c.ctx, &s.who, "purge", &target, 0, false);
            layout::see_other(
                &c,
                &s,
                "/ui/dead",
                html! { "Purge failed: " (layout::say(&e)) },
            )
        }
    }
}

/// The confirmation step: what would go, and the same form once more with
/// `confirm=yes`.
async fn confirm_purge(
    c: &Console,
    s: &SignIn,
    f: &Fields,
    selector: &Selector,
    words: Markup,
) -> Response {
    let sample = c.sampler.get(&c.ctx, &c.conn, false).await;
    let broker = sample.dead.map(u64::from);
    let estimate = match (selector, c.dead.overview(c, false, broker).await) {
        (Selector::All, Ok(o)) => html! {
            "all " (layout::count(broker.unwrap_or(o.total), "dead letter", "dead letters"))
        },
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
            html! {
                (layout::count(n, "dead letter", "dead letters")) " " (words)
                @if o.truncated {
                    " among the first " (layout::num(o.scanned)) " (and any in the rest of the queue)"
                }
            }
        }
        _ => words,
    };
    let cancel = match selector {
        Selector::Group { .. } => GroupKey::of(f).link(),
        _ => "/ui/dead".to_owned(),
    };
    let body = html! {
        p.notice { "Purge " strong { (estimate) } "? They are deleted for good." }
        form.confirm method="post" action="/ui/dead/purge" {
            (layout::csrf(s))
            input type="hidden" name="what" value=(f.get("what").unwrap_or(""));
            @if f.get("what") == Some("group") { (GroupKey::of(f).hidden()) }
            input type="hidden" name="confirm" value="yes";
            button.danger type="submit" { "Yes, purge" }
            " "
            a href=(cancel) { "Cancel" }
        }
    };
    layout::page("Confirm purge", Some(s), Nav::Dead, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn epoch_instants_in_properties_and_headers_read_as_rfc3339() {
        let p = readable_properties(&json!({"timestamp": 1_700_000_000, "priority": 5}));
        assert_eq!(
            p,
            json!({"timestamp": "2023-11-14T22:13:20Z", "priority": 5})
        );
        let h = readable_headers(&json!({
            "x-warren-published-at-ms": 1_700_000_000_123_i64,
            "x-warren-timeout-ms": 30000,
            "x-death": [{"time": 1_700_000_000, "count": 1}],
        }));
        assert_eq!(
            h,
            json!({
                "x-warren-published-at-ms": "2023-11-14T22:13:20.123Z",
                "x-warren-timeout-ms": 30000,
                "x-death": [{"time": "2023-11-14T22:13:20Z", "count": 1}],
            })
        );
    }

    #[test]
    fn back_goes_only_to_workbench_pages() {
        let f = |b: &str| Fields::parse(format!("back={}", urlencode(b)).as_bytes());
        assert_eq!(
            back(&f("/ui/dead/group?task=a&page=2")),
            "/ui/dead/group?task=a&page=2"
        );
        assert_eq!(back(&f("https://evil.example/")), "/ui/dead");
        assert_eq!(back(&f("//evil.example/ui/dead")), "/ui/dead");
        assert_eq!(back(&f("/ui/dead@x://y")), "/ui/dead");
        assert_eq!(back(&Fields::parse(b"")), "/ui/dead");
    }

    fn urlencode(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    #[test]
    fn page_numbers_from_one() {
        assert_eq!(page_number(None), 1);
        assert_eq!(page_number(Some("3")), 3);
        assert_eq!(page_number(Some("0")), 1);
        assert_eq!(page_number(Some("x")), 1);
    }
}
