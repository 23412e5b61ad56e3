//! Workflow definitions are validated up front: `schedules check`, `run`
//! and `workflows` refuse a cycle, an unknown step, an unreachable step or
//! an unknown workflow in a schedule with exit 2, naming the key. (Runs
//! themselves are tested end to end in the consumer's tests, which have
//! both binaries.)

fn exits(args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(crate::helpers::BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    // Nothing listens there: a command that got past validation fails to
    // connect (exit 1) instead of reaching some broker.
    cmd.env("WARREN_HTTP_ADDR", "127.0.0.1:0")
        .env("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    cmd.output().expect("run warren-producer")
}

/// `cmd` with `--config path`, which must exit 2; its stderr.
fn exits_2(path: &str, cmd: &[&str]) -> String {
    let args: Vec<&str> = ["--config", path]
        .into_iter()
        .chain(cmd.iter().copied())
        .collect();
    let out = exits(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
    err
}

const STEPS: &str = "[[workflows]]\nname = \"nightly\"\n\
    [[workflows.steps]]\nname = \"export\"\ntask = \"t.export\"\n";

#[test]
fn bad_workflows_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown step",
            format!("{STEPS}[[workflows.steps]]\nname = \"report\"\ntask = \"t\"\nafter = [\"exprot\"]\n"),
            r#"workflows[0].steps[1].after: unknown step "exprot" (steps are: export, report)"#,
        ),
        (
            "cycle",
            format!(
                "{STEPS}[[workflows.steps]]\nname = \"a\"\ntask = \"t\"\nafter = [\"export\", \"b\"]\n\
                 [[workflows.steps]]\nname = \"b\"\ntask = \"t\"\nafter = [\"a\"]\n"
            ),
            "workflows[0].steps[1].after: cycle a → b → a",
        ),
        (
            "unreachable",
            format!(
                "{STEPS}[[workflows.steps]]\nname = \"a\"\ntask = \"t\"\nafter = [\"b\"]\n\
                 [[workflows.steps]]\nname = \"b\"\ntask = \"t\"\nafter = [\"a\"]\n\
                 [[workflows.steps]]\nname = \"mail\"\ntask = \"t\"\nafter = [\"b\", \"export\"]\n"
            ),
            r#"workflows[0].steps[3]: step "mail" is unreachable: it waits on the cycle a → b → a"#,
        ),
        (
            "schedule of an unknown workflow",
            format!("{STEPS}[[schedules]]\nname = \"s\"\ncron = \"@daily\"\nworkflow = \"nightyl\"\n"),
            r#"schedules[0].workflow: unknown workflow "nightyl" (workflows are: nightly)"#,
        ),
        (
            "bad template",
            "[[workflows]]\nname = \"w\"\n[[workflows.steps]]\nname = \"a\"\ntask = \"t\"\npayload = { x = \"{{results.a}}\" }\n".to_owned(),
            "workflows[0].steps[0].payload: `{{results.a}}`",
        ),
    ];
    for (i, (what, text, names)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        for cmd in [
            &["schedules", "check"][..],
            &["run"][..],
            &["workflows", "list"][..],
        ] {
            let err = exits_2(&path, cmd);
            assert!(err.contains(names), "{what}, {cmd:?}: {err}");
        }
    }
    // A valid one passes `check`, and `workflows list` shows it.
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, STEPS).unwrap();
    let path = path.display().to_string();
    let out = exits(&["--config", &path, "schedules", "check"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("ok: 0 schedule(s), 0 enabled, 1 workflow(s)"),
        "{out:?}"
    );
    let out = exits(&["--config", &path, "workflows", "list"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nightly\n  export  → t.export\n"
    );
    let out = exits(&["--config", &path, "workflows", "start", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workflow named `nope`"));
}

/// One workflow with three kinds of problem reports all three at once
/// (a cycle used to hide the rest of its workflow, an unknown step the
/// cycle and the templates).
#[test]
fn one_workflow_with_a_cycle_an_unknown_step_and_a_bad_template_names_all_three() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.toml");
    let text = format!(
        "{STEPS}[[workflows.steps]]\nname = \"a\"\ntask = \"t\"\nafter = [\"b\"]\n\
         [[workflows.steps]]\nname = \"b\"\ntask = \"t\"\nafter = [\"a\"]\n\
         [[workflows.steps]]\nname = \"report\"\ntask = \"t\"\nafter = [\"exprot\"]\n\
         [[workflows.steps]]\nname = \"mail\"\ntask = \"t\"\nafter = [\"export\"]\n\
         payload = {{ x = \"{{{{results.report}}}}\" }}\n"
    );
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    for cmd in [&["schedules", "check"][..], &["workflows", "list"][..]] {
        let err = exits_2(&path, cmd);
        assert!(err.contains("3 problems:"), "{cmd:?}: {err}");
        for names in [
            r#"workflows[0].steps[3].after: unknown step "exprot""#,
            "workflows[0].steps[1].after: cycle a → b → a",
            "workflows[0].steps[4].payload: `{{results.report}}`",
        ] {
            assert!(err.contains(names), "{cmd:?}: {names}: {err}");
        }
    }
}
