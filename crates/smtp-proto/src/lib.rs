//! SMTP as the gateway speaks it, with no I/O: bytes in, replies and complete
//! transactions out. The driver (the `godwit` binary's smtpd) owns sockets,
//! timeouts, TLS and the spool; everything that decides what a byte means is
//! here, so a fuzzer can drive it directly.

pub mod data;
pub mod envelope;
pub mod reply;
pub mod session;
pub mod stuff;

pub use data::{DataDecoder, DataOutcome, NewlinePolicy};
pub use envelope::{Envelope, MailParams, RcptParams};
pub use reply::Reply;
pub use session::{
    AuthRules, Credentials, Limits, Mechanism, Output, RcptPolicy, Refusal, Session,
};
pub use stuff::{DotStuffer, dot_stuff};
