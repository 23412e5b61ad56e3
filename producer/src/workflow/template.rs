//! Payload templates: a JSON value in which a string that is exactly
//! `"{{input}}"`, `"{{input.a.b}}"`, `"{{results.<step>}}"`,
//! `"{{results.<step>.x}}"` or `"{{run.id}}"` is replaced by that JSON value.
//! A path that leads nowhere (a missing key, an index into a non-array)
//! gives `null`. Nothing else is interpreted: no text interpolation, no
//! expressions.

use std::collections::BTreeSet;

use serde_json::Value;

/// A checked template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Value);

/// What a template reads when rendered.
pub struct Inputs<'a> {
    pub input: &'a Value,
    pub run_id: &'a str,
    /// The result of a step, if it has one.
    pub result: &'a dyn Fn(&str) -> Option<&'a Value>,
}

enum Ref<'a> {
    Input(Vec<&'a str>),
    Result(&'a str, Vec<&'a str>),
    RunId,
}

fn reference(s: &str) -> Option<Result<Ref<'_>, String>> {
    let inner = s.strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let mut parts = inner.split('.');
    let r = match parts.next() {
        Some("input") => Ok(Ref::Input(parts.collect())),
        Some("results") => match parts.next() {
            Some(step) if !step.is_empty() => Ok(Ref::Result(step, parts.collect())),
            _ => Err(format!("`{s}` names no step (write `{{{{results.<step>}}}}`)")),
        },
        Some("run") if inner == "run.id" => Ok(Ref::RunId),
        _ => Err(format!(
            "`{s}`: unknown reference (use input, input.<path>, results.<step>, results.<step>.<path> or run.id)"
        )),
    };
    Some(r.and_then(|r| match &r {
        Ref::Input(p) | Ref::Result(_, p) if p.iter().any(|k| k.is_empty()) => {
            Err(format!("`{s}`: empty path segment"))
        }
        _ => Ok(r),
    }))
}

/// Check every reference of `value`; `results.<step>` must name one of
/// `ancestors` (the steps the templated step waits for, directly or not).
pub fn parse(value: Value, ancestors: &BTreeSet<String>) -> Result<Template, String> {
    fn walk(v: &Value, ancestors: &BTreeSet<String>) -> Result<(), String> {
        match v {
            Value::String(s) => match reference(s) {
                None => Ok(()),
                Some(Err(e)) => Err(e),
                Some(Ok(Ref::Result(step, _))) if !ancestors.contains(step) => Err(format!(
                    "`{s}`: {step:?} is not a step this step waits for (directly or not)"
                )),
                Some(Ok(_)) => Ok(()),
            },
            Value::Array(a) => a.iter().try_for_each(|v| walk(v, ancestors)),
            Value::Object(o) => o.values().try_for_each(|v| walk(v, ancestors)),
            _ => Ok(()),
        }
    }
    walk(&value, ancestors)?;
    Ok(Template(value))
}

fn lookup(mut v: &Value, path: &[&str]) -> Value {
    for k in path {
        let next = match v {
            Value::Object(o) => o.get(*k),
            Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(n) => v = n,
            None => return Value::Null,
        }
    }
    v.clone()
}

impl Template {
    pub fn render(&self, inputs: &Inputs<'_>) -> Value {
        fn walk(v: &Value, inputs: &Inputs<'_>) -> Value {
            match v {
                Value::String(s) => match reference(s) {
                    Some(Ok(Ref::Input(p))) => lookup(inputs.input, &p),
                    Some(Ok(Ref::Result(step, p))) => match (inputs.result)(step) {
                        Some(r) => lookup(r, &p),
                        None => Value::Null,
                    },
                    Some(Ok(Ref::RunId)) => Value::String(inputs.run_id.to_owned()),
                    _ => v.clone(),
                },
                Value::Array(a) => Value::Array(a.iter().map(|v| walk(v, inputs)).collect()),
                Value::Object(o) => Value::Object(
                    o.iter()
                        .map(|(k, v)| (k.clone(), walk(v, inputs)))
                        .collect(),
                ),
                other => other.clone(),
            }
        }
        walk(&self.0, inputs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn references_are_replaced_and_missing_paths_are_null() {
        let anc: BTreeSet<String> = ["a".to_owned()].into();
        let t = parse(
            json!({
                "all": "{{input}}",
                "day": "{{input.date.day}}",
                "first": "{{input.list.0}}",
                "a": "{{results.a}}",
                "ax": "{{ results.a.x }}",
                "missing": "{{input.nope.deeper}}",
                "run": "{{run.id}}",
                "text": "hello {{input}}",
                "n": [1, "{{results.a.x}}"]
            }),
            &anc,
        )
        .unwrap();
        let input = json!({"date": {"day": 3}, "list": ["x"]});
        let a = json!({"x": 7});
        let result = |s: &str| if s == "a" { Some(&a) } else { None };
        let out = t.render(&Inputs {
            input: &input,
            run_id: "r1",
            result: &result,
        });
        assert_eq!(
            out,
            json!({
                "all": input, "day": 3, "first": "x", "a": {"x": 7}, "ax": 7,
                "missing": null, "run": "r1", "text": "hello {{input}}", "n": [1, 7]
            })
        );
    }

    #[test]
    fn bad_references_are_refused() {
        let anc = BTreeSet::new();
        for (t, want) in [
            ("{{results.b}}", "not a step this step waits for"),
            ("{{results}}", "names no step"),
            ("{{inptu.x}}", "unknown reference"),
            ("{{run.other}}", "unknown reference"),
            ("{{input..x}}", "empty path segment"),
        ] {
            let e = parse(json!({ "k": t }), &anc).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }
}
