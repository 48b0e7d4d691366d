//! Soak: mixed load against the real binary for a while, sampling its RSS and data-directory
//! size, to show both stay flat. `cargo bench --bench soak -- --minutes 30 --sample-secs 60`
//! (`scripts/soak.sh`). Load: 16 workers calling `GetAccessToken` over 100 systems, and one admin
//! cycling register → rotate → rotate → delete on short-lived systems; audit trail on.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::*;
use credbroker::pb;

fn pat(v: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::PersonalAccessToken(
            pb::PersonalAccessToken {
                token: v.into(),
                ..Default::default()
            },
        )),
    }
}

fn register(id: &str, v: &str) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: pb::SystemKind::Asana as i32,
        base_url: "https://app.asana.com/api/1.0".into(),
        credential: Some(pat(v)),
        delivery: pb::Delivery::Header as i32,
        check: false,
        ..Default::default()
    }
}

fn main() {
    let minutes = arg("--minutes", "30.0").parse::<f64>().unwrap();
    let sample = Duration::from_secs_f64(arg("--sample-secs", "60.0").parse::<f64>().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "off",
                "--data-dir",
            ])
            .arg(&data)
            .env("CREDBROKER_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("CREDBROKER_AUDIT_FILE", dir.path().join("audit.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let v: serde_json::Value =
                serde_json::from_str(&lines.next().expect("broker exited").unwrap())
                    .unwrap_or_default();
            if v["message"] == "gRPC listening." {
                break v["addr"].as_str().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let pid = child.id();
        let token_path = data.join("admin.token");
        let mut admin = loop {
            if let Ok(t) = std::fs::read_to_string(&token_path) {
                if !t.trim().is_empty() {
                    break connect(&addr, t.trim()).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            match admin.register_system(register("s0", "pat-0")).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        for i in 1..100 {
            admin
                .register_system(register(&format!("s{i}"), &format!("pat-{i}")))
                .await
                .unwrap();
        }
        let worker = admin
            .create_caller(pb::CreateCallerRequest {
                name: "soak-worker".into(),
                role: pb::CallerRole::Worker as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let stop = Arc::new(AtomicBool::new(false));
        let (reads, writes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for w in 0..16u64 {
            let mut c = connect(&addr, &worker).await;
            let (stop, reads) = (stop.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    i = (i * 31 + 7) % 100;
                    let r = c
                        .get_access_token(pb::GetAccessTokenRequest {
                            system_id: format!("s{i}"),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.headers[0].value, format!("Bearer pat-{i}"));
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (stop, writes, mut c) = (stop.clone(), writes.clone(), admin.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("tmp-{}", n % 50);
                    c.register_system(register(&id, &format!("tmp-pat-{n}")))
                        .await
                        .unwrap();
                    for r in 0..2 {
                        c.rotate_credential(pb::RotateCredentialRequest {
                            system_id: id.clone(),
                            credential: Some(pat(&format!("tmp-pat-{n}-{r}"))),
                            skip_check: true,
                        })
                        .await
                        .unwrap();
                    }
                    c.delete_system(pb::DeleteSystemRequest { system_id: id })
                        .await
                        .unwrap();
                    writes.fetch_add(4, Ordering::Relaxed);
                    n += 1;
                }
            }));
        }
        println!("| minute | RSS | data dir | GetAccessToken/s | writes/s |");
        println!("|---|---|---|---|---|");
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(minutes * 60.0);
        let (mut last_r, mut last_w, mut last_t) = (0, 0, Instant::now());
        let mut samples = Vec::new();
        while Instant::now() < end {
            tokio::time::sleep(sample.min(end - Instant::now())).await;
            let (r, w) = (
                reads.load(Ordering::Relaxed),
                writes.load(Ordering::Relaxed),
            );
            let dt = last_t.elapsed().as_secs_f64();
            let (rss, disk) = (status_kib(pid, "VmRSS"), dir_bytes(&data));
            println!(
                "| {:.1} | {:.1} MiB | {:.1} MiB | {:.0} | {:.0} |",
                started.elapsed().as_secs_f64() / 60.0,
                rss as f64 / 1024.0,
                disk as f64 / 1048576.0,
                (r - last_r) as f64 / dt,
                (w - last_w) as f64 / dt
            );
            samples.push(
                serde_json::json!({"minute": started.elapsed().as_secs_f64() / 60.0,
                "rss_kib": rss, "data_dir_bytes": disk}),
            );
            (last_r, last_w, last_t) = (r, w, Instant::now());
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        save(
            "soak.json",
            serde_json::to_string_pretty(&serde_json::json!({
                "minutes": minutes, "get_access_token": reads.load(Ordering::Relaxed),
                "writes": writes.load(Ordering::Relaxed), "samples": samples,
            }))
            .unwrap(),
        )
        .unwrap();
        let _ = child.kill();
        let _ = child.wait();
    });
}
