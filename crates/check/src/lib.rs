//! godwit preflight (`godwit check`): DNS, SPF/DKIM/DMARC, TLS, SMTP and IMAP
//! probes that end in one verdict per migration contract.
//!
//! Analyzers (`spf`, `dmarc`, `dkim`, `mx`, `policy`, `cert`) are pure: they take
//! what was observed and return `Finding`s. The probes (`dns`, `smtp`, `imap`) do
//! the I/O and nothing else.

pub mod cert;
pub mod cli;
pub mod dkim;
pub mod dmarc;
pub mod dns;
pub mod finding;
pub mod imap;
pub mod mx;
pub mod outbound;
pub mod policy;
mod run;
pub mod smtp;
pub mod spf;
pub mod spf_eval;

pub use finding::{Contract, Finding, Report, Severity};
pub use run::{collect, run};
