//! `auth_query` answers kept for a short while, unknown users' too: a client retrying a
//! name, or many clients of one user, cost PostgreSQL one lookup. Bounded in size: past it,
//! answers are not kept (the lookups stay bounded by their own limit on concurrency).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::userlist::Secret;

/// How long an answer is used before the user is looked up again: the same for a secret
/// found and for "no such user", so that when a name is looked up again does not tell
/// which it was.
pub const TTL: Duration = Duration::from_secs(15);
pub const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Default)]
pub struct Lookups {
    entries: Mutex<HashMap<String, (Option<Secret>, Instant)>>,
}

fn fresh(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < TTL
}

impl Lookups {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<Secret>, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `user` if one is fresh: `Some(None)` is "no such user".
    pub fn get(&self, user: &str, now: Instant) -> Option<Option<Secret>> {
        let entries = self.lock();
        let (answer, at) = entries.get(user)?;
        fresh(*at, now).then(|| answer.clone())
    }

    /// Keeps the answer looked up at `at`.
    pub fn put(&self, user: &str, answer: Option<Secret>, at: Instant) {
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(user) {
            entries.retain(|_, (_, t)| fresh(*t, at));
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(user.to_owned(), (answer, at));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_for_their_ttl_and_the_table_is_bounded() {
        let l = Lookups::default();
        let now = Instant::now();
        l.put("alice", Some(Secret::Md5("md5x".into())), now);
        l.put("nobody", None, now);
        assert!(matches!(l.get("alice", now), Some(Some(_))));
        assert!(matches!(l.get("nobody", now), Some(None)));
        assert_eq!(l.get("carol", now), None, "never looked up");
        let later = now + TTL - Duration::from_millis(1);
        assert!(l.get("nobody", later).is_some() && l.get("alice", later).is_some());
        assert_eq!(l.get("nobody", now + TTL), None, "looked up again");
        assert_eq!(l.get("alice", now + TTL), None, "at the same time");
        for i in 0..MAX_ENTRIES + 10 {
            l.put(&format!("u{i}"), None, now);
        }
        assert_eq!(l.len(), MAX_ENTRIES);
        // Once the old ones are stale, new ones take their place.
        let stale = now + TTL;
        l.put("new", None, stale);
        assert!(l.get("new", stale).is_some());
    }
}
