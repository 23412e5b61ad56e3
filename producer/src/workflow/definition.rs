//! `[[workflows]]` as written in the config, and its validation into
//! [`Workflow`]s: unique names, known `after` steps, no cycle (named as
//! `a → b → a`), no step that can never run, templates that refer to steps
//! the step waits for. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren::config::Problems;
use warren::retry::RetryOverrides;

use super::template::{self, Template};

/// One `[[workflows]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    pub name: String,
    pub steps: Vec<StepConfig>,
}

/// One `[[workflows.steps]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub name: String,
    /// The task name its task is published under.
    pub task: String,
    /// A JSON template (see [`super::template`]); without one the payload is
    /// `{"input": …, "results": {<after step>: <its result>}}`.
    #[serde(default)]
    pub payload: Option<toml::Value>,
    #[serde(default)]
    pub after: Vec<String>,
    /// Task run to undo this step once the run failed (saga).
    #[serde(default)]
    pub compensate: Option<String>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub initial_delay: Option<Duration>,
    #[serde(default)]
    pub multiplier: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    #[serde(default)]
    pub jitter: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub priority: Option<u8>,
}

impl StepConfig {
    fn retry(&self) -> RetryOverrides {
        RetryOverrides {
            max_attempts: self.max_attempts,
            initial_delay: self.initial_delay,
            multiplier: self.multiplier,
            max_delay: self.max_delay,
            jitter: self.jitter,
        }
    }
}

/// A validated workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: String,
    /// In config order.
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub task: String,
    pub payload: Option<Template>,
    pub after: Vec<String>,
    pub compensate: Option<String>,
    pub retry: RetryOverrides,
    pub timeout: Option<Duration>,
    pub priority: Option<u8>,
}

impl Workflow {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Validate every workflow; all problems at once, each keyed by its config
/// path (`workflows[0].steps[1].after`), several in one workflow too.
pub fn compile(list: &[WorkflowConfig]) -> Result<Vec<Workflow>, Problems> {
    let mut p = Problems::new();
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (wi, w) in list.iter().enumerate() {
        let at = format!("workflows[{wi}]");
        if !valid_name(&w.name) {
            let why = "must be non-empty ASCII letters, digits, `-`, `_` or `.`";
            p.push_value(format!("{at}.name"), format!("{:?}", w.name), why);
        } else if !names.insert(w.name.clone()) {
            let why = format!("duplicate workflow name {:?}", w.name);
            p.push(format!("{at}.name"), why);
        }
        if let Some(wf) = compile_one(w, &at, &mut p) {
            out.push(wf);
        }
    }
    p.into_result().map(|()| out)
}

/// One workflow: its steps one by one, then the graph they make (cycles,
/// steps behind them), then the payload templates. Each stage reports
/// what it finds, so one workflow can show several kinds of problem.
fn compile_one(w: &WorkflowConfig, at: &str, p: &mut Problems) -> Option<Workflow> {
    let before = p.len();
    if w.steps.is_empty() {
        p.push(format!("{at}.steps"), "a workflow needs at least one step");
    }
    // Without unique, valid step names the graph is not defined.
    if !check_steps(w, at, p) {
        return None;
    }
    let deps: BTreeMap<&str, Vec<&str>> = w
        .steps
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.after.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    check_cycles(w, at, &deps, p);
    let steps = compile_steps(w, at, &deps, p);
    (p.len() == before).then(|| Workflow {
        name: w.name.clone(),
        steps,
    })
}

/// Each step on its own: name, task names, `after` naming known steps,
/// retry values. False when a step name is invalid or given twice.
fn check_steps(w: &WorkflowConfig, at: &str, p: &mut Problems) -> bool {
    let all: Vec<&str> = w.steps.iter().map(|s| s.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut names_ok = true;
    for (si, s) in w.steps.iter().enumerate() {
        let at = format!("{at}.steps[{si}]");
        if !valid_name(&s.name) || s.name.ends_with(warren::workflow::COMPENSATE_SUFFIX) {
            let why = format!(
                "must be non-empty ASCII letters, digits, `-`, `_` or `.`, not ending in `{}`",
                warren::workflow::COMPENSATE_SUFFIX
            );
            p.push_value(format!("{at}.name"), format!("{:?}", s.name), why);
            names_ok = false;
        } else if !seen.insert(s.name.as_str()) {
            p.push(
                format!("{at}.name"),
                format!("duplicate step name {:?}", s.name),
            );
            names_ok = false;
        }
        for (task, key) in [
            (Some(&s.task), "task"),
            (s.compensate.as_ref(), "compensate"),
        ] {
            if let Some(t) = task {
                if t.is_empty() || t.len() > warren::delay::MAX_TASK_NAME_LEN {
                    let why = format!(
                        "must be a task name of 1 to {} bytes",
                        warren::delay::MAX_TASK_NAME_LEN
                    );
                    p.push_value(format!("{at}.{key}"), format!("{t:?}"), why);
                }
            }
        }
        for dep in &s.after {
            if !all.contains(&dep.as_str()) {
                let why = format!("unknown step {dep:?} (steps are: {})", all.join(", "));
                p.push(format!("{at}.after"), why);
            }
        }
        if let Err(e) = s.retry().validate() {
            p.push_value(format!("{at}.{}", e.field()), e.value(), e.rule());
        }
    }
    names_ok
}

/// The first cycle (named `a → b → a`), and every step waiting on it.
fn check_cycles(w: &WorkflowConfig, at: &str, deps: &BTreeMap<&str, Vec<&str>>, p: &mut Problems) {
    let Some(cycle) = find_cycle(&w.steps, deps) else {
        return;
    };
    let first = cycle[0];
    let si = w.steps.iter().position(|s| s.name == first).unwrap_or(0);
    let text = cycle.join(" → ");
    p.push(format!("{at}.steps[{si}].after"), format!("cycle {text}"));
    // Steps that wait, directly or not, on a step of a cycle can never run.
    let stuck = behind_cycles(&w.steps, deps);
    for (si, s) in w.steps.iter().enumerate() {
        if stuck.contains(s.name.as_str()) {
            let why = format!(
                "step {:?} is unreachable: it waits on the cycle {text}",
                s.name
            );
            p.push(format!("{at}.steps[{si}]"), why);
        }
    }
}

/// The compiled steps: payload templates checked against the steps each
/// step waits for, `after` without repeats.
fn compile_steps(
    w: &WorkflowConfig,
    at: &str,
    deps: &BTreeMap<&str, Vec<&str>>,
    p: &mut Problems,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (si, s) in w.steps.iter().enumerate() {
        let payload = match &s.payload {
            None => None,
            Some(v) => {
                let key = format!("{at}.steps[{si}].payload");
                let json = match serde_json::to_value(v) {
                    Ok(j) => j,
                    Err(e) => {
                        p.push(key, format!("not representable as JSON: {e}"));
                        continue;
                    }
                };
                match template::parse(json, &ancestors(&s.name, deps)) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        p.push(key, e);
                        continue;
                    }
                }
            }
        };
        let mut after: Vec<String> = Vec::new();
        for d in &s.after {
            if !after.contains(d) {
                after.push(d.clone());
            }
        }
        steps.push(Step {
            name: s.name.clone(),
            task: s.task.clone(),
            payload,
            after,
            compensate: s.compensate.clone(),
            retry: s.retry(),
            timeout: s.timeout,
            priority: s.priority,
        });
    }
    steps
}

/// Every step `name` waits for, directly or not.
fn ancestors<'a>(name: &str, deps: &BTreeMap<&'a str, Vec<&'a str>>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<&str> = deps.get(name).cloned().unwrap_or_default();
    while let Some(d) = todo.pop() {
        if out.insert(d.to_owned()) {
            todo.extend(deps.get(d).cloned().unwrap_or_default());
        }
    }
    out
}

/// The first cycle found (in config order), as `[a, b, a]`.
fn find_cycle<'a>(
    steps: &'a [StepConfig],
    deps: &BTreeMap<&'a str, Vec<&'a str>>,
) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Open => {
                let from = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<&str> = path[from..].to_vec();
                cycle.push(n);
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n, Mark::Open);
        path.push(n);
        for d in deps.get(n).map(Vec::as_slice).unwrap_or_default() {
            if let Some(c) = visit(d, deps, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for s in steps {
        let mut path = Vec::new();
        if let Some(mut c) = visit(&s.name, deps, &mut marks, &mut path) {
            // `after` points backwards (b after a): read it as the order the
            // steps would run in.
            c.reverse();
            return Some(c);
        }
    }
    None
}

/// Steps not on a cycle that wait, directly or not, on a step that is.
fn behind_cycles<'a>(
    steps: &'a [StepConfig],
    deps: &BTreeMap<&'a str, Vec<&'a str>>,
) -> BTreeSet<&'a str> {
    // A step can run when all it waits for can: the fixpoint from the roots.
    let mut runnable: BTreeSet<&str> = BTreeSet::new();
    loop {
        let before = runnable.len();
        for s in steps {
            if deps
                .get(s.name.as_str())
                // An unknown step (reported on its own) blocks nothing here.
                .is_some_and(|d| {
                    d.iter()
                        .all(|d| runnable.contains(d) || !deps.contains_key(d))
                })
            {
                runnable.insert(s.name.as_str());
            }
        }
        if runnable.len() == before {
            break;
        }
    }
    let on_cycle: BTreeSet<&str> = steps
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| ancestors(n, deps).contains(*n))
        .collect();
    steps
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !runnable.contains(n) && !on_cycle.contains(n))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        workflows: Vec<WorkflowConfig>,
    }

    fn errors(text: &str) -> Vec<String> {
        let d: Doc = toml::from_str(text).unwrap();
        let p = compile(&d.workflows).unwrap_err();
        p.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn diamond_compiles_in_config_order() {
        let d: Doc = toml::from_str(
            r#"
            [[workflows]]
            name = "w"
            [[workflows.steps]]
            name = "a"
            task = "t.a"
            [[workflows.steps]]
            name = "b"
            task = "t.b"
            after = ["a"]
            max_attempts = 2
            initial_delay = "1s"
            [[workflows.steps]]
            name = "c"
            task = "t.c"
            after = ["a", "a"]
            [[workflows.steps]]
            name = "d"
            task = "t.d"
            after = ["b", "c"]
            payload = { b = "{{results.b}}", x = "{{results.a.x}}" }
            "#,
        )
        .unwrap();
        let w = compile(&d.workflows).unwrap();
        assert_eq!(w[0].steps.len(), 4);
        assert_eq!(w[0].steps[2].after, vec!["a".to_owned()]);
        assert_eq!(w[0].steps[1].retry.max_attempts, Some(2));
    }

    #[test]
    fn unknown_after_names_the_key_and_the_steps() {
        let e = errors(
            "[[workflows]]\nname='w'\n[[workflows.steps]]\nname='export'\ntask='t'\n\
             [[workflows.steps]]\nname='report'\ntask='t'\nafter=['exprot']\n",
        );
        assert_eq!(
            e,
            [r#"workflows[0].steps[1].after: unknown step "exprot" (steps are: export, report)"#]
        );
    }

    #[test]
    fn cycles_are_named_and_steps_behind_them_unreachable() {
        let e = errors(
            "[[workflows]]\nname='w'\n\
             [[workflows.steps]]\nname='root'\ntask='t'\n\
             [[workflows.steps]]\nname='a'\ntask='t'\nafter=['root','b']\n\
             [[workflows.steps]]\nname='b'\ntask='t'\nafter=['a']\n\
             [[workflows.steps]]\nname='c'\ntask='t'\nafter=['b']\n",
        );
        assert_eq!(
            e,
            [
                "workflows[0].steps[1].after: cycle a → b → a",
                r#"workflows[0].steps[3]: step "c" is unreachable: it waits on the cycle a → b → a"#
            ]
        );
        let e = errors(
            "[[workflows]]\nname='w'\n[[workflows.steps]]\nname='a'\ntask='t'\nafter=['a']\n",
        );
        assert_eq!(e, ["workflows[0].steps[0].after: cycle a → a"]);
    }

    #[test]
    fn duplicates_bad_templates_and_retry_values_are_refused() {
        let e = errors(
            "[[workflows]]\nname='w'\n[[workflows.steps]]\nname='a'\ntask='t'\njitter=3.0\n\
             [[workflows.steps]]\nname='a'\ntask='t'\n\
             [[workflows]]\nname='w'\nsteps=[]\n",
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].starts_with("workflows[0].steps[0].jitter = 3"),
            "{e:?}"
        );
        assert!(e[1].contains("duplicate step name"), "{e:?}");
        assert!(
            e[2].starts_with("workflows[1].name: duplicate workflow name"),
            "{e:?}"
        );
        assert!(e[3].contains("at least one step"), "{e:?}");
        let e = errors(
            "[[workflows]]\nname='w'\n[[workflows.steps]]\nname='a'\ntask='t'\n\
             [[workflows.steps]]\nname='b'\ntask='t'\npayload={x='{{results.b}}'}\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("workflows[0].steps[1].payload: "), "{e:?}");
        assert!(e[0].contains("\"b\""), "{e:?}");
    }

    #[test]
    fn one_workflow_reports_a_cycle_an_unknown_after_and_a_bad_template_together() {
        let e = errors(
            "[[workflows]]\nname='w'\n\
             [[workflows.steps]]\nname='a'\ntask='t'\nafter=['b']\n\
             [[workflows.steps]]\nname='b'\ntask='t'\nafter=['a']\n\
             [[workflows.steps]]\nname='c'\ntask='t'\nafter=['nope']\n\
             [[workflows.steps]]\nname='d'\ntask='t'\npayload={x='{{results.a}}'}\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with(r#"workflows[0].steps[2].after: unknown step "nope""#),
            "{e:?}"
        );
        assert_eq!(e[1], "workflows[0].steps[0].after: cycle a → b → a");
        assert!(e[2].starts_with("workflows[0].steps[3].payload: "), "{e:?}");
    }
}
