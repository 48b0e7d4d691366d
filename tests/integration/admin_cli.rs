//! `credbrokerctl` against a real server: the register → token walkthrough from the README.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::support::*;

fn ctl(broker: &TestBroker, args: &[&str], stdin: Option<&str>) -> Output {
    ctl_at(broker.addr, &broker.data_dir, args, stdin)
}

/// `credbrokerctl ARGS` against the broker at `addr` whose data directory (admin token) is
/// `data_dir`.
pub(crate) fn ctl_at(
    addr: std::net::SocketAddr,
    data_dir: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_credbrokerctl"));
    cmd.args(args)
        .env("CREDBROKER_ADDR", addr.to_string())
        .env("CREDBROKER_DATA_DIR", data_dir)
        .env_remove("CREDBROKER_TOKEN")
        .env_remove("CREDBROKER_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        pipe.write_all(s.as_bytes()).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

pub(crate) fn json_out(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_register_token_list_show_rotate_delete_and_callers() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("cli-pat-1", "77", "CLI User", "cli@example.com");
    fake.add_user("cli-pat-2", "77", "CLI User", "cli@example.com");
    let broker = TestBroker::start(dir.path()).await;

    let b = &broker;
    let base = fake.base_url.clone();
    let out = tokio::task::block_in_place(|| {
        ctl(
            b,
            &[
                "--output",
                "json",
                "system",
                "register",
                "--kind",
                "asana",
                "--id",
                "cli-asana",
                "--base-url",
                &base,
                "--check",
                "--delivery",
                "header",
                "--secret-stdin",
            ],
            Some("cli-pat-1\n"),
        )
    });
    let v = json_out(&out);
    assert_eq!(v["system_id"], "cli-asana");
    assert_eq!(v["check"]["ok"], true);
    assert_eq!(v["check"]["identity"]["email"], "cli@example.com");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("cli-pat-1"));

    let v = json_out(&tokio::task::block_in_place(|| {
        ctl(b, &["--output", "json", "token", "get", "cli-asana"], None)
    }));
    assert_eq!(v["headers"][0]["name"], "authorization");
    assert_eq!(v["headers"][0]["value"], "Bearer cli-pat-1");
    assert_eq!(v["api_base_url"], base.as_str());
    assert_eq!(v["credential_version"], 1);

    let v = json_out(&tokio::task::block_in_place(|| {
        ctl(b, &["--output", "json", "system", "list"], None)
    }));
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["kind"], "asana");

    // Secret from a file; rotation checks first.
    let secret = dir.path().join("new.pat");
    std::fs::write(&secret, "cli-pat-2\n").unwrap();
    let v = json_out(&tokio::task::block_in_place(|| {
        ctl(
            b,
            &[
                "--output",
                "json",
                "system",
                "rotate",
                "cli-asana",
                "--secret-file",
                secret.to_str().unwrap(),
            ],
            None,
        )
    }));
    assert_eq!(v["credential_version"], 2);
    let text = tokio::task::block_in_place(|| ctl(b, &["system", "show", "cli-asana"], None));
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("version 2") && text.contains("state: active"),
        "{text}"
    );

    // A secret pasted where its source belongs (base64 holds '=') is not repeated in the error;
    // one field given twice is refused, not silently overridden.
    let pasted = "cGFzdGVkLXNlY3JldC12YWx1ZQ==";
    let out = tokio::task::block_in_place(|| {
        ctl(
            b,
            &["system", "rotate", "cli-asana", "--secret", pasted],
            None,
        )
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no secret field"), "{err}");
    assert!(!err.contains("cGFzdGVkLXNlY3JldC12YWx1ZQ"), "{err}");
    let args = [
        "system",
        "rotate",
        "cli-asana",
        "--secret-file",
        secret.to_str().unwrap(),
        "--secret",
        "token=stdin",
    ];
    let out = tokio::task::block_in_place(|| ctl(b, &args, Some("other-pat")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("given twice"), "{err}");

    // A failing rotation exits non-zero with the reason and changes nothing.
    let out = tokio::task::block_in_place(|| {
        ctl(
            b,
            &["system", "rotate", "cli-asana", "--secret-stdin"],
            Some("wrong-pat"),
        )
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FailedPrecondition") && err.contains("invalid_credentials"),
        "{err}"
    );
    assert!(!err.contains("wrong-pat"));
    // Nothing changed: still version 2, and the PAT handed out is still the second one.
    let v = json_out(&tokio::task::block_in_place(|| {
        ctl(b, &["--output", "json", "token", "get", "cli-asana"], None)
    }));
    assert_eq!(v["credential_version"], 2, "{v}");
    assert_eq!(v["headers"][0]["value"], "Bearer cli-pat-2", "{v}");

    // No secret on a non-interactive stdin: a clear error, not a hang.
    let out = tokio::task::block_in_place(|| {
        ctl(
            b,
            &["system", "register", "--kind", "asana", "--id", "x"],
            None,
        )
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never taken from the command line"));

    // Callers.
    let v = json_out(&tokio::task::block_in_place(|| {
        ctl(
            b,
            &[
                "--output", "json", "caller", "add", "worker-1", "--role", "worker",
            ],
            None,
        )
    }));
    let worker_token = v["token"].as_str().unwrap().to_owned();
    assert!(worker_token.starts_with("cbt_"));
    let out = tokio::task::block_in_place(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_credbrokerctl"));
        c.args(["--output", "json", "system", "list"])
            .env("CREDBROKER_ADDR", b.addr.to_string())
            .env("CREDBROKER_TOKEN", &worker_token);
        c.output().unwrap()
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
    // An empty CREDBROKER_TOKEN (a template's `${VAR}` left empty) is refused, not taken for
    // none (a worker's script would then run as the data directory's admin).
    let out = tokio::task::block_in_place(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_credbrokerctl"));
        c.args(["--output", "json", "caller", "list"])
            .env("CREDBROKER_ADDR", b.addr.to_string())
            .env("CREDBROKER_DATA_DIR", &b.data_dir)
            .env("CREDBROKER_TOKEN", "")
            .env_remove("CREDBROKER_TOKEN_FILE");
        c.output().unwrap()
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set but empty"), "{err}");
    let v = json_out(&tokio::task::block_in_place(|| {
        ctl(b, &["--output", "json", "caller", "list"], None)
    }));
    assert_eq!(v.as_array().unwrap().len(), 2);
    json_out(&tokio::task::block_in_place(|| {
        ctl(
            b,
            &["--output", "json", "caller", "revoke", "worker-1"],
            None,
        )
    }));

    json_out(&tokio::task::block_in_place(|| {
        ctl(
            b,
            &["--output", "json", "system", "delete", "cli-asana"],
            None,
        )
    }));
    let out = tokio::task::block_in_place(|| {
        ctl(
            b,
            &["--output", "json", "system", "show", "cli-asana"],
            None,
        )
    });
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["error"]["code"], "NotFound");
    broker.stop().await;
}
