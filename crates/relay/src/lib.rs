//! Delivery to the platforms. The scheduler keeps every queued message in
//! memory (metadata only; bodies stay in the spool), picks the due ones, and
//! for each pending recipient decides the route at attempt time, so a routing
//! change applies to mail already queued. Recipients are grouped by platform
//! and relayed over SMTP with pipelining; each recipient's reply is kept.

mod client;
mod dsn;
mod flow;
pub mod journal;
pub mod loops;
pub mod outbound;
pub mod plan;
pub mod queue_op;
mod schedule;

pub use client::{AttemptOutcome, RcptOutcome, parse_remote_queue_id};
pub use flow::FlowSnapshot;
pub use queue_op::{QueueOp, Selector};
pub use schedule::{QueueSnapshot, Relay, RelayHandle, apply_offline};
