//! Operator queue commands (postsuper/postqueue equivalents), decided once:
//! the running gateway applies them to the messages in memory, and the CLI
//! applies them to the spool when no gateway runs, through this one function,
//! so the two can never differ.

use crate::plan::{Hold, RcptState};
use godwit_config::ROUTE_BOTH;
use godwit_events::Event;
use godwit_spool::{Header, RcptStatus};
use serde::{Deserialize, Serialize};

/// An operator's queue command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueOp {
    Hold,
    Release,
    /// Retry now.
    Flush,
    /// Decide the route again and retry now.
    Requeue,
    Delete,
}

impl QueueOp {
    pub fn name(&self) -> &'static str {
        match self {
            QueueOp::Hold => "hold",
            QueueOp::Release => "release",
            QueueOp::Flush => "flush",
            QueueOp::Requeue => "requeue",
            QueueOp::Delete => "delete",
        }
    }
}

/// Which recipients a command applies to. Empty fields match everything;
/// `all` must be set for a command with no other filter (no accidents).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcpt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_s: Option<u64>,
    #[serde(default)]
    pub all: bool,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.queue_id.is_none()
            && self.platform.is_none()
            && self.rcpt.is_none()
            && self.older_than_s.is_none()
            && !self.all
    }

    /// Whether recipient `addr` of message `h`, currently routed to `route`, matches.
    pub fn matches(&self, h: &Header, addr: &str, route: &str, now: i64) -> bool {
        self.matches_at(&h.queue_id, h.arrival_ms, addr, route, now)
    }

    /// `matches` for a message known by its queue id and arrival time (a
    /// resting queue entry, whose header stays in the spool).
    pub fn matches_at(
        &self,
        queue_id: &str,
        arrival_ms: i64,
        addr: &str,
        route: &str,
        now: i64,
    ) -> bool {
        self.queue_id
            .as_ref()
            .is_none_or(|q| q.eq_ignore_ascii_case(queue_id))
            && self
                .platform
                .as_ref()
                .is_none_or(|p| p == route || (route == ROUTE_BOTH))
            && self
                .rcpt
                .as_ref()
                .is_none_or(|r| r.eq_ignore_ascii_case(addr))
            && self
                .older_than_s
                .is_none_or(|s| (now - arrival_ms) / 1000 >= s as i64)
    }
}

/// What a command did to one message.
#[derive(Debug, Default, PartialEq)]
pub struct OpEffect {
    /// Recipients whose state changed (to record).
    pub changed: Vec<usize>,
    pub events: Vec<Event>,
    /// Recipients the command acted on.
    pub affected: usize,
}

/// Applies `op` to the recipients of message `h` that `sel` matches.
/// `route_of` gives a recipient's route when it has not been attempted yet.
///
/// - hold: movable recipients get an operator hold;
/// - release: held recipients (by operator or route) are due now; others
///   are left alone;
/// - flush and requeue: recipients not on operator hold are due now
///   (requeue also forgets the last route, so it is decided again);
/// - delete: the matched recipients, and only they, become final
///   (`Deleted`); co-recipients stay queued.
pub fn apply(
    op: &QueueOp,
    sel: &Selector,
    h: &Header,
    rcpts: &mut [RcptState],
    route_of: &dyn Fn(&str) -> String,
    now: i64,
    actor: &str,
) -> OpEffect {
    let mut fx = OpEffect::default();
    let mut deleted = Vec::new();
    for (i, (addr, _)) in h.envelope.rcpts.iter().enumerate() {
        let r = &mut rcpts[i];
        if r.is_final() {
            continue;
        }
        let route = r.last_route.clone().unwrap_or_else(|| route_of(addr));
        if !sel.matches(h, addr, &route, now) {
            continue;
        }
        match op {
            QueueOp::Hold => {
                if r.hold == Hold::Operator {
                    continue;
                }
                r.hold = Hold::Operator;
                fx.events.push(Event::Held {
                    queue_id: h.queue_id.clone(),
                    message_id: h.message_id.clone(),
                    rcpt: addr.clone(),
                    why: format!("operator hold by {actor}"),
                });
            }
            QueueOp::Release => {
                if r.hold == Hold::None {
                    continue;
                }
                r.hold = Hold::None;
                r.next_ms = now;
                fx.events.push(Event::Released {
                    queue_id: h.queue_id.clone(),
                    message_id: h.message_id.clone(),
                    rcpt: addr.clone(),
                    actor: actor.to_string(),
                });
            }
            QueueOp::Flush | QueueOp::Requeue => {
                if !flush(&mut r.hold, &mut r.next_ms, now) {
                    continue;
                }
                if *op == QueueOp::Requeue {
                    r.last_route = None;
                }
            }
            QueueOp::Delete => {
                r.status = RcptStatus::Deleted;
                r.last_reply = Some(format!("deleted by {actor}"));
                deleted.push(addr.clone());
            }
        }
        fx.changed.push(i);
        fx.affected += 1;
    }
    if !deleted.is_empty() {
        fx.events.push(Event::QueueDeleted {
            queue_id: h.queue_id.clone(),
            message_id: h.message_id.clone(),
            rcpts: deleted,
            actor: actor.to_string(),
        });
    }
    fx
}

/// What `flush` (and `requeue`) does to one recipient that is not final:
/// due now, and a route hold is decided again; an operator hold stays
/// (flush does not override a hold). Returns whether it acted.
pub fn flush(hold: &mut Hold, next_ms: &mut i64, now: i64) -> bool {
    if *hold == Hold::Operator {
        return false;
    }
    *hold = Hold::None;
    *next_ms = now;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::header;

    fn state(hold: Hold, status: RcptStatus) -> RcptState {
        RcptState {
            hold,
            status,
            next_ms: 99,
            last_route: Some("old".into()),
            ..Default::default()
        }
    }

    #[test]
    fn op_table() {
        use Hold::*;
        use RcptStatus::*;
        // (op, state before) -> (hold after, status after, affected)
        let cases = [
            (QueueOp::Hold, None, Deferred, Operator, Deferred, 1),
            (QueueOp::Hold, Operator, Deferred, Operator, Deferred, 0),
            (QueueOp::Hold, None, Delivered, None, Delivered, 0),
            (QueueOp::Release, Operator, Deferred, None, Deferred, 1),
            (QueueOp::Release, Route, Deferred, None, Deferred, 1),
            // Offline release used to touch recipients that were not held.
            (QueueOp::Release, None, Deferred, None, Deferred, 0),
            (QueueOp::Flush, None, Deferred, None, Deferred, 1),
            (QueueOp::Flush, Operator, Deferred, Operator, Deferred, 0),
            (QueueOp::Requeue, Route, Deferred, None, Deferred, 1),
            (QueueOp::Delete, Operator, Deferred, Operator, Deleted, 1),
            (QueueOp::Delete, None, Failed, None, Failed, 0),
        ];
        for (n, (op, hold, status, hold_after, status_after, affected)) in
            cases.into_iter().enumerate()
        {
            let h = header(&["a@x"], 0);
            let mut rcpts = vec![state(hold, status)];
            let sel = Selector {
                all: true,
                ..Default::default()
            };
            let fx = apply(&op, &sel, &h, &mut rcpts, &|_| "old".into(), 1000, "ops");
            assert_eq!(rcpts[0].hold, hold_after, "case {n}");
            assert_eq!(rcpts[0].status, status_after, "case {n}");
            assert_eq!(fx.affected, affected, "case {n}");
            assert_eq!(fx.changed.len(), affected, "case {n}");
            if affected == 1 && op != QueueOp::Hold && op != QueueOp::Delete {
                assert_eq!(rcpts[0].next_ms, 1000, "case {n}: due now");
            }
        }
    }

    #[test]
    fn release_emits_an_event_and_delete_names_exactly_the_removed() {
        let h = header(&["a@x", "b@x"], 0);
        let mut rcpts = vec![
            state(Hold::Operator, RcptStatus::Deferred),
            state(Hold::None, RcptStatus::Deferred),
        ];
        let all = Selector {
            all: true,
            ..Default::default()
        };
        let fx = apply(
            &QueueOp::Release,
            &all,
            &h,
            &mut rcpts,
            &|_| "old".into(),
            0,
            "ops",
        );
        assert!(matches!(&fx.events[..], [Event::Released { rcpt, .. }] if rcpt == "a@x"));
        let one = Selector {
            rcpt: Some("B@X".into()),
            ..Default::default()
        };
        let fx = apply(
            &QueueOp::Delete,
            &one,
            &h,
            &mut rcpts,
            &|_| "old".into(),
            0,
            "ops",
        );
        assert_eq!(
            rcpts[0].status,
            RcptStatus::Deferred,
            "co-recipient stays queued"
        );
        assert_eq!(rcpts[1].status, RcptStatus::Deleted);
        assert!(matches!(&fx.events[..], [Event::QueueDeleted { rcpts, .. }] if rcpts == &["b@x"]));
    }
}
