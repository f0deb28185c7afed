//! Evidence: everything here reads the typed event stream (never log text).
//! - `index`: events into the state store, keyed for trace, with retention;
//! - `trace`: the chain of custody of one message;
//! - `metrics`: Prometheus counters and histograms fed by events, gauges
//!   sampled from the queue at scrape time;
//! - `http`: the loopback admin listener (/metrics, the dashboard, its API);
//! - `report`: volumes, codes, latency percentiles for a time window;
//! - `maillog`: Postfix-style log lines for pflogsumm and grep habits;
//! - `doctor`: the five-question diagnosis as a pure decision over facts.

pub mod dashboard;
pub mod doctor;
pub mod http;
pub mod index;
pub mod maillog;
pub mod metrics;
pub mod report;
pub mod trace;
