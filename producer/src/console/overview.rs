//! The overview: this replica and whether it leads, broker connection, each
//! work queue's depth, consumers and rates, the dead-letter count. The page
//! holds a fragment that the script reloads every few seconds.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{html, Markup};

use super::guard::{wants_fresh, Signed};
use super::layout::{self, Nav};
use super::sample::Sample;
use super::Console;

/// Seconds between two reloads of the fragment in the browser.
const REFRESH_SECS: u32 = 5;

pub async fn page(State(c): State<Console>, Signed(s): Signed, headers: HeaderMap) -> Response {
    let inner = fragment_markup(&c, wants_fresh(&headers)).await;
    let body = html! {
        div #overview data-refresh="/ui/overview/fragment" data-every=(REFRESH_SECS) {
            (inner)
        }
    };
    layout::page("Overview", Some(&s), Nav::Overview, body)
}

pub async fn fragment(State(c): State<Console>, Signed(_): Signed) -> Response {
    layout::html_response(StatusCode::OK, fragment_markup(&c, false).await)
}

async fn fragment_markup(c: &Console, fresh: bool) -> Markup {
    let sample = c.sampler.get(&c.ctx, &c.conn, fresh).await;
    let latest = super::dead::latest(c, fresh, sample.dead.map(u64::from)).await;
    let connected = c.ctx.link().publisher().is_some();
    html! {
        section.cards {
            div.card.producer {
                h2 { "Producer" }
                p { "This replica: " code { (c.ctx.instance()) } }
                p { @if c.ctx.leadership().is_leader() { span.ok { "leader" } " — fires the schedules" }
                    @else { span.warn { "standby" } " — another replica fires" } }
                ul.replicas {
                    @for r in c.ctx.replicas().list() {
                        li data-replica=(r.instance) { code { (r.instance) } " "
                            @if r.leader { span.ok { "leader" } } @else { span.hint { "standby" } } }
                    }
                }
                p { "Broker: " @if connected { span.ok { "connected" } } @else { span.bad { "disconnected" } } }
            }
            div.card.dead {
                h2 { "Dead letters" }
                p.big { @if let Some(n) = sample.dead { a href="/ui/dead" data-total=(n) { (layout::num(n)) } } @else { "?" } }
                p.hint { code { (c.ctx.topo().dead_queue()) } }
            }
        }
        (queues(&sample))
        h2 { "Latest failures" }
        (latest)
        @if let Some(p) = &sample.problem { p.error { (layout::say(p)) } }
        p.hint.stamp { "Sampled " (chrono::Utc::now().format("%H:%M:%S UTC")) "; refreshes every " (REFRESH_SECS) " s." }
    }
}

fn queues(sample: &Sample) -> Markup {
    // Columns from the management API whenever it answered (rates stay
    // "—" until the broker has collected its first statistics).
    let rates = sample.queues.iter().any(|q| q.unacked.is_some());
    html! {
        h2 { "Work queues" }
        div.scroll { table.queues {
            thead { tr {
                th { "Queue" } th.num { "Ready" }
                @if rates { th.num { "Unacked" } th.num { "Publish /s" } th.num { "Deliver /s" } }
                th.num { "Consumers" } th.num { "Depth change /s" }
            } }
            tbody {
                @for q in &sample.queues {
                    tr data-queue=(q.name) {
                        td { code { (q.name) } }
                        td.num { (opt(q.ready)) }
                        @if rates {
                            td.num { (opt(q.unacked)) }
                            td.num { (rate(q.publish_rate)) }
                            td.num { (rate(q.deliver_rate)) }
                        }
                        td.num.bad[q.consumers == Some(0) && q.ready.unwrap_or(0) > 0] { (opt(q.consumers)) }
                        td.num { (rate(q.trend)) }
                    }
                }
            }
        } }
    }
}

fn opt<T: Into<u64>>(v: Option<T>) -> String {
    v.map_or_else(|| "—".into(), layout::num)
}

fn rate(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:+.1}").replace('+', ""))
}
