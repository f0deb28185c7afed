//! The outbound edge: what godwit decides when mail leaves for the internet.
//! Each module keeps its decisions pure (table-tested) beside a thin driver:
//! `mx` orders MX hosts and falls back to the domain's address (RFC 5321
//! 5.1, null MX RFC 7505), `dkim` loads keys, picks one by the header From
//! domain and signs (RFC 6376), `relay` says who may relay without AUTH.

pub mod dkim;
pub mod mx;
pub mod relay;

pub use dkim::{DkimKeys, KeyAlgorithm};
pub use mx::{MxPlan, MxResolver, MxTarget};
pub use relay::relay_permitted;
