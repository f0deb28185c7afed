//! Checking a submission user's password, and nothing else: an IMAP LOGIN
//! at the platform the user's route names now (`auth = "platform"`, so when
//! a mailbox moves its password check follows it), or a Dovecot passwd-file
//! (`auth = "file"`). Repeated failures from one IP lock it out for a while.
//! Passwords are never logged, stored or put in an error.

pub mod passwd;
pub mod sender;

use godwit_access::backend::{BackendError, Target};
use godwit_access::limits::{Caps, Limits};
use godwit_config::{Config, SubmissionAuth, SubmissionConfig};
use godwit_route::SharedRoutes;
use godwit_store::Store;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a password check came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials are right; `platform` checked them (auth = "platform").
    Ok { platform: Option<String> },
    /// Wrong password, unknown user, or a user outside our domains.
    /// `reason` is for metrics and the event: `auth`, `unknown`,
    /// `foreign_domain`, ...; `reply` is the platform's own NO, if any.
    Failed {
        reason: String,
        platform: Option<String>,
        reply: Option<String>,
    },
    /// Too many failures from this IP lately: refused without checking.
    LockedOut,
    /// The check could not be made (platform down): 454 4.7.0, try later.
    Unavailable { reason: String },
}

impl Verdict {
    /// The `reason` label for metrics: `ok` on success.
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Ok { .. } => "ok",
            Verdict::Failed { reason, .. } => reason,
            Verdict::LockedOut => "locked_out",
            Verdict::Unavailable { .. } => "unavailable",
        }
    }
}

/// A check that did not pass, with whether this failure just locked the IP out.
pub struct Checked {
    pub verdict: Verdict,
    /// This failure reached `max_failures_per_ip`: the IP is locked out from now.
    pub locked_now: bool,
    /// Failures from this IP within the window, this one included.
    pub failures: u32,
}

fn ip_key(ip: IpAddr) -> String {
    format!("ip:{ip}")
}

pub struct Authenticator {
    config: Arc<Config>,
    sc: SubmissionConfig,
    routes: SharedRoutes,
    store: Store,
    users: Option<passwd::Users>,
    client_tls: [Arc<rustls::ClientConfig>; 2],
    /// The access front's failure counter (pure, table-tested), keyed by IP only.
    lockout: Mutex<Limits>,
}

impl Authenticator {
    /// Reads `users_file` when auth = "file"; the error names the key and line.
    pub fn new(
        config: Arc<Config>,
        sc: SubmissionConfig,
        routes: SharedRoutes,
        store: Store,
    ) -> Result<Authenticator, String> {
        let users = match (sc.auth, &sc.users_file) {
            (SubmissionAuth::File, Some(p)) => Some(passwd::load(p)?),
            _ => None,
        };
        let caps = Caps {
            max_connections: usize::MAX,
            max_connections_per_ip: usize::MAX,
            max_sessions_per_user: usize::MAX,
            max_failures_per_ip: sc.max_failures_per_ip,
            // Per IP only: counting per user would let anyone lock a user
            // out. The user key is the IP too, so that count stays bounded.
            max_failures_per_user: sc.max_failures_per_ip,
            failure_window: sc.failure_window,
        };
        Ok(Authenticator {
            client_tls: [
                godwit_tls::client_config(false),
                godwit_tls::client_config(true),
            ],
            lockout: Mutex::new(Limits::new(caps)),
            config,
            sc,
            routes,
            store,
            users,
        })
    }

    /// Checks `user`/`password` for a client at `ip`, counting failures.
    pub async fn check(&self, ip: IpAddr, user: &str, password: &str) -> Checked {
        let now = Instant::now();
        let address = godwit_route::normalize_address(user);
        if self
            .lockout
            .lock()
            .unwrap()
            .may_attempt(ip, &ip_key(ip), now)
            .is_err()
        {
            return Checked {
                verdict: Verdict::LockedOut,
                locked_now: false,
                failures: self.sc.max_failures_per_ip,
            };
        }
        let verdict = match self.sc.auth {
            SubmissionAuth::File => self.check_file(&address, password).await,
            SubmissionAuth::Platform => self.check_platform(&address, user, password).await,
        };
        let mut locked_now = false;
        let mut failures = 0;
        if let Verdict::Failed { .. } = verdict {
            let mut l = self.lockout.lock().unwrap();
            l.failed(ip, &ip_key(ip), now);
            failures = l.failures(ip, now) as u32;
            locked_now = l.may_attempt(ip, &ip_key(ip), now).is_err();
        }
        Checked {
            verdict,
            locked_now,
            failures,
        }
    }

    async fn check_file(&self, address: &str, password: &str) -> Verdict {
        let Some(entry) = self.users.as_ref().and_then(|u| u.get(address)).cloned() else {
            return Verdict::Failed {
                reason: "unknown".into(),
                platform: None,
                reply: None,
            };
        };
        let password = password.to_string();
        // Argon2 and bcrypt take tens of milliseconds by design: off the runtime.
        let ok = tokio::task::spawn_blocking(move || passwd::verify(&entry, &password))
            .await
            .unwrap_or(false);
        if ok {
            Verdict::Ok { platform: None }
        } else {
            Verdict::Failed {
                reason: "auth".into(),
                platform: None,
                reply: None,
            }
        }
    }

    async fn check_platform(&self, address: &str, user: &str, password: &str) -> Verdict {
        // The routing map inbound mail and the access front follow: the
        // platform that holds the mailbox now.
        let platform =
            match godwit_access::login_platform(&self.config, &self.routes, &self.store, address)
                .await
            {
                Ok(p) => p,
                Err(reason) => {
                    return Verdict::Failed {
                        reason: reason.into(),
                        platform: None,
                        reply: None,
                    };
                }
            };
        let pc = &self.config.platforms[&platform];
        let Some(url) = pc.imap.as_ref() else {
            return Verdict::Unavailable {
                reason: format!("platforms.{platform}.imap is not set"),
            };
        };
        let target = Target {
            url,
            tls: pc.tls,
            client_tls: self.client_tls[pc.tls_insecure as usize].clone(),
            timeout: self.sc.backend_timeout,
        };
        match godwit_access::backend::imap_verify(&target, user, password).await {
            Ok(()) => Verdict::Ok {
                platform: Some(platform),
            },
            Err(BackendError::Auth(reply)) => Verdict::Failed {
                reason: "auth".into(),
                platform: Some(platform),
                reply: Some(reply),
            },
            Err(BackendError::Unavailable(reason)) => Verdict::Unavailable {
                reason: format!("platform {platform}: {reason}"),
            },
        }
    }

    /// The addresses `user` may send as: itself, its mailbox if it is an
    /// alias, and the mailbox's directory aliases.
    pub async fn identities(&self, user: &str) -> Vec<String> {
        sender::identities(&self.store, user).await
    }
}
