//! Console sessions: a random id in an HttpOnly, SameSite=Strict cookie names a session held
//! here (the id itself is not kept: its SHA-256 is the key). A session remembers whose it is by
//! the caller's token hash, so revoking the caller ends it; it ends after an idle time without
//! use and a longest time after sign-in whatever happens (`console_session_idle_secs`,
//! `console_session_max_secs`). At most [`MAX_SESSIONS`] live at once (the
//! least recently used goes first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::util::sync::lock;

/// Sessions held at once, at most.
pub const MAX_SESSIONS: usize = 512;
/// The session cookie's name.
pub const COOKIE: &str = "credbroker_console";

/// A signed-in admin, as a request sees it.
#[derive(Clone)]
pub struct Session {
    /// The caller's token hash (the caller is looked up again on every request).
    pub caller_hash: [u8; 32],
    /// The caller's name, for pages and the audit trail.
    pub caller_name: String,
    /// The token every state-changing form must carry.
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("caller_name", &self.caller_name)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// True when `presented` is this session's CSRF token (compared in constant time).
    pub fn csrf_ok(&self, presented: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// The sessions of this process.
pub struct Sessions {
    by_id_hash: Mutex<HashMap<[u8; 32], Session>>,
    idle: Duration,
    absolute: Duration,
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// No sessions yet; each ends after `idle` unused or `absolute` after sign-in.
    pub fn new(idle: Duration, absolute: Duration) -> Self {
        Self {
            by_id_hash: Mutex::default(),
            idle,
            absolute,
        }
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_seen) < self.idle && now.duration_since(s.created) < self.absolute
    }

    /// Starts a session for the caller; returns the cookie value (shown to nobody else).
    pub fn start(&self, caller_hash: [u8; 32], caller_name: &str) -> String {
        let id = crate::util::random::url_token::<32>();
        let now = Instant::now();
        let session = Session {
            caller_hash,
            caller_name: caller_name.to_owned(),
            csrf: crate::util::random::url_token::<32>(),
            created: now,
            last_seen: now,
        };
        let mut map = lock(&self.by_id_hash);
        map.retain(|_, s| self.live(s, now));
        while map.len() >= MAX_SESSIONS {
            let oldest = map.iter().min_by_key(|(_, s)| s.last_seen).map(|(k, _)| *k);
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(key(&id), session);
        id
    }

    /// The live session `id` names (marked used), if any; an expired one is dropped.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = lock(&self.by_id_hash);
        let k = key(id);
        let s = map.get_mut(&k)?;
        if !self.live(s, now) {
            map.remove(&k);
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    /// True while the session `id` names is live (without marking it used: a live view that
    /// only listens does not keep a session from going idle).
    pub fn is_live(&self, id: &str) -> bool {
        let now = Instant::now();
        lock(&self.by_id_hash)
            .get(&key(id))
            .is_some_and(|s| self.live(s, now))
    }

    /// Ends the session `id` names.
    pub fn end(&self, id: &str) {
        lock(&self.by_id_hash).remove(&key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(1800);
    const ABSOLUTE: Duration = Duration::from_secs(43_200);

    #[test]
    fn a_session_is_found_by_its_id_only_and_ends() {
        let s = Sessions::new(IDLE, ABSOLUTE);
        let id = s.start([7; 32], "root");
        assert_eq!(s.get(&id).map(|x| x.caller_name), Some("root".to_owned()));
        assert!(s.get("not-it").is_none());
        let csrf = s.get(&id).map(|x| x.csrf).unwrap_or_default();
        assert!(s
            .get(&id)
            .is_some_and(|x| x.csrf_ok(&csrf) && !x.csrf_ok("")));
        s.end(&id);
        assert!(s.get(&id).is_none());
    }

    #[test]
    fn the_least_recently_used_session_makes_room() {
        let s = Sessions::new(IDLE, ABSOLUTE);
        let first = s.start([1; 32], "a");
        for _ in 1..MAX_SESSIONS {
            s.start([2; 32], "b");
        }
        assert!(s.get(&first).is_some());
        let _ = s.start([3; 32], "c");
        assert_eq!(lock(&s.by_id_hash).len(), MAX_SESSIONS);
        assert!(s.get(&first).is_some(), "the one just used stays");
    }
}
