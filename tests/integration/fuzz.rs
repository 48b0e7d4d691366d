//! Property tests ("fuzzing" on stable Rust): the sealed-record decoder, the stored-record decoder
//! and request validation never panic on arbitrary input; sealing round-trips and every
//! single-byte change is detected.

use credbroker::backends::egress::{AllowList, EgressPolicy};
use credbroker::backends::http::parse_base_url;
use credbroker::crypto::{parse_header, Keyring, MasterKey, RecordBinding};
use credbroker::model::{pattern_matches, CredentialType, SystemRecord};
use credbroker::pb;
use proptest::prelude::*;

/// Any text (regex: any character but a newline).
const TEXT: &str = ".{0,80}";
/// Printable text (regex: Unicode's non-control characters).
const PRINTABLE: &str = "\\PC{0,40}";

fn binding(id: &str) -> RecordBinding<'_> {
    RecordBinding {
        system_id: id,
        credential_type: CredentialType::ApiKey,
        version: 3,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sealed_record_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let kr = Keyring::new(MasterKey::generate());
        let _ = parse_header(&bytes);
        prop_assert!(kr.open(&binding("x"), &bytes).is_err());
        // A valid header prefix with garbage after it.
        let mut framed = b"CB\x01".to_vec();
        framed.extend_from_slice(&bytes);
        let _ = parse_header(&framed);
        prop_assert!(kr.open(&binding("x"), &framed).is_err());
    }

    #[test]
    fn seal_round_trips_and_every_byte_flip_fails(plain in proptest::collection::vec(any::<u8>(), 0..200), pick in any::<usize>(), bit in 0u8..8) {
        let kr = Keyring::new(MasterKey::generate());
        let sealed = kr.seal(&binding("sys"), &plain);
        let opened = kr.open(&binding("sys"), &sealed).unwrap();
        prop_assert_eq!(opened.as_slice(), plain.as_slice());
        let mut m = sealed.clone();
        let i = pick % m.len();
        m[i] ^= 1 << bit;
        prop_assert!(kr.open(&binding("sys"), &m).is_err());
        prop_assert!(kr.open(&binding("other"), &sealed).is_err());
    }

    #[test]
    fn stored_record_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = serde_json::from_slice::<SystemRecord>(&bytes);
    }

    #[test]
    fn request_validation_never_panics(a in TEXT, b in TEXT, c in PRINTABLE) {
        let policy = EgressPolicy { allow_http: true, ..Default::default() };
        let _ = parse_base_url(&a, &policy);
        let _ = parse_base_url(&format!("https://{b}"), &EgressPolicy::default());
        let _ = AllowList::parse(&a);
        let _ = pattern_matches(&b, &c);
        let _ = credbroker::broker::validate_slug(&a, 128);
        let _ = credbroker::cli::parse_time(&b);
        for cred in [
            pb::credential::Credential::PersonalAccessToken(pb::PersonalAccessToken { token: a.clone(), username: b.clone(), expires_at: None }),
            pb::credential::Credential::Basic(pb::BasicCredential { username: a.clone(), password: c.clone() }),
            pb::credential::Credential::SalesforceLogin(pb::SalesforceLogin { username: a.clone(), password: b.clone(), security_token: c.clone(), client_id: a.clone(), client_secret: b.clone() }),
            pb::credential::Credential::OauthRefreshToken(pb::OAuthRefreshToken { client_id: a.clone(), client_secret: b.clone(), refresh_token: c.clone(), username: a.clone() }),
        ] {
            let _ = credbroker::server::convert::credential(Some(pb::Credential { credential: Some(cred) }), "credential");
        }
        let _ = credbroker::server::convert::kind(a.len() as i32 - 40, "kind");
    }
}

/// Minimum versions of dependencies with known advisories (RUSTSEC-2023-0096, -2024-0376, the h2 reset and
/// CONTINUATION floods, RUSTSEC-2026-0285), checked offline against Cargo.lock.
#[test]
fn dependency_floors_hold() {
    let lock: toml::Value = toml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap(),
    )
    .unwrap();
    let floors = [
        ("aes-gcm", (0, 10, 3)),
        ("h2", (0, 4, 16)),
        ("tonic", (0, 12, 3)),
        ("rustls", (0, 23, 45)),
    ];
    for (name, floor) in floors {
        let versions: Vec<(u64, u64, u64)> = lock["package"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .map(|p| {
                let v: Vec<u64> = p["version"]
                    .as_str()
                    .unwrap()
                    .split('.')
                    .map(|x| x.split('-').next().unwrap().parse().unwrap())
                    .collect();
                (v[0], v[1], v[2])
            })
            .collect();
        assert!(!versions.is_empty(), "{name} not in Cargo.lock");
        for v in versions {
            assert!(v >= floor, "{name} {v:?} is below the floor {floor:?}");
        }
    }
}

/// The string strategies generate what their names say (a doubled backslash once made
/// `PRINTABLE` a literal backslash followed by `P` and `C`s): many distinct characters, beyond
/// ASCII, and for `PRINTABLE` no control characters.
#[test]
fn the_string_strategies_generate_what_they_say() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    for (name, pattern) in [("TEXT", TEXT), ("PRINTABLE", PRINTABLE)] {
        let strategy = proptest::string::string_regex(pattern).unwrap();
        let mut runner = TestRunner::deterministic();
        let samples: Vec<String> = (0..200)
            .map(|_| strategy.new_tree(&mut runner).unwrap().current())
            .collect();
        println!("{name} sample: {:?}", &samples[..3]);
        let distinct: std::collections::HashSet<char> =
            samples.iter().flat_map(|s| s.chars()).collect();
        assert!(
            distinct.len() > 100,
            "{name}: only {} distinct characters",
            distinct.len()
        );
        assert!(distinct.iter().any(|c| !c.is_ascii()), "{name}: ASCII only");
        if name == "PRINTABLE" {
            assert!(
                !distinct.iter().any(|c| c.is_control()),
                "{name}: control characters"
            );
        }
    }
}
