//! `schedules apply FILE [--dry-run]` and `schedules delete NAME`: change
//! the API's schedules from the command line, straight through the catalog
//! in RabbitMQ ([`crate::catalog`]) with the same validation and the same
//! outcomes as `PUT`/`DELETE /v1/schedules/{name}`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use serde::Deserialize;
use warren::amqp::Publisher;
use warren::config::Problems;
use warren::topology::producer::Part;

use crate::catalog::{self, Catalog, Change, Resolution};
use crate::config::{ProducerConfig, Schedule, ScheduleConfig};

/// A file of schedules: TOML with `[[schedules]]`, or JSON (an array of
/// definitions, or `{"schedules": [...]}`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    schedules: Vec<ScheduleConfig>,
}

fn read_file(path: &Path) -> anyhow::Result<Vec<ScheduleConfig>> {
    let text = std::fs::read_to_string(path).map_err(|e| invalid(path, e.to_string()))?;
    let trimmed = text.trim_start();
    let parsed = if trimmed.starts_with('[') && !trimmed.starts_with("[[") {
        serde_json::from_str::<Vec<ScheduleConfig>>(&text).map_err(|e| e.to_string())
    } else if trimmed.starts_with('{') {
        serde_json::from_str::<File>(&text)
            .map(|f| f.schedules)
            .map_err(|e| e.to_string())
    } else if let Some(entries) = chunked(&text) {
        Ok(entries)
    } else {
        toml::from_str::<File>(&text)
            .map(|f| f.schedules)
            .map_err(|e| e.to_string())
    };
    parsed.map_err(|e| invalid(path, e))
}

/// A long file read a chunk at a time, as the config file is
/// ([`warren::config::Split`]); `None` to parse it whole.
fn chunked(text: &str) -> Option<Vec<ScheduleConfig>> {
    let split = warren::config::Split::find(text, "schedules", warren::config::split::PER_CHUNK)?;
    let rest: toml::Table = toml::from_str(&split.rest).ok()?;
    if !rest.is_empty() {
        return None;
    }
    split.entries()
}

/// A file that cannot be read or parsed (exit 2).
fn invalid(path: &Path, message: String) -> anyhow::Error {
    warren::config::ConfigError::Invalid {
        origin: path.display().to_string(),
        message,
    }
    .into()
}

/// Every problem of the file at once, keyed by entry
/// (`schedules[0] (`nightly`)`): the checks of `[[schedules]]`, names
/// given twice, names the config file holds.
fn check_all(
    path: &Path,
    cfg: &ProducerConfig,
    config_schedules: &[Schedule],
    defs: &[ScheduleConfig],
) -> anyhow::Result<()> {
    let workflows: Vec<String> = cfg.workflows.iter().map(|w| w.name.clone()).collect();
    let mut p = Problems::new();
    let mut seen = HashSet::new();
    for (i, d) in defs.iter().enumerate() {
        let who = format!("schedules[{i}] (`{}`)", d.name);
        if let Err(e) = crate::config::compile_one(d, &workflows) {
            for m in e {
                p.push(&who, m);
            }
        }
        if !seen.insert(d.name.as_str()) {
            p.push(&who, "name given twice in the file");
        }
        if config_schedules.iter().any(|s| s.name() == d.name) {
            let why = "the producer's config file defines this schedule (change it there)";
            p.push(&who, why);
        }
    }
    p.into_result()
        .map_err(|p| p.into_error(path.display().to_string()).into())
}

/// The catalog as stored now, and a consumer that keeps it current.
async fn open(
    cfg: &ProducerConfig,
) -> anyhow::Result<(lapin::Connection, Publisher, Arc<Catalog>)> {
    let conn = warren::amqp::connect(&cfg.amqp, "producer-cli")
        .await
        .context("connecting to the broker")?;
    let prefix = cfg.topology.prefix.as_str();
    let topo = warren::Topology::new(&cfg.topology);
    warren::topology::producer::declare(&conn, &topo, &[Part::Catalog]).await?;
    let publisher = Publisher::new(&conn, cfg.amqp.confirm_timeout).await?;
    let cat = Arc::new(Catalog::new(crate::context::api_compiler(cfg)));
    let (_ch, mut consumer) = catalog::follow(&conn, &publisher, prefix, &cat, &|_| {}).await?;
    let follower = cat.clone();
    tokio::spawn(async move {
        let _ch = _ch;
        while let Some(Ok(d)) = consumer.next().await {
            catalog::apply_delivery(&follower, &d, &|_| {});
            let _ = d.acker.ack(Default::default()).await;
        }
    });
    Ok((conn, publisher, cat))
}

enum Plan {
    Create,
    Update(u64),
    Unchanged,
}

/// `schedules apply FILE`.
pub async fn apply(
    cfg: ProducerConfig,
    config_schedules: &[Schedule],
    file: &Path,
    dry_run: bool,
) -> anyhow::Result<()> {
    let defs = read_file(file)?;
    check_all(file, &cfg, config_schedules, &defs)?;
    let (conn, publisher, cat) = open(&cfg).await?;
    let plans: Vec<(ScheduleConfig, Plan)> = defs
        .into_iter()
        .map(|d| {
            let plan = match cat.get(&d.name) {
                None => Plan::Create,
                Some(s) if s.def == d => Plan::Unchanged,
                Some(s) => Plan::Update(s.version),
            };
            (d, plan)
        })
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let res = if dry_run {
        for (d, plan) in &plans {
            let what = match plan {
                Plan::Create => "create",
                Plan::Update(_) => "update",
                Plan::Unchanged => "unchanged",
            };
            *counts.entry(what).or_default() += 1;
            warren::outln!("{what} {}", d.name);
        }
        warren::outln!("dry run: {} (nothing changed)", summary(&counts));
        Ok(())
    } else {
        let r = write_all(&cfg, &publisher, &cat, plans, &mut counts).await;
        warren::outln!("{}", summary(&counts));
        r
    };
    let _ = conn.close(200, "done".into()).await;
    res
}

fn summary(counts: &BTreeMap<&str, usize>) -> String {
    if counts.is_empty() {
        return "no schedules in the file".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Append every change at once (pipelined confirms), then read each
/// outcome back from the log.
async fn write_all(
    cfg: &ProducerConfig,
    publisher: &Publisher,
    cat: &Catalog,
    plans: Vec<(ScheduleConfig, Plan)>,
    counts: &mut BTreeMap<&str, usize>,
) -> anyhow::Result<()> {
    let prefix = cfg.topology.prefix.as_str();
    let mut waiting = Vec::new();
    let mut pending = Vec::new();
    for (d, plan) in plans {
        let if_version = match plan {
            Plan::Unchanged => {
                *counts.entry("unchanged").or_default() += 1;
                continue;
            }
            Plan::Create => Some(0),
            Plan::Update(v) => Some(v),
        };
        let req = uuid::Uuid::new_v4().to_string();
        let name = d.name.clone();
        let change = Change::Put {
            def: Box::new(d),
            if_version,
            max: Some(cfg.scheduler.max_schedules),
            req: req.clone(),
        };
        waiting.push((name, cat.expect(&req)));
        let body = serde_json::to_vec(&change)?;
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(warren::envelope::PERSISTENT);
        pending.push(
            publisher
                .send(
                    "",
                    &warren::topology::producer::catalog_log(prefix),
                    props,
                    &body,
                )
                .await?,
        );
    }
    for p in pending {
        p.confirmed().await.context("storing a schedule")?;
    }
    let mut refused = 0;
    for (name, rx) in waiting {
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), rx)
            .await
            .ok()
            .and_then(Result::ok);
        let what = match outcome {
            Some(Resolution::Created { .. }) => "created",
            Some(Resolution::Replaced { .. }) => "updated",
            Some(o) => {
                refused += 1;
                warren::errln!("{name}: refused: {}", describe(&o));
                "refused"
            }
            None => {
                refused += 1;
                warren::errln!("{name}: stored, but its outcome was not read back in time");
                "unknown"
            }
        };
        *counts.entry(what).or_default() += 1;
    }
    if refused > 0 {
        anyhow::bail!("{refused} schedule(s) not applied");
    }
    Ok(())
}

fn describe(o: &Resolution) -> String {
    match o {
        Resolution::Stale { .. } => "changed by someone else meanwhile; run apply again".into(),
        Resolution::Full { max } => {
            format!("the catalog is full (scheduler.max_schedules = {max})")
        }
        Resolution::Invalid(why) => why.clone(),
        Resolution::NotFound => "not found".into(),
        Resolution::Created { .. } | Resolution::Replaced { .. } | Resolution::Deleted => {
            "ok".into()
        }
    }
}

/// `schedules delete NAME`.
pub async fn delete(
    cfg: ProducerConfig,
    config_schedules: &[Schedule],
    name: &str,
) -> anyhow::Result<()> {
    if config_schedules.iter().any(|s| s.name() == name) {
        return Err(super::UsageError::ConfigSchedule(name.to_owned()).into());
    }
    let (conn, publisher, cat) = open(&cfg).await?;
    let res = async {
        if cat.get(name).is_none() {
            anyhow::bail!("no API schedule named `{name}`");
        }
        let change = Change::Delete {
            name: name.to_owned(),
            if_version: None,
            req: uuid::Uuid::new_v4().to_string(),
        };
        match catalog::write(&cat, &publisher, &cfg.topology.prefix, change).await? {
            Resolution::Deleted => Ok(()),
            o => anyhow::bail!("not deleted: {}", describe(&o)),
        }
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    res?;
    warren::outln!("{name}: deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn written(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn a_long_file_reads_as_parsed_whole_and_a_stray_key_is_still_refused() {
        let n = 2 * warren::config::split::PER_CHUNK + 1;
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[[schedules]]\nname = \"s{i}\"\ncron = \"{} * * * * *\"\ntask = \"t\"\n\n",
                i % 60
            ));
        }
        let whole = toml::from_str::<File>(&text).unwrap().schedules;
        let read = read_file(written(&text).path()).unwrap();
        assert_eq!(read.len(), n);
        assert_eq!(read, whole);

        let e = read_file(written(&format!("owner = \"x\"\n{text}")).path()).unwrap_err();
        assert!(e.to_string().contains("unknown field `owner`"), "{e}");
    }
}
