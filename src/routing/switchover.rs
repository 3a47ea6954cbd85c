//! Whether Patroni is carrying out a planned switchover right now, from its `failover` key:
//! while it is, transaction pools hold new transactions instead of starting them on a
//! primary that is about to stop. Pure: the topology and the clock in, a yes or no out.

use std::time::{Duration, SystemTime};

use crate::discovery::Topology;

/// The switchover the `failover` key announces is under way and concerns the current
/// leader: it names that leader (or no leader, as `patronictl failover` writes it), its
/// candidate is another member, and its time, less `grace`, has come. A key that names
/// another leader (left from an earlier switchover) or a time still to come holds nothing.
pub fn under_way(t: &Topology, now: SystemTime, grace: Duration) -> bool {
    starts_at(t, grace).is_some_and(|at| at <= now)
}

/// When the hold for the announced switchover begins: at once for an immediate one,
/// `grace` before a scheduled one's time. `None` when the key concerns no switchover away
/// from the current leader.
pub fn starts_at(t: &Topology, grace: Duration) -> Option<SystemTime> {
    let (Some(f), Some(leader)) = (&t.failover, &t.leader) else {
        return None;
    };
    let names_leader = f.leader.as_deref().map_or(true, |l| l == leader);
    let moves_away = f.candidate.as_deref() != Some(leader.as_str());
    if !(names_leader && moves_away) {
        return None;
    }
    match f.scheduled_at.as_deref().map(parse_time) {
        None => Some(SystemTime::UNIX_EPOCH),
        // Unreadable: assume due, as holding is bounded by connect_wait anyway.
        Some(None) => Some(SystemTime::UNIX_EPOCH),
        Some(Some(at)) => Some(at.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH)),
    }
}

/// A session on `member` should leave it before the switchover stops it: `member` is the
/// leader the switchover under way moves away from.
pub fn moves_away_from(t: &Topology, member: &str, now: SystemTime, grace: Duration) -> bool {
    t.leader.as_deref() == Some(member) && under_way(t, now, grace)
}

/// An ISO 8601 time as Patroni writes `scheduled_at` (`2026-11-30T10:00:00+01:00`, with
/// fractions or `Z`).
fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim().replace(' ', "T");
    // The offset: `Z`, or a sign and `HH:MM` (or `HHMM`) at the end.
    let (local, offset) = if let Some(rest) = s.strip_suffix('Z') {
        (rest.to_owned(), 0i64)
    } else {
        let at = s.rfind(['+', '-']).filter(|i| *i > 10)?;
        let (local, off) = s.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let digits: String = off[1..].chars().filter(char::is_ascii_digit).collect();
        if digits.len() != 4 {
            return None;
        }
        let (h, m): (i64, i64) = (digits[..2].parse().ok()?, digits[2..].parse().ok()?);
        (local.to_owned(), sign * (h * 3600 + m * 60))
    };
    let utc = humantime::parse_rfc3339_weak(&local).ok()?;
    match offset {
        o if o >= 0 => utc.checked_sub(Duration::from_secs(o as u64)),
        o => utc.checked_add(Duration::from_secs((-o) as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::patroni::Failover;
    use crate::routing::tests::topology;

    fn with(failover: Option<Failover>) -> Topology {
        let mut t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        t.failover = failover;
        t
    }

    fn key(leader: Option<&str>, candidate: Option<&str>, at: Option<&str>) -> Option<Failover> {
        Some(Failover {
            leader: leader.map(str::to_owned),
            candidate: candidate.map(str::to_owned),
            scheduled_at: at.map(str::to_owned),
        })
    }

    fn under_way(t: &Topology, now: SystemTime) -> bool {
        super::under_way(t, now, Duration::ZERO)
    }

    #[test]
    fn a_switchover_away_from_the_leader_holds_when_due() {
        let now = humantime::parse_rfc3339("2026-11-30T10:00:00Z").unwrap();
        assert!(!under_way(&with(None), now));
        assert!(under_way(&with(key(Some("a"), Some("b"), None)), now));
        assert!(under_way(&with(key(Some("a"), None, None)), now));
        assert!(under_way(&with(key(None, Some("b"), None)), now));
        // Left over from another leader, or naming the leader itself as the candidate.
        assert!(!under_way(&with(key(Some("b"), Some("a"), None)), now));
        assert!(!under_way(&with(key(None, Some("a"), None)), now));
        // Scheduled: held from its time on, whatever the offset says.
        let due = key(Some("a"), Some("b"), Some("2026-11-30T10:30:00+01:00"));
        assert!(under_way(&with(due), now));
        let later = key(Some("a"), Some("b"), Some("2026-11-30T10:30:00+00:00"));
        assert!(!under_way(&with(later), now));
        let later = key(Some("a"), Some("b"), Some("2026-11-30T05:30:00.123-05:00"));
        assert!(!under_way(&with(later), now));
        let past = key(Some("a"), Some("b"), Some("2026-11-30T09:59:59Z"));
        assert!(under_way(&with(past), now));
    }

    #[test]
    fn a_scheduled_switchover_is_held_from_its_grace_on() {
        let now = humantime::parse_rfc3339("2026-11-30T10:00:00Z").unwrap();
        let grace = Duration::from_secs(2);
        let soon = with(key(Some("a"), Some("b"), Some("2026-11-30T10:00:01Z")));
        assert!(super::under_way(&soon, now, grace));
        assert!(moves_away_from(&soon, "a", now, grace));
        assert!(!moves_away_from(&soon, "b", now, grace));
        let later = with(key(Some("a"), Some("b"), Some("2026-11-30T10:00:03Z")));
        assert!(!super::under_way(&later, now, grace));
        let at = humantime::parse_rfc3339("2026-11-30T10:00:01Z").unwrap();
        assert_eq!(starts_at(&later, grace), Some(at));
        assert_eq!(starts_at(&with(None), grace), None);
    }
}
