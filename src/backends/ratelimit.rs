//! What a vendor's answer says about its quota: each vendor's own headers (`upstreams.md` §17),
//! read into one [`RateSignals`] shape the proxy's quota book learns from.
//!
//! - Salesforce: `Sforce-Limit-Info: api-usage=used/limit` (the org's 24-hour allocation); past
//!   it, **403** `REQUEST_LIMIT_EXCEEDED` with no `Retry-After`.
//! - Zendesk: `X-Rate-Limit` / `X-Rate-Limit-Remaining`, or `ratelimit-limit/-remaining/-reset`
//!   (seconds from now); 429 with `Retry-After`.
//! - Jira Cloud: `X-RateLimit-Limit/-Remaining`, `X-RateLimit-Reset` (ISO-8601); 429 or 503 with
//!   `Retry-After`. A 429 whose `RateLimit-Reason` is only `jira-per-issue-on-write` (one issue)
//!   or `jira-burst-based` (one endpoint and method) refuses less than the system: it is passed
//!   on to the worker and holds nobody else back.
//! - Azure DevOps: `X-RateLimit-Limit/-Remaining`, `X-RateLimit-Reset` (Unix time), and
//!   `Retry-After` even on a 200.
//! - ServiceNow: `X-RateLimit-Limit` (per hour) and `X-RateLimit-Reset` (Unix time) but no
//!   remaining count: the book counts calls itself.
//! - Freshdesk, Freshservice: `X-Ratelimit-Total` / `X-Ratelimit-Remaining`; 429 `Retry-After`.
//! - Asana: `Retry-After` on 429 only.
//!
//! Values are clamped: a hostile or broken vendor can make the broker wait at most
//! [`MAX_WAIT`], never overflow it.

use std::time::Duration;

use axum::http::HeaderMap;

use crate::model::SystemKind;

/// The longest wait any vendor signal can impose.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// The furthest a quota window's reset is believed to be.
const MAX_RESET_AHEAD: u64 = 86_400;
/// The shortest pause a 429 imposes.
const MIN_REFUSAL_WAIT: Duration = Duration::from_secs(1);
/// How long an over-quota answer without a wait (Salesforce's 403) holds a system back.
pub const NO_WAIT_GIVEN: Duration = Duration::from_secs(60);

/// What one answer said about the system's quota.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateSignals {
    /// Calls left in the current window.
    pub remaining: Option<i64>,
    /// The window's size.
    pub limit: Option<i64>,
    /// When the window resets (Unix seconds).
    pub reset_at: Option<u64>,
    /// The vendor asked for no call before this long has passed.
    pub wait: Option<Duration>,
    /// The vendor refused the call for quota (429, or Salesforce's over-quota 403).
    pub throttled: bool,
    /// The vendor reports a limit but no remaining count: count calls locally.
    pub count_locally: bool,
    /// The vendor served the call (2xx or 3xx): an answer that would carry its count, if the
    /// vendor sends one.
    pub served: bool,
}

/// Reads `kind`'s signals from an answer (`body` when the answer was small enough to hold).
pub fn read(
    kind: SystemKind,
    status: u16,
    headers: &HeaderMap,
    body: Option<&[u8]>,
    now: u64,
) -> RateSignals {
    let mut s = RateSignals::default();
    if status == 429 && kind == SystemKind::JiraCloud && narrow_reason(headers) {
        // Less than the system refused (one issue's writes, one endpoint): counted as a
        // refusal, with no pause for the system, and that narrower limit's counts not taken
        // for the tenant's.
        s.throttled = true;
        return s;
    }
    match kind {
        SystemKind::Salesforce => salesforce(&mut s, status, headers, body),
        SystemKind::Zendesk => zendesk(&mut s, headers, now),
        SystemKind::JiraCloud => {
            s.limit = int(headers, "x-ratelimit-limit");
            s.remaining = int(headers, "x-ratelimit-remaining");
            s.reset_at = text(headers, "x-ratelimit-reset").and_then(iso8601);
        }
        SystemKind::AzureDevOps => {
            s.limit = int(headers, "x-ratelimit-limit");
            s.remaining = int(headers, "x-ratelimit-remaining");
            s.reset_at = epoch(headers, "x-ratelimit-reset");
            // Azure DevOps may ask for a pause on a successful answer.
            s.wait = retry_after(headers, now);
        }
        SystemKind::ServiceNow => {
            s.limit = int(headers, "x-ratelimit-limit");
            s.reset_at = epoch(headers, "x-ratelimit-reset");
        }
        SystemKind::Freshdesk | SystemKind::Freshservice => {
            s.limit = int(headers, "x-ratelimit-total");
            s.remaining = int(headers, "x-ratelimit-remaining");
        }
        SystemKind::Asana => {}
    }
    // A reset further away than any vendor's window (a day) is garbage: judged before any
    // wait is taken from it.
    s.reset_at = s.reset_at.filter(|r| *r <= now + MAX_RESET_AHEAD);
    if status == 429 {
        // A refusal pauses at least a second, however it is dated (a reset already past, a
        // `Retry-After: 0`): else workers would call straight back into it.
        s.throttled = true;
        s.wait = Some(
            retry_after(headers, now)
                .or_else(|| s.reset_at.map(|at| secs(at.saturating_sub(now))))
                .unwrap_or_default()
                .max(MIN_REFUSAL_WAIT),
        );
    } else if status == 503 {
        // A pause only when asked for (`Retry-After`): Jira's throttling 503 carries one; a
        // 503 without it is an outage, not a quota's reset.
        let asked = retry_after(headers, now);
        s.throttled = kind == SystemKind::JiraCloud && asked.is_some();
        s.wait = s.wait.or(asked);
    }
    s.wait = s.wait.map(|w| w.min(MAX_WAIT));
    // Counted locally only within a dated window (a count that never resets would lock out).
    s.count_locally = kind == SystemKind::ServiceNow && s.limit.is_some() && s.reset_at.is_some();
    if s.throttled && s.wait.is_some() {
        // "0 left" on a refusal lasts as long as the pause it comes with; the block covers it,
        // and the first answer after it brings the new count.
        s.remaining = None;
    }
    s.served = (200..400).contains(&status);
    s
}

/// True when `kind`'s answer with `status` may carry a quota signal in its body (Salesforce's
/// over-quota 403).
pub fn needs_body(kind: SystemKind, status: u16) -> bool {
    kind == SystemKind::Salesforce && status == 403
}

fn salesforce(s: &mut RateSignals, status: u16, headers: &HeaderMap, body: Option<&[u8]>) {
    let count = |v: &str| v.trim().parse::<i64>().ok().filter(|n| *n >= 0);
    if let Some((used, limit)) = text(headers, "sforce-limit-info").and_then(|v| {
        v.split(';')
            .find_map(|part| part.trim().strip_prefix("api-usage="))
            .and_then(|u| u.split_once('/'))
            .and_then(|(used, limit)| Some((count(used)?, count(limit)?)))
    }) {
        s.limit = Some(limit);
        s.remaining = Some(limit.saturating_sub(used).max(0));
    }
    // The error's own code, not any text in the body (which may echo the org's data), as
    // sent: Salesforce compresses it when the worker asked for that.
    let body = body
        .filter(|_| status == 403)
        .and_then(|b| decoded(headers, b));
    let error = body
        .and_then(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b).ok())
        .and_then(|errors| errors.into_iter().next())
        .filter(|e| e["errorCode"] == "REQUEST_LIMIT_EXCEEDED");
    if let Some(error) = error {
        s.throttled = true;
        // A concurrency refusal carries the same code: only a short pause for it.
        let concurrent = error["message"]
            .as_str()
            .is_some_and(|m| m.contains("Concurrent"));
        s.wait = Some(if concurrent {
            Duration::from_secs(1)
        } else {
            NO_WAIT_GIVEN
        });
    }
}

/// The most of a compressed body that is decoded to read its signal (a bomb is cut here).
const MAX_DECODED: u64 = 64 * 1024;

/// `body` decoded as its `Content-Encoding` says (none, gzip or deflate: what Salesforce
/// sends), at most [`MAX_DECODED`] bytes of it; `None` for another encoding or a broken one.
fn decoded<'a>(headers: &HeaderMap, body: &'a [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
    use std::io::Read;
    let encoding = text(headers, "content-encoding")
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut out = Vec::new();
    let read = match encoding.as_str() {
        "" | "identity" => return Some(std::borrow::Cow::Borrowed(body)),
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(body)
            .take(MAX_DECODED)
            .read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(body)
            .take(MAX_DECODED)
            .read_to_end(&mut out),
        _ => return None,
    };
    read.ok().map(|_| std::borrow::Cow::Owned(out))
}

/// Jira's reasons for a refusal whose scope is one issue or one endpoint, not the tenant's
/// budget (developer.atlassian.com, "Build an app that respects rate limits").
const NARROW_REASONS: [&str; 2] = ["jira-per-issue-on-write", "jira-burst-based"];

/// True when `RateLimit-Reason` names only narrow reasons (a list naming a tenant-wide one, or
/// no reason at all, refuses the system).
fn narrow_reason(headers: &HeaderMap) -> bool {
    // Jira's pre-enforcement header (seen naming the tenant's quota) beside a narrow reason:
    // taken as tenant-wide, whatever it names.
    if headers.contains_key("x-beta-ratelimit-reason") {
        return false;
    }
    // Every field line: `a` and `b` on two lines are the list `a, b` (RFC 9110 §5.3); a line
    // that is not text names no narrow reason.
    let lines = headers.get_all("ratelimit-reason").iter();
    let Some(lines) = lines.map(|v| v.to_str().ok()).collect::<Option<Vec<_>>>() else {
        return false;
    };
    let named: Vec<&str> = lines
        .into_iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect();
    let narrow = |r: &&str| NARROW_REASONS.iter().any(|n| n.eq_ignore_ascii_case(r));
    !named.is_empty() && named.iter().all(narrow)
}

fn zendesk(s: &mut RateSignals, headers: &HeaderMap, now: u64) {
    s.limit = int(headers, "x-rate-limit").or_else(|| int(headers, "ratelimit-limit"));
    s.remaining =
        int(headers, "x-rate-limit-remaining").or_else(|| int(headers, "ratelimit-remaining"));
    s.reset_at = int(headers, "ratelimit-reset")
        .filter(|r| *r >= 0)
        .map(|r| now + (r as u64).min(MAX_WAIT.as_secs()));
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn int(headers: &HeaderMap, name: &str) -> Option<i64> {
    text(headers, name)
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|v| *v >= 0)
}

fn epoch(headers: &HeaderMap, name: &str) -> Option<u64> {
    int(headers, name).map(|v| v as u64)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s.min(MAX_WAIT.as_secs()))
}

/// `Retry-After` as seconds (fractions rounded up) or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: u64) -> Option<Duration> {
    let v = text(headers, "retry-after")?;
    if let Ok(f) = v.parse::<f64>() {
        return (f.is_finite() && f >= 0.0).then(|| secs(f.ceil() as u64));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(secs(at.saturating_sub(now)))
}

/// `2026-03-01T12:00Z`, `2026-03-01T12:00:30.5+01:00` → Unix seconds.
fn iso8601(v: &str) -> Option<u64> {
    let (date, time) = v.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Out-of-range parts are garbage (and would overflow the arithmetic below).
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let (clock, offset) = match time.find(['Z', 'z', '+', '-']) {
        Some(i) => (&time[..i], &time[i..]),
        None => (time, "Z"),
    };
    let mut c = clock.splitn(3, ':');
    let h: i64 = c.next()?.parse().ok()?;
    let min: i64 = c.next()?.parse().ok()?;
    let s: f64 = c.next().map_or(Some(0.0), |s| s.parse().ok())?;
    if !(0..24).contains(&h) || !(0..60).contains(&min) || !(0.0..61.0).contains(&s) {
        return None;
    }
    let off = match offset.as_bytes().first() {
        Some(b'+') | Some(b'-') => {
            let (oh, om) = offset[1..].split_once(':').unwrap_or((&offset[1..], "0"));
            let (oh, om) = (oh.parse::<i64>().ok()?, om.parse::<i64>().ok()?);
            if !(0..24).contains(&oh) || !(0..60).contains(&om) {
                return None;
            }
            let mins = oh * 60 + om;
            if offset.starts_with('-') {
                -mins
            } else {
                mins
            }
        }
        _ => 0,
    };
    let days = crate::util::time::days_from_civil(y, m, day);
    let t = days * 86_400 + h * 3600 + min * 60 + s as i64 - off * 60;
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn each_vendor_is_read_from_its_own_headers() {
        let now = 1_800_000_000;
        let sf = read(
            SystemKind::Salesforce,
            200,
            &h(&[("sforce-limit-info", "api-usage=480/1000; api-bursts=1/20")]),
            None,
            now,
        );
        assert_eq!((sf.remaining, sf.limit), (Some(520), Some(1000)));
        let over = read(
            SystemKind::Salesforce,
            403,
            &HeaderMap::new(),
            Some(br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#),
            now,
        );
        assert!(over.throttled && over.remaining.is_none() && over.wait == Some(NO_WAIT_GIVEN));
        let jira = read(
            SystemKind::JiraCloud,
            429,
            &h(&[
                ("retry-after", "5"),
                ("x-ratelimit-limit", "100"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "2027-01-15T08:00:00Z"),
            ]),
            None,
            now,
        );
        assert!(jira.throttled);
        assert_eq!(jira.wait, Some(Duration::from_secs(5)));
        assert!(jira.reset_at.is_some());
        assert_eq!(jira.reset_at, iso8601("2027-01-15T08:00:00Z"));
        assert_eq!(iso8601("1970-01-02T00:00Z"), Some(86_400));
        assert_eq!(iso8601("1970-01-02T01:00:00+01:00"), Some(86_400));
        let ado = read(
            SystemKind::AzureDevOps,
            200,
            &h(&[("retry-after", "2"), ("x-ratelimit-remaining", "10")]),
            None,
            now,
        );
        assert_eq!(ado.wait, Some(Duration::from_secs(2)));
        assert!(!ado.throttled);
        let sn = read(
            SystemKind::ServiceNow,
            200,
            &h(&[
                ("x-ratelimit-limit", "300"),
                ("x-ratelimit-reset", "1800000600"),
            ]),
            None,
            now,
        );
        assert!(sn.count_locally && sn.remaining.is_none() && sn.reset_at == Some(1_800_000_600));
        let zd = read(
            SystemKind::Zendesk,
            200,
            &h(&[("x-rate-limit", "700"), ("x-rate-limit-remaining", "699")]),
            None,
            now,
        );
        assert_eq!((zd.remaining, zd.limit), (Some(699), Some(700)));
        let fd = read(
            SystemKind::Freshdesk,
            429,
            &h(&[("retry-after", "Sat, 16 Jan 2027 08:00:00 GMT")]),
            None,
            now,
        );
        assert!(fd.throttled && fd.wait == Some(MAX_WAIT));
    }

    #[test]
    fn a_jira_refusal_of_one_issue_or_endpoint_does_not_pause_the_system() {
        let now = 1_800_000_000;
        // Narrow: a refusal with no pause for the system and no counts taken from it.
        let narrow = |s: &RateSignals| {
            s.throttled
                && s.wait.is_none()
                && (s.remaining, s.limit, s.reset_at) == (None, None, None)
        };
        let jira = |reason: &str| {
            read(
                SystemKind::JiraCloud,
                429,
                &h(&[
                    ("retry-after", "30"),
                    ("x-ratelimit-limit", "10"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "2027-01-15T08:00:00Z"),
                    ("ratelimit-reason", reason),
                ]),
                None,
                now,
            )
        };
        for reason in [
            "jira-per-issue-on-write",
            " JIRA-Burst-Based ",
            "jira-burst-based, jira-per-issue-on-write",
        ] {
            let s = jira(reason);
            assert!(narrow(&s), "{reason}: {s:?}");
            assert_eq!(s.wait, None, "{reason}");
            assert_eq!((s.remaining, s.limit, s.reset_at), (None, None, None));
        }
        for reason in [
            "jira-quota-tenant-based",
            "jira-per-issue-on-write, jira-quota-tenant-based",
            "",
            ",",
            "jira-per-issue-on-write-ish",
        ] {
            let s = jira(reason);
            assert!(s.throttled && !narrow(&s), "{reason}: {s:?}");
            assert_eq!(s.wait, Some(Duration::from_secs(30)), "{reason}");
        }
        // Two field lines are one list: a tenant-wide reason on either blocks.
        let mut two = h(&[("retry-after", "30")]);
        two.append("ratelimit-reason", "jira-burst-based".parse().unwrap());
        two.append(
            "ratelimit-reason",
            "jira-quota-tenant-based".parse().unwrap(),
        );
        let s = read(SystemKind::JiraCloud, 429, &two, None, now);
        assert!(
            !narrow(&s) && s.wait == Some(Duration::from_secs(30)),
            "{s:?}"
        );
        two.remove("ratelimit-reason");
        two.append("ratelimit-reason", "jira-burst-based".parse().unwrap());
        two.append(
            "ratelimit-reason",
            "jira-per-issue-on-write".parse().unwrap(),
        );
        assert!(narrow(&read(SystemKind::JiraCloud, 429, &two, None, now)));
        // A beta reason beside it (the tenant's quota) blocks.
        two.insert(
            "x-beta-ratelimit-reason",
            "jira-quota-tenant-based".parse().unwrap(),
        );
        assert!(!narrow(&read(SystemKind::JiraCloud, 429, &two, None, now)));
        // Jira's throttling 503 (with `Retry-After`) blocks, whatever reason it names.
        let mut busy = h(&[("retry-after", "30")]);
        busy.insert("ratelimit-reason", "jira-burst-based".parse().unwrap());
        let s = read(SystemKind::JiraCloud, 503, &busy, None, now);
        assert!(s.throttled && !narrow(&s) && s.wait == Some(Duration::from_secs(30)));
        // Only Jira's 429 says so: another vendor's header of that name is no such reason.
        let mut headers = h(&[("retry-after", "30")]);
        headers.insert("ratelimit-reason", "jira-burst-based".parse().unwrap());
        let zd = read(SystemKind::Zendesk, 429, &headers, None, now);
        assert!(!narrow(&zd) && zd.wait == Some(Duration::from_secs(30)));
        let ok = read(SystemKind::JiraCloud, 200, &headers, None, now);
        assert!(!narrow(&ok) && !ok.throttled);
    }

    #[test]
    fn a_compressed_salesforce_refusal_is_read_and_a_bomb_is_cut() {
        use std::io::Write;
        let now = 1_800_000_000;
        let refusal =
            br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        let gz = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let zlib = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(refusal).unwrap();
            e.finish().unwrap()
        };
        let sf = |encoding: &str, body: &[u8]| {
            let headers = h(&[("content-encoding", encoding)]);
            read(SystemKind::Salesforce, 403, &headers, Some(body), now)
        };
        for (encoding, body) in [
            ("gzip", gz(refusal)),
            ("Deflate", zlib),
            ("identity", refusal.to_vec()),
        ] {
            let s = sf(encoding, &body);
            assert!(
                s.throttled && s.wait == Some(NO_WAIT_GIVEN),
                "{encoding}: {s:?}"
            );
        }
        // 20 MB of zeros in tens of KB: decoded no further than the cap, and no signal.
        let bomb = gz(&vec![0u8; 20 << 20]);
        assert!(bomb.len() < 100 << 10);
        assert!(!sf("gzip", &bomb).throttled);
        assert!(!sf("br", &gz(refusal)).throttled);
        assert!(!sf("gzip", b"not gzip at all").throttled);
    }

    #[test]
    fn hostile_values_are_clamped_or_ignored() {
        let now = 1_800_000_000;
        for v in ["-1", "NaN", "inf", "99999999999999999999", "", "soon"] {
            let s = read(SystemKind::Asana, 429, &h(&[("retry-after", v)]), None, now);
            assert!(s.wait.is_some_and(|w| w <= MAX_WAIT), "{v}: {s:?}");
        }
        for reset in [
            "garbage",
            "99999999999-01-01T00:00Z",
            "2027-13-01T00:00Z",
            "2027-01-01T99:00Z",
            "2027-01-01T00:00+99999999999999:00",
            "2099-01-01T00:00Z",
        ] {
            let s = read(
                SystemKind::JiraCloud,
                200,
                &h(&[
                    ("x-ratelimit-remaining", "-5"),
                    ("x-ratelimit-reset", reset),
                ]),
                None,
                now,
            );
            let nothing = RateSignals {
                served: true,
                ..Default::default()
            };
            assert_eq!(s, nothing, "{reset}");
        }
        let far = read(
            SystemKind::AzureDevOps,
            200,
            &h(&[("x-ratelimit-reset", "18446744073709551615")]),
            None,
            now,
        );
        assert_eq!(far.reset_at, None);
        // A 429 dated in 2099 pauses a second, not the hour the clamp would allow.
        let jira = |status, pairs: &[(&'static str, &str)]| {
            read(SystemKind::JiraCloud, status, &h(pairs), None, now)
        };
        let s = jira(429, &[("x-ratelimit-reset", "2099-01-01T00:00Z")]);
        assert_eq!(s.wait, Some(MIN_REFUSAL_WAIT), "{s:?}");
        // A 429 whose reset is past, or `Retry-After: 0`: still a pause.
        for pairs in [
            &[("x-ratelimit-reset", "2020-01-01T00:00Z")][..],
            &[("retry-after", "0")],
            &[("retry-after", "-0")],
        ] {
            let s = jira(429, pairs);
            assert!(
                s.throttled && s.wait == Some(MIN_REFUSAL_WAIT),
                "{pairs:?}: {s:?}"
            );
        }
        // A 503 without `Retry-After` is an outage: no block until the quota's reset.
        let s = jira(503, &[("x-ratelimit-reset", "2027-01-15T08:10:00Z")]);
        assert!(!s.throttled && s.wait.is_none(), "{s:?}");
        let s = jira(503, &[("retry-after", "7")]);
        assert!(
            s.throttled && s.wait == Some(Duration::from_secs(7)),
            "{s:?}"
        );
    }
}
