//! `credbroker rekey`: the master key file replaced with the broker stopped. The real binary
//! copies a store into a new data directory under a new key; the brokers before and after are
//! real servers on those directories.

use std::path::Path;
use std::process::{Command, Output};

use credbroker::pb;

use crate::support::*;

const PAT_HEADER: &str = "rekey-pat-header-8d1c";
const PAT_PROXY: &str = "rekey-pat-proxy-42ae";
/// What the header system's credential is rotated to (its version 2).
const PAT_ROTATED: &str = "rekey-pat-rotated-e07b";

/// `credbroker rekey` on `from` with `args`, in an environment of the test's own.
fn rekey_command(from: &Path, args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_credbroker"));
    cmd.arg("rekey")
        .arg("--data-dir")
        .arg(from)
        .args(args)
        .env_remove("CREDBROKER_MASTER_KEY_FILE")
        .env_remove("CREDBROKER_CONFIG")
        .env_remove("CREDBROKER_STORE_URL");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `credbroker rekey` on `from` with `args` (off the runtime: the broker under test may be
/// serving on it).
async fn rekey(from: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = rekey_command(from, args, envs);
    // Bounded: a rekey that blocks fails the test instead of holding it.
    let run = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .expect("the rekey did not end within 60 s")
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fake Asana that knows every PAT these tests use.
async fn asana() -> FakeAsana {
    let asana = FakeAsana::start().await;
    for pat in [PAT_HEADER, PAT_PROXY, PAT_ROTATED] {
        asana.add_user(pat, "1", "Sync", "sync@example.com");
    }
    asana
}

/// A store with a header-delivered system (its credential rotated once) and a proxy-delivered
/// one, sealed under two key-encryption keys (one registered before a key rotation, one after),
/// a worker and a revoked caller, stopped; the worker's and the revoked caller's tokens.
async fn filled(dir: &Path, asana: &FakeAsana) -> (String, String) {
    let broker = TestBroker::start(dir).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana("hdr", &asana.base_url, PAT_HEADER, true))
        .await
        .unwrap();
    admin
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap();
    admin
        .register_system(pb::RegisterSystemRequest {
            delivery: pb::Delivery::Proxy as i32,
            ..register_asana("prx", &asana.base_url, PAT_PROXY, true)
        })
        .await
        .unwrap();
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "hdr".into(),
            credential: Some(pat(PAT_ROTATED)),
            skip_check: false,
        })
        .await
        .unwrap();
    let worker = worker_token(&mut admin, "sync-worker").await;
    let gone = worker_token(&mut admin, "gone").await;
    admin
        .revoke_caller(pb::RevokeCallerRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();
    broker.stop().await;
    (worker, gone)
}

/// What a worker gets through the broker at `addr`: the header system's header, and the answer
/// of a GET proxied with the other system's lease.
async fn worker_view(addr: std::net::SocketAddr, worker: &str) -> (String, reqwest::StatusCode) {
    let mut c = client(addr, Some(worker)).await;
    let header = auth_header(&mut c, "hdr").await.unwrap();
    let lease = c
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "prx".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut get = reqwest::Client::new().get(format!("{}/users/me", lease.api_base_url));
    for h in &lease.headers {
        get = get.header(&h.name, &h.value);
    }
    (header, get.send().await.unwrap().status())
}

/// A start on `config` that must be refused; bounded, so a start that serves fails the test
/// instead of holding it.
async fn refused_start(
    config: credbroker::config::Config,
) -> Result<(), credbroker::server::ServeError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = credbroker::server::run(listener, config, std::future::pending());
    tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("the broker started")
}

#[tokio::test]
async fn a_replaced_master_key_serves_every_system_and_caller_and_the_old_one_opens_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (old, new) = (root.path().join("old"), root.path().join("new"));
    let asana = asana().await;
    let (worker, gone) = filled(&old, &asana).await;
    let admin_token = std::fs::read_to_string(old.join("admin.token")).unwrap();
    // A rotated trail file, and a file of the operator's that is not the broker's.
    std::fs::write(old.join("audit.log.1"), "{\"rotated\":true}\n").unwrap();
    // A snapshot taken with `cp -al` before the rekey: the trail has two links, both its own.
    let snapshot = root.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    std::fs::hard_link(old.join("audit.log.1"), snapshot.join("audit.log.1")).unwrap();
    std::fs::write(old.join("extra.toml"), "x = 1\n").unwrap();

    // Named through the old directory's parent (`old/../new`): beside it, not in it.
    // The key file is named the same way, inside the target that is not made yet.
    let beside = old.join("..").join("new");
    let key_inside = beside.join("master.key");
    let to = [
        "--to-data-dir",
        beside.to_str().unwrap(),
        "--new-master-key-file",
        key_inside.to_str().unwrap(),
    ];
    let out = rekey(&old, &to, &[("RUST_LOG", "trace")]).await;
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("Copied 2 systems and 3 callers"), "{said}");
    // The new directory is named by its real path (the old one will go, and `old/..` with it).
    let real_new = std::fs::canonicalize(&new).unwrap();
    assert!(
        said.contains(&format!("into {} under", real_new.display())),
        "{said}"
    );
    let generated = format!("(generated: {})", real_new.join("master.key").display());
    assert!(said.contains(&generated), "{said}");
    assert!(!said.contains("/../"), "{said}");
    assert!(
        said.contains("(move what the broker needs): extra.toml."),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(new.join("audit.log.1")).unwrap(),
        "{\"rotated\":true}\n"
    );
    // The admin token is where it was (its own file), and nowhere else.
    let secrets = [
        PAT_HEADER,
        PAT_PROXY,
        PAT_ROTATED,
        &worker,
        &gone,
        admin_token.trim(),
    ];
    for secret in secrets {
        assert!(!said.contains(secret), "the rekey's output shows a secret");
        for file in files_under(&new) {
            let bytes = std::fs::read(&file).unwrap();
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            let own = file.ends_with("admin.token") && secret == admin_token.trim();
            assert!(!found || own, "a secret in clear in {}", file.display());
        }
    }
    assert!(!root.path().join("new.rekeying").exists());
    let old_key = std::fs::read_to_string(old.join("master.key")).unwrap();
    let new_key = std::fs::read_to_string(new.join("master.key")).unwrap();
    assert_ne!(old_key, new_key);
    for (file, mode) in [
        ("", 0o700),
        ("master.key", 0o600),
        ("admin.token", 0o600),
        ("audit.log", 0o600),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let found = std::fs::metadata(new.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(found & 0o777, mode, "{file}");
    }

    // The new directory serves what the old one held, to the same worker and admin tokens.
    let broker = TestBroker::start(&new).await;
    assert_eq!(
        worker_view(broker.addr, &worker).await,
        (format!("Bearer {PAT_ROTATED}"), reqwest::StatusCode::OK)
    );
    let mut revoked = client(broker.addr, Some(&gone)).await;
    let refused = auth_header(&mut revoked, "hdr").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut admin = broker.admin().await;
    let listed = admin
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<_> = listed
        .systems
        .iter()
        .map(|s| (s.system_id.as_str(), s.credential_version))
        .collect();
    assert_eq!(versions, [("hdr", 2), ("prx", 1)]);
    let status = admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap();
    assert_eq!(status.into_inner().keys.len(), 1, "only the new root key");
    broker.stop().await;

    // The old key opens nothing in the new directory; the old directory is as it was.
    let mut config = test_config(&new);
    config.store.master_key_file = Some(old.join("master.key"));
    let refused = refused_start(config).await;
    assert!(
        matches!(
            refused,
            Err(credbroker::server::ServeError::Broker(
                credbroker::broker::OpenError::WrongKey
            ))
        ),
        "the old key opened the new store: {refused:?}"
    );

    // Both trails end with the replacement; the new one holds the old one's lines before it.
    let (old_trail, new_trail) = (
        std::fs::read_to_string(old.join("audit.log")).unwrap(),
        std::fs::read_to_string(new.join("audit.log")).unwrap(),
    );
    let line = old_trail
        .lines()
        .find(|l| l.contains("\"rpc\":\"ReplaceMasterKey\""))
        .expect("the old trail names the replacement");
    assert!(new_trail.contains(line), "{new_trail}");
    assert!(
        new_trail.contains("\"rpc\":\"RevokeCaller\""),
        "{new_trail}"
    );

    // The old directory will not serve by mistake (its refreshes would be lost to the new
    // one); once its marker is removed, it serves as it did.
    let superseded = refused_start(test_config(&old)).await;
    let Err(credbroker::server::ServeError::Superseded { to, .. }) = superseded else {
        panic!("the old directory started: {superseded:?}");
    };
    assert_eq!(Path::new(&to), std::fs::canonicalize(&new).unwrap());
    std::fs::remove_file(old.join(credbroker::server::rekey::SUPERSEDED_FILE)).unwrap();
    let broker = TestBroker::start(&old).await;
    assert_eq!(
        worker_view(broker.addr, &worker).await,
        (format!("Bearer {PAT_ROTATED}"), reqwest::StatusCode::OK)
    );
    broker.stop().await;
}

/// `to`'s arguments with a `--new-master-key-file`.
fn with_key_file<'a>(to: &[&'a str], key: &'a Path) -> Vec<&'a str> {
    let mut args = to.to_vec();
    args.extend(["--new-master-key-file", key.to_str().unwrap()]);
    args
}

/// A rekey that must be refused: why, on which directory, with what, and the exit code and
/// words expected.
struct Refusal<'a> {
    why: &'a str,
    from: &'a Path,
    args: &'a [&'a str],
    envs: &'a [(&'a str, &'a str)],
    code: i32,
    says: &'a str,
}

impl<'a> Refusal<'a> {
    fn new(why: &'a str, from: &'a Path, args: &'a [&'a str], code: i32, says: &'a str) -> Self {
        Self {
            why,
            from,
            args,
            envs: &[],
            code,
            says,
        }
    }

    fn env(self, envs: &'a [(&'a str, &'a str)]) -> Self {
        Self { envs, ..self }
    }
}

#[tokio::test]
async fn a_rekey_that_cannot_be_done_changes_nothing_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let (old, new) = (root.path().join("old"), root.path().join("new"));
    let staging = root.path().join("new.rekeying");
    let asana = asana().await;
    let (worker, _) = filled(&old, &asana).await;
    let to = ["--to-data-dir", new.to_str().unwrap()];
    let old_key = old.join("master.key");
    let inside = old.join("new");
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let other_key = root.path().join("other.key");
    std::fs::write(
        &other_key,
        format!("{}\n", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="),
    )
    .unwrap();
    // The key in use, copied out of the old directory.
    let same_key = root.path().join("same.key");
    std::fs::copy(&old_key, &same_key).unwrap();
    let other = [("CREDBROKER_MASTER_KEY_FILE", other_key.to_str().unwrap())];
    let pg = [("CREDBROKER_STORE_URL", "postgres://127.0.0.1:9/none")];
    let inside_flag = ["--to-data-dir", inside.to_str().unwrap()];
    let with_key = with_key_file(&to, &same_key);
    let open_key = root.path().join("open.key");
    std::fs::write(&open_key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(&open_key, readable).unwrap();
    }
    let open_flag = with_key_file(&to, &open_key);
    let file = root.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let file_flag = ["--to-data-dir", file.to_str().unwrap()];
    let old_dir_key = old.join("new.key");
    // The old directory under another name: a key put there through it is still in it.
    let alias = root.path().join("alias");
    std::os::unix::fs::symlink(&old, &alias).unwrap();
    let alias_key = alias.join("other-new.key");
    let alias_key_flag = with_key_file(&to, &alias_key);
    let old_dir_key_flag = with_key_file(&to, &old_dir_key);
    let cases = [
        Refusal::new(
            "the old key is not the store's",
            &old,
            &to,
            78,
            "does not match",
        )
        .env(&other),
        Refusal::new(
            "the new key is the one in use",
            &old,
            &with_key,
            64,
            "key in use",
        ),
        Refusal::new(
            "no store where asked for",
            &empty,
            &to,
            64,
            "holds no store",
        ),
        Refusal::new(
            "a target in the old directory",
            &old,
            &inside_flag,
            64,
            "lies inside",
        ),
        Refusal::new("a PostgreSQL store", &old, &to, 64, "PostgreSQL").env(&pg),
        Refusal::new(
            "a new key others may read",
            &old,
            &open_flag,
            64,
            "writable by its owner only",
        ),
        Refusal::new(
            "a target that is a file",
            &old,
            &file_flag,
            64,
            "not a directory",
        ),
        Refusal::new(
            "a new key in the old directory",
            &old,
            &old_dir_key_flag,
            64,
            "lies in the old data directory",
        ),
        Refusal::new(
            "a new key in the old directory by another name",
            &old,
            &alias_key_flag,
            64,
            "lies in the old data directory",
        ),
    ];
    for case in cases {
        let why = case.why;
        let out = rekey(case.from, case.args, case.envs).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(case.code), "{why}: {said}");
        assert!(
            said.contains(case.says) && said.contains("nothing was changed"),
            "{why}: {said}"
        );
        assert!(
            !new.exists()
                && !staging.exists()
                && !inside.exists()
                && !old_dir_key.exists()
                && !old.join("other-new.key").exists(),
            "{why}: left a directory or a key"
        );
    }

    // Settings before the command would name another store: refused.
    let mut before = Command::new(env!("CARGO_BIN_EXE_credbroker"));
    before.arg("--data-dir").arg(&old).arg("rekey").args(to);
    let out = tokio::task::spawn_blocking(move || before.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(!new.exists() && !staging.exists());

    // A trail file planted as a link (a root run must not copy what it points at): nothing.
    let planted = old.join("audit.log.2");
    std::os::unix::fs::symlink("/etc/passwd", &planted).unwrap();
    let out = rekey(&old, &to, &[]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("not a regular file"), "{}", text(&out));
    assert!(!new.exists() && !staging.exists());
    assert!(!old
        .join(credbroker::server::rekey::SUPERSEDED_FILE)
        .exists());
    std::fs::remove_file(&planted).unwrap();

    // …nor another user's file hard-linked in. Making one needs root (chown), as CI runs; run
    // as another user, this part cannot be set up. A hard link of the owner's own (a `cp -al`
    // snapshot) is copied: see the first test.
    let elsewhere = root.path().join("elsewhere.log");
    std::fs::write(&elsewhere, "not the broker's\n").unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&elsewhere, Some(65534), Some(65534)).unwrap();
        std::fs::hard_link(&elsewhere, &planted).unwrap();
        let out = rekey(&old, &to, &[]).await;
        assert_eq!(out.status.code(), Some(64), "{}", text(&out));
        assert!(text(&out).contains("other hard links"), "{}", text(&out));
        assert!(!new.exists() && !staging.exists());
        std::fs::remove_file(&planted).unwrap();
    }

    // A new key file that is a link leading into the old directory.
    let hidden = old.join("hidden.key");
    std::fs::write(&hidden, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n").unwrap();
    let linked = root.path().join("linked.key");
    std::os::unix::fs::symlink(&hidden, &linked).unwrap();
    let args = with_key_file(&to, &linked);
    let out = rekey(&old, &args, &[]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("leads into the old data directory"),
        "{}",
        text(&out)
    );
    std::fs::remove_file(&hidden).unwrap();

    // A target that holds anything, and a staging directory an interrupted run left.
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("keep"), "x").unwrap();
    let out = rekey(&old, &to, &[]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("is not empty"));
    assert_eq!(std::fs::read_to_string(new.join("keep")).unwrap(), "x");
    std::fs::remove_dir_all(&new).unwrap();
    std::fs::create_dir(&staging).unwrap();
    let out = rekey(&old, &to, &[]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("stopped part-way"), "{}", text(&out));
    std::fs::remove_dir(&staging).unwrap();

    // A directory copied before is not copied again (a marker says where to), and a marker the
    // broker cannot read as a file still stops it.
    let marker = old.join(credbroker::server::rekey::SUPERSEDED_FILE);
    std::fs::write(&marker, "/elsewhere\n").unwrap();
    let out = rekey(&old, &to, &[]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("was copied under a new master key into /elsewhere"),
        "{said}"
    );
    assert!(
        said.contains("only to go back to the old key on purpose"),
        "{said}"
    );
    // One that stopped part-way (its staging directory is there) says so, and how to recover.
    let ghost = root.path().join("ghost");
    std::fs::write(&marker, format!("{}\n", ghost.display())).unwrap();
    std::fs::create_dir(root.path().join("ghost.rekeying")).unwrap();
    let refused = refused_start(test_config(&old))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("stopped part-way"), "{refused}");
    assert!(refused.contains("ghost.rekeying"), "{refused}");
    std::fs::remove_file(&marker).unwrap();
    std::fs::create_dir(&marker).unwrap();
    let refused = refused_start(test_config(&old)).await;
    assert!(
        matches!(
            refused,
            Err(credbroker::server::ServeError::Superseded { .. })
        ),
        "{refused:?}"
    );
    std::fs::remove_dir(&marker).unwrap();

    // The directory's lock, which a broker holds for its whole life (sled's own lock goes while
    // it reopens a failed store), stops a rekey even with the store itself closed.
    let held = credbroker::store::sled::DirLock::take(&old).unwrap();
    let out = rekey(&old, &to, &[]).await;
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("in use"), "{}", text(&out));
    assert!(!new.exists() && !staging.exists());
    drop(held);

    // A running broker holds its store: no copy that its refreshes could overtake, and no new
    // key file made for it.
    let broker = TestBroker::start(&old).await;
    let new_key = root.path().join("new.key");
    let args = with_key_file(&to, &new_key);
    let out = rekey(&old, &args, &[]).await;
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(!new.exists() && !staging.exists() && !new_key.exists());
    assert_eq!(
        worker_view(broker.addr, &worker).await.0,
        format!("Bearer {PAT_ROTATED}")
    );
    broker.stop().await;
}

/// A record the broker refuses (edited without the master key), a system or a caller, would be
/// left behind by a copy: the rekey fails instead, and leaves no new directory.
#[tokio::test]
async fn a_store_holding_a_refused_record_is_not_rekeyed() {
    use credbroker::store::CredentialStore;
    let asana = asana().await;
    for (edited, says) in [
        ("system", "copied 1 of 2 systems and 3 of 3 callers"),
        ("caller", "copied 2 of 2 systems and 2 of 3 callers"),
    ] {
        let root = tempfile::tempdir().unwrap();
        let (old, new) = (root.path().join("old"), root.path().join("new"));
        filled(&old, &asana).await;
        {
            let store = crate::store_conformance::open_sled(&old).await;
            if edited == "system" {
                let mut r = store.get_system("prx").await.unwrap().unwrap();
                r.base_url = "http://127.0.0.1:9/api/1.0".into();
                let rev = r.revision;
                store.update_system(&r, rev).await.unwrap();
            } else {
                let callers = store.list_callers().await.unwrap();
                let mut gone = callers.into_iter().find(|c| c.name == "gone").unwrap();
                gone.revoked = false;
                store.update_caller(&gone).await.unwrap();
            }
            store.flush().await.unwrap();
        }
        let out = rekey(&old, &["--to-data-dir", new.to_str().unwrap()], &[]).await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{edited}: {said}");
        assert!(said.contains(says), "{edited}: {said}");
        assert!(!new.exists() && !root.path().join("new.rekeying").exists());
        assert!(!old
            .join(credbroker::server::rekey::SUPERSEDED_FILE)
            .exists());
    }
}

/// How a rekey stopped at some moment left the old directory and the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Left {
    /// No marker: the old directory is as it was (a staging directory may be left).
    Untouched,
    /// Marked, with the copy still under its staging name.
    Marked,
    /// Marked and renamed into place: the rekey was done.
    Done,
}

/// The old directory's marker and the new directory's two names, after a stop.
fn left_by_stop(old: &Path, new: &Path) -> Left {
    let marked = old
        .join(credbroker::server::rekey::SUPERSEDED_FILE)
        .exists();
    let staged = Path::new(&format!("{}.rekeying", new.display())).exists();
    match (marked, new.exists(), staged) {
        (false, false, _) => Left::Untouched,
        (true, false, true) => Left::Marked,
        (true, true, false) => Left::Done,
        other => panic!("marker, target, staging: {other:?}: a state no recovery covers"),
    }
}

/// The worker's view through a broker on `dir` (the rotated PAT, a proxied GET, the last of
/// the systems added for bulk).
async fn serves(dir: &Path, worker: &str) {
    let broker = TestBroker::start(dir).await;
    assert_eq!(
        worker_view(broker.addr, worker).await,
        (format!("Bearer {PAT_ROTATED}"), reqwest::StatusCode::OK)
    );
    let mut c = client(broker.addr, Some(worker)).await;
    assert_eq!(
        auth_header(&mut c, &format!("bulk-{}", BULK - 1))
            .await
            .unwrap(),
        format!("Bearer {PAT_HEADER}")
    );
    broker.stop().await;
}

/// Systems added to the store so that a copy takes long enough to be stopped inside it.
const BULK: usize = 150;

/// The two directories of a rekey test, and the worker whose view is checked.
struct Dirs<'a> {
    old: &'a Path,
    new: &'a Path,
    worker: &'a str,
}

impl Dirs<'_> {
    /// Checks what a stop left the way an operator would meet it, then recovers as the docs
    /// and messages say, back to the old directory alone.
    async fn check_and_recover(&self, left: Left) {
        let (old, new) = (self.old, self.new);
        let marker = old.join(credbroker::server::rekey::SUPERSEDED_FILE);
        let staging = format!("{}.rekeying", new.display());
        match left {
            Left::Untouched => {
                serves(old, self.worker).await;
                // "An earlier rekey stopped part-way; remove it and run again."
                if Path::new(&staging).exists() {
                    std::fs::remove_dir_all(&staging).unwrap();
                }
            }
            Left::Marked => {
                let refused = refused_start(test_config(old)).await;
                let Err(credbroker::server::ServeError::Superseded { to, .. }) = refused else {
                    panic!("a directory marked mid-copy started: {refused:?}");
                };
                // The marker is whole: it names the new directory.
                let real = std::fs::canonicalize(new.parent().unwrap()).unwrap();
                assert_eq!(Path::new(&to), real.join("new"));
                let advice = credbroker::server::rekey::superseded_advice(old, &to);
                assert!(advice.contains("stopped part-way"), "{advice}");
                std::fs::remove_dir_all(&staging).unwrap();
                std::fs::remove_file(&marker).unwrap();
                serves(old, self.worker).await;
            }
            Left::Done => {
                serves(new, self.worker).await;
                assert!(refused_start(test_config(old)).await.is_err());
                std::fs::remove_file(&marker).unwrap();
                std::fs::remove_dir_all(new).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_rekey_stopped_at_any_step_or_moment_leaves_a_directory_that_serves_and_a_way_on() {
    let root = tempfile::tempdir().unwrap();
    let (old, new) = (root.path().join("old"), root.path().join("new"));
    let partial = old.join("superseded-by.partial");
    let asana = asana().await;
    let (worker, _) = filled(&old, &asana).await;
    let broker = TestBroker::start(&old).await;
    let mut admin = broker.admin().await;
    for i in 0..BULK {
        let id = format!("bulk-{i}");
        let req = register_asana(&id, &asana.base_url, PAT_HEADER, false);
        admin.register_system(req).await.unwrap();
    }
    broker.stop().await;
    let dirs = Dirs {
        old: &old,
        new: &new,
        worker: &worker,
    };
    let to = ["--to-data-dir", new.to_str().unwrap()];
    // Stopped at each step of the commit (test builds end the process there, no clean-up
    // run): what each leaves, exactly. A partial marker left is the next run's to clear.
    let steps = [
        ("staged", Left::Untouched, false),
        ("partial", Left::Untouched, true),
        ("linked", Left::Marked, true),
        ("marked", Left::Marked, false),
        ("renamed", Left::Done, false),
    ];
    for (step, expected, partial_left) in steps {
        let out = rekey(&old, &to, &[("CREDBROKER_TEST_REKEY_STOP_AT", step)]).await;
        assert_eq!(out.status.code(), Some(137), "{step}: {}", text(&out));
        assert_eq!(left_by_stop(&old, &new), expected, "stopped at {step}");
        assert_eq!(partial.exists(), partial_left, "stopped at {step}");
        dirs.check_and_recover(expected).await;
    }
    // How long a whole copy takes here; then back to the old key, as the docs say.
    let started = std::time::Instant::now();
    let out = rekey(&old, &to, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let whole = started.elapsed();
    assert!(!partial.exists());
    dirs.check_and_recover(Left::Done).await;
    // Killed (SIGKILL) at moments spread over a whole copy's time.
    let mut seen = std::collections::HashSet::new();
    for percent in (1..=20).map(|k| k * 5) {
        let mut child = rekey_command(&old, &to, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Not a wait for readiness: the moment of the kill.
        tokio::time::sleep(whole * percent / 100).await;
        if let Some(ended) = child.try_wait().unwrap() {
            assert!(ended.success(), "a rekey ended on its own, failed: {ended}");
        }
        let _ = child.kill();
        child.wait().unwrap();
        let left = left_by_stop(&old, &new);
        seen.insert(left);
        dirs.check_and_recover(left).await;
    }
    eprintln!("a whole copy: {whole:?}; the kills left {seen:?}");
    // After every recovery, a rekey runs to the end.
    let out = rekey(&old, &to, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    serves(&new, &worker).await;
}
