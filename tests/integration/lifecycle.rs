//! Process lifecycle: health across start and SIGTERM, wrong master key, data-directory lock, and
//! the leak scan over logs, errors and data files of the real binary.

use std::time::{Duration, Instant};

use credbroker::pb;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

async fn health_client(addr: std::net::SocketAddr) -> HealthClient<Channel> {
    HealthClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, gate, stop, task) = TestBroker::start_held(test_config(dir.path())).await;
    let mut health = health_client(addr).await;
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let status = health
        .check(HealthCheckRequest {
            service: credbroker::server::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    // Broker RPCs answer UNAVAILABLE meanwhile (and the store was not even opened).
    let mut c = client(addr, Some("whatever")).await;
    let e = c
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(!dir.path().join("admin.token").exists());

    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    gate.send(()).unwrap();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    stop.send(()).unwrap();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    task.await.unwrap().unwrap();
}

/// SIGTERM while a refresh is at the vendor: health goes NOT_SERVING, the call in flight is
/// answered (drained, not cut), the process exits 0, and a restart has everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_drains_and_exits_zero_then_restart_keeps_data() {
    use crate::oauth::{refresh_cred, servicenow, sn_register, USER};
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("pat-sigterm-1", "9", "U", "u@example.com");
    let sn = servicenow(1800).await;
    let rt = sn.issue_refresh_token(USER);
    let proc = spawn_process(dir.path(), &logs.path().join("1.log"), &[]).unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    admin
        .register_system(register_asana(
            "durable",
            &fake.base_url,
            "pat-sigterm-1",
            true,
        ))
        .await
        .unwrap();

    let mut health = health_client(proc.addr).await;
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    // A call in flight at the vendor when the signal arrives.
    admin
        .register_system(sn_register(
            "inflight",
            &sn.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    let current = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "inflight".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    sn.oauth(|o| o.token_delay = Duration::from_millis(800));
    let before = sn.token_calls();
    let mut worker = admin.clone();
    let in_flight = tokio::spawn(async move {
        worker
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: "inflight".into(),
                rejected_token_id: current.token_id,
                ..Default::default()
            })
            .await
    });
    eventually(
        Duration::from_secs(10),
        "the refresh reached the vendor",
        || sn.token_calls() > before,
    )
    .await;
    proc.signal("TERM");
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let answered = in_flight
        .await
        .unwrap()
        .expect("the call in flight was cut");
    assert!(answered.into_inner().headers[0]
        .value
        .starts_with("Bearer "));
    drop(admin);
    let code = tokio::task::spawn_blocking(move || proc.terminate_wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0));

    let proc = spawn_process(dir.path(), &logs.path().join("2.log"), &[]).unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "durable".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers[0].value, "Bearer pat-sigterm-1");
    assert_eq!(proc.terminate(), Some(0));
}

/// SIGHUP (a `systemctl reload`, a logrotate `kill -HUP`) stops nothing, with or without TLS:
/// its default action ended the broker with no drain. Then SIGTERM, with a monitor watching the
/// writes health service: the watch hears NOT_SERVING and ends, so it does not hold the
/// shutdown for the grace period, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_stops_nothing_and_a_writes_watch_does_not_hold_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    // A grace far longer than the test: an exit within it shows nothing held it open.
    let config = logs.path().join("grace.toml");
    std::fs::write(&config, "shutdown_grace_secs = 600\n").unwrap();
    let config = config.to_str().unwrap();
    let mut proc = spawn_process(
        dir.path(),
        &logs.path().join("1.log"),
        &[("CREDBROKER_CONFIG", config)],
    )
    .unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proc.log().contains("SIGHUP received") {
        assert!(
            proc.child.try_wait().unwrap().is_none(),
            "SIGHUP ended the broker"
        );
        assert!(Instant::now() < deadline, "{}", proc.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut health = health_client(proc.addr).await;
    let mut watch = health
        .watch(HealthCheckRequest {
            service: credbroker::store::WRITES_HEALTH_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    proc.signal("TERM");
    let heard = tokio::time::timeout(Duration::from_secs(60), watch.message()).await;
    let heard = heard.expect("the writes watch heard nothing of the shutdown");
    assert_eq!(
        heard.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let code = tokio::task::spawn_blocking(move || proc.terminate_wait());
    let code = tokio::time::timeout(Duration::from_secs(60), code).await;
    assert!(code.is_ok(), "the watch held the shutdown");
    drop(watch);
    assert_eq!(code.unwrap().unwrap(), Some(0));
}

impl BrokerProcess {
    /// Waits for an exit that was already signalled.
    pub fn terminate_wait(mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

/// A start that must fail, saying `says` in its log, whether it exits before or after binding
/// its port (some checks run once the listener is up; it must still exit on its own).
fn refused_start(dir: &std::path::Path, log: &std::path::Path, envs: &[(&str, &str)], says: &str) {
    let (status, log) = match spawn_process(dir, log, envs) {
        Err(e) => e,
        Ok(mut p) => {
            let status = p.child.wait().unwrap();
            (status, p.log())
        }
    };
    assert!(!status.success());
    assert!(log.contains(says), "{log}");
}

/// Bad configuration exits 64 (EX_USAGE) whether clap refuses the value (a number that is not
/// one, a misspelt flag) or the broker's own checks do, and says what is wrong; `--help` exits 0.
/// Nothing is created in the data directory. (Clap's refusals once exited 2.)
#[test]
fn bad_configuration_exits_64_whoever_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(args)
            .env("CREDBROKER_DATA_DIR", &data)
            .env("CREDBROKER_LISTEN", "127.0.0.1:0")
            .envs(envs.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (&[], &[("CREDBROKER_STORE_CACHE_MIB", "abc")], "abc"),
        (&["--no-such-flag"], &[], "--no-such-flag"),
        (
            &[],
            &[("CREDBROKER_STORE_CACHE_MIB", "0")],
            "store_cache_mib",
        ),
        (&[], &[("CREDBROKER_LOG_FORMAT", "xml")], "log format"),
    ];
    for (args, envs, says) in cases {
        let (code, stderr) = run(args, envs);
        assert_eq!(code, Some(64), "{args:?} {envs:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} {envs:?}: {stderr}");
    }
    let (code, _) = run(&["--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(!data.exists(), "a refused start created the data directory");
}

/// Runs `cmd` (the broker, logging JSON to stderr) until it says it is serving; returns the
/// child, still running, and its log so far.
fn until_serving(mut cmd: std::process::Command) -> (std::process::Child, String) {
    let mut child = cmd
        .env("CREDBROKER_LOG_FORMAT", "json")
        .env_remove("CREDBROKER_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let serving = line.contains("credbroker is serving.");
            lines.push(line);
            if serving {
                break;
            }
        }
        let _ = tx.send(lines.join("\n"));
    });
    let log = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    assert!(log.contains("credbroker is serving."), "{log}");
    (child, log)
}

/// The broker's command line on `data` (gRPC on loopback, HTTP on `http`).
fn broker_command(data: &std::path::Path, http: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", http])
        .arg("--data-dir")
        .arg(data)
        .env_remove("CREDBROKER_PUBLIC_URL");
    cmd
}

/// An HTTP listener on a wildcard address with no public URL set warns at start: leases and
/// OAuth redirects would name `0.0.0.0`, which sends a worker on another host to itself (the
/// container's default). With the public URL set, no warning.
#[test]
fn a_public_url_that_names_no_host_is_warned_about_at_start() {
    let startup_log = |public_url: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = broker_command(dir.path(), "0.0.0.0:0");
        if let Some(url) = public_url {
            cmd.env("CREDBROKER_PUBLIC_URL", url);
        }
        let (mut child, log) = until_serving(cmd);
        let _ = child.kill();
        let _ = child.wait();
        log
    };
    let warning = "No public URL is set";
    assert!(startup_log(None).contains(warning));
    let set = startup_log(Some("https://broker.example.com"));
    assert!(!set.contains(warning), "{set}");
}

/// The broker turns core dumps off (a crash would write the keys and tokens in memory to
/// disk) and raises its open-file limit to the hard one (a soft 1024 runs out before the
/// connection caps); where the hard limit is below the caps, it warns at start.
#[test]
fn the_broker_writes_no_core_and_takes_the_open_files_it_may() {
    let limits_of = |pid: u32| {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let row = |name: &str| -> Vec<String> {
            let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
            line[name.len()..]
                .split_whitespace()
                .take(2)
                .map(str::to_owned)
                .collect()
        };
        (row("Max core file size"), row("Max open files"))
    };
    let under = |shell_limits: &str| {
        let dir = tempfile::tempdir().unwrap();
        let inner = broker_command(dir.path(), "127.0.0.1:0");
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{shell_limits}; exec \"$0\" \"$@\""))
            .arg(inner.get_program())
            .args(inner.get_args());
        let (mut child, log) = until_serving(cmd);
        let limits = limits_of(child.id());
        let _ = child.kill();
        let _ = child.wait();
        (limits, log)
    };
    // A low soft limit under a hard one the caps fit in (the default caps and their reserve need
    // 6,400), and core dumps asked for (the hard core limit may be 0 already: then none are).
    let hard = limits_of(std::process::id()).1[1]
        .parse::<u64>()
        .unwrap_or(u64::MAX);
    assert!(
        hard >= 6_400,
        "this machine's open-file hard limit is {hard}"
    );
    let hard = hard.min(8192);
    let ((core, files), log) = under(&format!(
        "ulimit -Sn 512 && ulimit -Hn {hard} && {{ ulimit -Sc 1024 2>/dev/null || true; }}"
    ));
    assert_eq!(core, ["0", "0"], "{log}");
    assert_eq!(files, [hard.to_string(), hard.to_string()], "{log}");
    assert!(!log.contains("open-file limit is below"), "{log}");
    // A hard limit below the default caps (4096 + 1024 connections).
    let ((_, files), log) = under("ulimit -n 1000");
    assert_eq!(files, ["1000", "1000"]);
    assert!(log.contains("open-file limit is below"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_master_key_refuses_to_start_and_leaves_data_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    let proc = spawn_process(dir.path(), &logs.path().join("1.log"), &[]).unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    admin
        .register_system(register_asana(
            "kept",
            &fake.base_url,
            "pat-keep-123",
            false,
        ))
        .await
        .unwrap();
    assert_eq!(proc.terminate(), Some(0));

    let snapshot = |d: &std::path::Path| -> Vec<(std::path::PathBuf, String)> {
        use sha2::Digest;
        files_under(d)
            .into_iter()
            .map(|p| {
                let h = sha2::Sha256::digest(std::fs::read(&p).unwrap());
                (p, h.iter().map(|b| format!("{b:02x}")).collect())
            })
            .collect()
    };
    let before = snapshot(dir.path());
    let wrong = logs.path().join("wrong.key");
    std::fs::write(&wrong, "q1K3sAWaV0r0m4y0QkIYb3oQ3Eo8m8b1m7s0y1m0J2M=\n").unwrap();
    refused_start(
        dir.path(),
        &logs.path().join("2.log"),
        &[("CREDBROKER_MASTER_KEY_FILE", wrong.to_str().unwrap())],
        "master key does not match",
    );
    assert_eq!(
        before,
        snapshot(dir.path()),
        "a refused start changed the data directory"
    );

    // A malformed key file is refused too, with its own message.
    std::fs::write(&wrong, "not base64").unwrap();
    refused_start(
        dir.path(),
        &logs.path().join("3.log"),
        &[("CREDBROKER_MASTER_KEY_FILE", wrong.to_str().unwrap())],
        "32 random bytes",
    );

    // A store cache too small to work is refused before the store is opened.
    refused_start(
        dir.path(),
        &logs.path().join("3b.log"),
        &[("CREDBROKER_STORE_CACHE_MIB", "0")],
        "store_cache_mib",
    );
    assert_eq!(
        before,
        snapshot(dir.path()),
        "a refused start changed the data directory"
    );

    // The right key still works (on the smallest store cache allowed).
    let proc = spawn_process(
        dir.path(),
        &logs.path().join("4.log"),
        &[("CREDBROKER_STORE_CACHE_MIB", "4")],
    )
    .unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    // The log reaches its file through a reader thread: look until the line is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    let opened = loop {
        let found = proc
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "Store opened.");
        match found {
            Some(v) => break v,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            None => panic!("the store's opening was not logged: {}", proc.log()),
        }
    };
    assert_eq!(opened["cache_mib"], 4, "{opened}");
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "kept".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers[0].value, "Bearer pat-keep-123");
    assert_eq!(proc.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_broker_on_the_same_data_dir_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let first = spawn_process(dir.path(), &logs.path().join("1.log"), &[]).unwrap();
    wait_for_health(first.addr, ServingStatus::Serving).await;
    let started = std::time::Instant::now();
    let (status, log) = match spawn_process(dir.path(), &logs.path().join("2.log"), &[]) {
        Err(e) => e,
        Ok(mut p) => {
            let s = p.child.wait().unwrap();
            (s, p.log())
        }
    };
    assert!(!status.success());
    assert!(log.contains("in use"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The first one is unaffected.
    let mut health = health_client(first.addr).await;
    let s = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(s, ServingStatus::Serving as i32);
    assert_eq!(first.terminate(), Some(0));
}

/// Runs every flow of this build with canary secrets at RUST_LOG=trace, then greps the logs, every
/// error message and every file in the data directory for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_secrets_never_leak_to_logs_errors_or_data_files() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    let canaries = [
        "CANARY-pat-aaa111",
        "CANARY-pat-bbb222",
        "CANARY-bad-ccc333",
        "CANARY-rot-ddd444",
        "CANARY-snpw-eee555",
        "CANARY-snsecret-fff666",
        "CANARY-sfsecret-ggg777",
        "CANARY-sfwrong-hhh888",
        "CANARY-adopat-iii999",
        "CANARY-fdkey-jjj000",
        "CANARY-snbasic-kkk111",
        "CANARY-proxypat-lll222",
        crate::connect::JIRA_SECRET,
    ];
    fake.add_user(canaries[0], "1", "A", "a@example.com");
    fake.add_user(canaries[1], "1", "A", "a@example.com");
    fake.add_user(canaries[3], "1", "A", "a@example.com");
    fake.add_user("CANARY-proxypat-lll222", "1", "A", "a@example.com");
    let jira = crate::connect::atlassian().await;
    let proc = spawn_process(
        dir.path(),
        &logs.path().join("trace.log"),
        &[
            ("RUST_LOG", "trace"),
            ("CREDBROKER_JIRA_AUTH_URL", jira.origin.as_str()),
            ("CREDBROKER_JIRA_API_URL", jira.origin.as_str()),
        ],
    )
    .unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let admin_token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let mut admin = client(proc.addr, Some(&admin_token)).await;
    let mut errors: Vec<String> = Vec::new();

    admin
        .register_system(register_asana("leak-a", &fake.base_url, canaries[0], true))
        .await
        .unwrap();
    admin
        .register_system(register_asana("leak-b", &fake.base_url, canaries[1], false))
        .await
        .unwrap();
    let created = admin
        .create_caller(pb::CreateCallerRequest {
            name: "leak-worker".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut worker = client(proc.addr, Some(&created.token)).await;
    for id in ["leak-a", "leak-b"] {
        worker
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: id.into(),
                min_valid_seconds: 0,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Error paths carrying secrets.
    for r in [
        admin
            .register_system(register_asana("leak-c", &fake.base_url, canaries[2], true))
            .await
            .map(|_| ()),
        admin
            .rotate_credential(pb::RotateCredentialRequest {
                system_id: "leak-a".into(),
                credential: Some(pat(canaries[2])),
                skip_check: false,
            })
            .await
            .map(|_| ()),
        admin
            .register_system(register_asana("leak-a", &fake.base_url, canaries[2], false))
            .await
            .map(|_| ()),
        admin
            .register_system(register_asana(
                "leak-d",
                "https://evil.example.com",
                canaries[2],
                false,
            ))
            .await
            .map(|_| ()),
        worker
            .register_system(register_asana("leak-e", &fake.base_url, canaries[2], false))
            .await
            .map(|_| ()),
    ] {
        errors.push(format!("{:?}", r.unwrap_err()));
    }
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "leak-b".into(),
            credential: Some(pat(canaries[3])),
            skip_check: false,
        })
        .await
        .unwrap();
    // More flows: ServiceNow OAuth (password grant), Salesforce client credentials, Azure DevOps.
    let sn = FakeServiceNow::start().await;
    sn.add_user("leak.user", "CANARY-snpw-eee555", "1", "L", "l@example.com");
    sn.add_client("leak-client", "CANARY-snsecret-fff666");
    admin
        .register_system(pb::RegisterSystemRequest {
            system_id: "leak-sn".into(),
            kind: pb::SystemKind::Servicenow as i32,
            base_url: sn.base_url.clone(),
            credential: Some(pb::Credential {
                credential: Some(pb::credential::Credential::OauthPasswordGrant(
                    pb::OAuthPasswordGrant {
                        client_id: "leak-client".into(),
                        client_secret: "CANARY-snsecret-fff666".into(),
                        username: "leak.user".into(),
                        password: "CANARY-snpw-eee555".into(),
                    },
                )),
            }),
            check: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let sn_tok = worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "leak-sn".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let sf = FakeSalesforce::start("leak-sf-client", "CANARY-sfsecret-ggg777").await;
    let sf_req = |secret: &str| pb::RegisterSystemRequest {
        system_id: "leak-sf".into(),
        kind: pb::SystemKind::Salesforce as i32,
        base_url: sf.base_url.clone(),
        credential: Some(pb::Credential {
            credential: Some(pb::credential::Credential::OauthClientCredentials(
                pb::OAuthClientCredentials {
                    client_id: "leak-sf-client".into(),
                    client_secret: secret.into(),
                    scopes: vec![],
                    secret_expires_at: None,
                },
            )),
        }),
        check: true,
        ..Default::default()
    };
    errors.push(format!(
        "{:?}",
        admin
            .register_system(sf_req("CANARY-sfwrong-hhh888"))
            .await
            .unwrap_err()
    ));
    admin
        .register_system(sf_req("CANARY-sfsecret-ggg777"))
        .await
        .unwrap();
    let sf_tok = worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "leak-sf".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ado = FakeAzureDevOps::start().await;
    ado.add_pat(
        "CANARY-adopat-iii999",
        "u",
        "U",
        "u@example.com",
        ADO_ALL_SCOPES,
        true,
    );
    admin
        .register_system(pb::RegisterSystemRequest {
            system_id: "leak-ado".into(),
            kind: pb::SystemKind::AzureDevops as i32,
            base_url: ado.base_url.clone(),
            credential: Some(pat("CANARY-adopat-iii999")),
            check: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Freshdesk (API key), ServiceNow basic, Jira Cloud through its consent page, a proxied
    // call with a lease, and a backup written into the data directory.
    let fd = FakeFreshworks::start(Freshworks::Desk).await;
    fd.add_key("CANARY-fdkey-jjj000", 42, "Ada", "ada@example.com");
    let basic = |id: &str, kind: pb::SystemKind, base: &str, cred| pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: kind as i32,
        base_url: base.into(),
        credential: Some(pb::Credential {
            credential: Some(cred),
        }),
        check: true,
        delivery: pb::Delivery::Header as i32,
        ..Default::default()
    };
    admin
        .register_system(basic(
            "leak-fd",
            pb::SystemKind::Freshdesk,
            &fd.base_url,
            pb::credential::Credential::ApiKey(pb::ApiKey {
                key: "CANARY-fdkey-jjj000".into(),
                expires_at: None,
            }),
        ))
        .await
        .unwrap();
    sn.add_user(
        "leak.basic",
        "CANARY-snbasic-kkk111",
        "2",
        "B",
        "b@example.com",
    );
    admin
        .register_system(basic(
            "leak-snb",
            pb::SystemKind::Servicenow,
            &sn.base_url,
            pb::credential::Credential::Basic(pb::BasicCredential {
                username: "leak.basic".into(),
                password: "CANARY-snbasic-kkk111".into(),
            }),
        ))
        .await
        .unwrap();
    admin
        .register_system(crate::connect::register(
            "leak-jira",
            pb::SystemKind::JiraCloud,
            "https://acme.atlassian.net/",
            crate::connect::authz_code(crate::connect::JIRA_CLIENT, crate::connect::JIRA_SECRET),
        ))
        .await
        .unwrap();
    let s = crate::connect::start(&mut admin, "leak-jira").await;
    assert_eq!(crate::connect::browse(&s.authorize_url).await.1, 200);
    admin
        .register_system(pb::RegisterSystemRequest {
            delivery: pb::Delivery::Proxy as i32,
            ..register_asana(
                "leak-proxy",
                &fake.base_url,
                "CANARY-proxypat-lll222",
                false,
            )
        })
        .await
        .unwrap();
    let mut minted = Vec::new();
    for id in ["leak-fd", "leak-snb", "leak-jira", "leak-proxy"] {
        let t = worker
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        minted.push(t);
    }
    let lease = &minted[3];
    let mut proxied = reqwest::Client::new().get(format!("{}/users/me", lease.api_base_url));
    for h in &lease.headers {
        proxied = proxied.header(&h.name, &h.value);
    }
    assert_eq!(proxied.send().await.unwrap().status(), 200);
    let mut backup = admin
        .export_backup(pb::ExportBackupRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut sealed = Vec::new();
    while let Some(c) = backup.message().await.unwrap() {
        sealed.extend_from_slice(&c.chunk);
    }
    assert!(!sealed.is_empty());
    std::fs::write(dir.path().join("leak.backup"), &sealed).unwrap();
    let issued_tokens: Vec<String> = [&sn_tok, &sf_tok, &minted[2], &minted[3]]
        .iter()
        .map(|t| t.headers[0].value.trim_start_matches("Bearer ").to_owned())
        .collect();
    admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "leak-a".into(),
            )),
        })
        .await
        .unwrap();
    fake.set_mode(Mode::ServerError);
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "leak-a".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    errors.push(format!("{c:?}"));
    drop((admin, worker));
    assert_eq!(proc.stop().await, Some(0));

    let log = std::fs::read_to_string(logs.path().join("trace.log")).unwrap();
    assert!(
        log.contains("System registered."),
        "the trace log was not captured"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(
        audit.contains("\"rpc\":\"GetAccessToken\""),
        "the audit trail was not written"
    );
    // Basic-auth secrets also travel base64-encoded (`key:X`, `user:password`): look for those
    // forms too.
    let encoded: Vec<String> = ["CANARY-fdkey-jjj000:X", "leak.basic:CANARY-snbasic-kkk111"]
        .iter()
        .map(|s| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(s)
        })
        .collect();
    for canary in canaries
        .iter()
        .copied()
        .chain(encoded.iter().map(String::as_str))
        .chain([admin_token.as_str(), created.token.as_str()])
        .chain(issued_tokens.iter().map(String::as_str))
    {
        assert!(!log.contains(canary), "secret found in the log");
        assert!(!audit.contains(canary), "secret found in the audit trail");
        for e in &errors {
            assert!(!e.contains(canary), "secret found in an error: {e}");
        }
        if canary != admin_token && canary != created.token {
            assert_eq!(
                dir_contains(dir.path(), canary),
                None,
                "secret found in a data file"
            );
        }
    }
    // The caller tokens are only in admin.token (the bootstrap admin), never in the store.
    assert_eq!(dir_contains(&dir.path().join("store"), &admin_token), None);
    assert_eq!(dir_contains(dir.path(), &created.token), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_broker_and_health_services_without_a_token() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let ch = Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"credbroker.v1.CredentialBroker".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_follows_an_rpc_into_its_upstream_calls_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("pat-reqid-canary-5", "9", "U", "u@example.com");
    // A webhook whose path is its secret (as Slack's are): its deliveries log the host only.
    let receiver = crate::health::Receiver::default();
    let hook_url = receiver
        .clone()
        .start("127.0.0.1:0")
        .await
        .replace("/hooks/credbroker", "/services/T0/B0/slack-path-canary-7");
    let secret_file = logs.path().join("webhook.secret");
    std::fs::write(&secret_file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let proc = spawn_process(
        dir.path(),
        &logs.path().join("1.log"),
        &[
            ("RUST_LOG", "info,credbroker=debug"),
            ("CREDBROKER_WEBHOOK_URL", &hook_url),
            (
                "CREDBROKER_WEBHOOK_SECRET_FILE",
                secret_file.to_str().unwrap(),
            ),
        ],
    )
    .unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;

    let mut req = tonic::Request::new(register_asana(
        "traced",
        &fake.base_url,
        "pat-reqid-canary-5",
        true,
    ));
    req.metadata_mut()
        .insert("x-request-id", "sync-run-42.7".parse().unwrap());
    let resp = admin.register_system(req).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-request-id").unwrap(),
        "sync-run-42.7"
    );
    assert!(resp.into_inner().check.unwrap().ok);

    // Without one (or with an unusable one) the broker makes one up and returns it.
    let mut req = tonic::Request::new(pb::GetSystemRequest {
        system_id: "nope".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "has spaces and {braces}".parse().unwrap());
    let e = admin.get_system(req).await.unwrap_err();
    let made_up = e
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(made_up.len(), 16, "{made_up}");

    // The registration's upstream call is logged inside the RPC's span with its request id. The
    // log is written by a reader thread: poll for it with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let upstream = loop {
        let log = proc.log();
        let found = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["message"] == "Upstream call." && v["span"]["request_id"] == "sync-run-42.7"
            });
        if let Some(v) = found {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no traced upstream call in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(upstream["span"]["rpc"], "RegisterSystem");
    assert_eq!(upstream["host"], "127.0.0.1");
    assert!(!proc.log().contains("pat-reqid-canary-5"));

    // Events go to the webhook (a new endpoint starts at the newest event once its task
    // runs, so one more system is registered now and then until one arrives); its upstream
    // call is logged, its path not.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut more = tokio::time::interval(Duration::from_millis(250));
    for n in 0.. {
        more.tick().await;
        let id = format!("hooked-{n}");
        let pat = "pat-reqid-canary-5";
        admin
            .register_system(register_asana(&id, &fake.base_url, pat, false))
            .await
            .unwrap();
        let log = proc.log();
        let delivered = receiver.count() >= 1
            && log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|v| v["message"] == "Upstream call." && v["method"] == "POST");
        if delivered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook delivery logged:\n{log}"
        );
    }
    assert!(
        !proc.log().contains("slack-path-canary-7"),
        "a webhook's secret path was logged"
    );
}
