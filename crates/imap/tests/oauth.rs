//! OAuth 2.0 logins against a real Dovecot whose oauth2 passdb asks a token
//! introspection endpoint (introspection_mode = post) that the test runs,
//! beside a client-credentials token endpoint (godwit-testkit's token_server.py).
//! Both grant styles sync; a token the server refuses ends that account with
//! the server's text while the others go on; a token past its expires_in is
//! replaced before the next login, including the reconnect of a copy that
//! outlived its token.

mod common;

use common::*;
use godwit_imap::conn::{Auth, Server};
use godwit_imap::engine::{Endpoints, SyncOptions, sync_account};
use godwit_imap::oauth::TokenSource;
use godwit_imap::verify::verify_account;
use godwit_testkit::TokenServer;
use std::sync::Arc;
use std::time::{Duration, Instant};

const APP_USER: &str = "app@example.com";
const USERS: [&str; 4] = [
    APP_USER,
    "alice@example.com",
    "mallory@example.com",
    "broken@example.com",
];

const CLIENT_ID: &str = "godwit-app";
const CLIENT_SECRET: &str = "s3cret:with/odd chars";

fn token_server(expires_in: u64) -> TokenServer {
    TokenServer::start(CLIENT_ID, CLIENT_SECRET, APP_USER, expires_in)
}

/// A Dovecot that takes XOAUTH2 and OAUTHBEARER, checked by `tokens` (and
/// the folder holding its oauth2 passdb settings).
fn oauth_dovecot(tokens: &TokenServer) -> (Dovecot, tempfile::TempDir) {
    let keep = tempfile::tempdir().unwrap();
    let dir = keep.path().to_path_buf();
    let conf = dir.join("oauth2.conf");
    std::fs::write(&conf, tokens.dovecot_oauth2_conf()).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let extra = format!(
        "auth_mechanisms = plain login xoauth2 oauthbearer\n\
         passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
        conf.display()
    );
    (Dovecot::start_with(Flavor::Exchange, &USERS, &extra), keep)
}

fn endpoints(source: &Dovecot, target: &Dovecot, auth: Auth) -> Endpoints {
    let mut s = Server::from_url(&source.url()).unwrap();
    s.auth = auth;
    Endpoints {
        source: s,
        target: Server::from_url(&target.url()).unwrap(),
        overrides: Default::default(),
        exclude: vec![],
        acls: false,
        acl_users: Default::default(),
    }
}

async fn seed(port: u16, user: &str) {
    let mut s = login(port, user).await;
    append(
        &mut s,
        "INBOX",
        "(\\Seen)",
        "28-Nov-2026 10:00:00 +0000",
        &message(Some(&format!("<m@{user}>")), "hello", "body"),
    )
    .await;
    s.logout().await.unwrap();
}

fn no_password(user: &str) -> godwit_imap::conn::Login {
    godwit_imap::conn::Login {
        user: user.into(),
        password: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_grant_syncs_and_a_lapsed_token_is_replaced() {
    let tokens = token_server(2);
    let (source, _conf) = oauth_dovecot(&tokens);
    let target = Dovecot::start(Flavor::Source, &USERS);
    seed(source.port, APP_USER).await;
    let grant = Arc::new(TokenSource::ClientCredentials {
        url: tokens.token_url(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        scope: Some("https://outlook.office365.com/.default".into()),
        tls_insecure: false,
        cache: Default::default(),
    });
    let ep = endpoints(&source, &target, Auth::XOAuth2(grant));
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let report = sync_account(
        &store,
        &ep,
        APP_USER,
        &no_password(APP_USER),
        &login_of(APP_USER),
        &SyncOptions::default(),
        Arc::new(Default::default()),
    )
    .await;
    assert!(report.error.is_none(), "{report:#?}");
    assert_eq!(report.copied(), 1, "{report:#?}");
    // Every connection of that run used the one cached token.
    assert_eq!(tokens.issued(), 1);
    // Past its expires_in (2 s), the next login fetches a new one and works.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let check = verify_account(
        &store,
        &ep,
        APP_USER,
        &no_password(APP_USER),
        &login_of(APP_USER),
    )
    .await;
    assert!(check.clean, "{check:#?}");
    assert_eq!(tokens.issued(), 2);
    // The token never reaches the store.
    let dump = std::fs::read(dir.path().join("state.db")).unwrap();
    assert!(
        !dump.windows(4).any(|w| w == b"cc-1"),
        "a token in state.db"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_per_address_and_refusals_end_only_their_account() {
    let tokens = token_server(3600);
    let (source, _conf) = oauth_dovecot(&tokens);
    let target = Dovecot::start(Flavor::Source, &USERS);
    for u in [
        "alice@example.com",
        "mallory@example.com",
        "broken@example.com",
    ] {
        seed(source.port, u).await;
    }
    // alice's token is good, mallory's is refused by the introspection, and
    // broken's command fails.
    let script = "case $1 in mallory*) echo revoked-$1;; broken*) echo no vault >&2; exit 3;; *) echo cmd-$1;; esac";
    let cmd = Arc::new(TokenSource::Command {
        argv: vec![
            "sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            "{address}".into(),
        ],
    });
    let ep = endpoints(&source, &target, Auth::OAuthBearer(cmd));
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let mut errors = std::collections::BTreeMap::new();
    for u in [
        "alice@example.com",
        "mallory@example.com",
        "broken@example.com",
    ] {
        let r = sync_account(
            &store,
            &ep,
            u,
            &no_password(u),
            &login_of(u),
            &SyncOptions::default(),
            Arc::new(Default::default()),
        )
        .await;
        errors.insert(u, (r.error.clone(), r.copied()));
    }
    assert_eq!(errors["alice@example.com"], (None, 1), "{errors:#?}");
    let (mallory, _) = &errors["mallory@example.com"];
    let mallory = mallory.as_deref().unwrap_or_default();
    assert!(
        mallory.contains("login as mallory@example.com")
            && mallory.contains("OAUTHBEARER status: {\"status\":\"invalid_token\""),
        "{mallory}"
    );
    let (broken, _) = &errors["broken@example.com"];
    let broken = broken.as_deref().unwrap_or_default();
    assert!(
        broken.contains("token_command sh: exit status: 3 for broken@example.com: no vault"),
        "{broken}"
    );
}

/// A token that lapses in the middle of one account's copy: the source drops
/// the session (`doveadm kick`) after the 2 s token has expired, and the
/// reconnect must log in with a new one (the old one is refused by then, so
/// reusing it would end the account). The copy resumes and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lapsing_mid_copy_is_refreshed_on_the_reconnect() {
    let tokens = token_server(2);
    let (source, _conf) = oauth_dovecot(&tokens);
    let target = Dovecot::start(Flavor::Source, &USERS);
    let mut s = login(source.port, APP_USER).await;
    for i in 0..100 {
        let body = format!("refresh {i}\r\n{}", "z".repeat(2_000));
        append(
            &mut s,
            "INBOX",
            "(\\Seen)",
            "28-Nov-2026 10:00:00 +0000",
            &message(Some(&format!("<r{i}@x>")), "r", &body),
        )
        .await;
    }
    s.logout().await.unwrap();
    let grant = Arc::new(TokenSource::ClientCredentials {
        url: tokens.token_url(),
        client_id: CLIENT_ID.into(),
        client_secret: CLIENT_SECRET.into(),
        scope: None,
        tls_insecure: false,
        cache: Default::default(),
    });
    let mut ep = endpoints(&source, &target, Auth::XOAuth2(grant));
    // About 200 kB at 25 kB/s: the copy lasts well past the token's 2 s.
    ep.source.limits = Arc::new(godwit_imap::limits::ServerLimits::new(8, Some(25_000)));
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let started = Instant::now();
    let sync = {
        let (store, ep) = (store.clone(), ep.clone());
        tokio::spawn(async move {
            sync_account(
                &store,
                &ep,
                APP_USER,
                &no_password(APP_USER),
                &login_of(APP_USER),
                &SyncOptions {
                    parallel_folders: 1,
                    ..Default::default()
                },
                Arc::new(Default::default()),
            )
            .await
        })
    };
    while started.elapsed() < Duration::from_millis(2300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !sync.is_finished(),
        "the copy ended before the token lapsed"
    );
    assert_eq!(tokens.issued(), 1, "one token until it is due");
    source.doveadm(&["kick", APP_USER]);
    let report = sync.await.unwrap();
    assert_eq!(report.error, None, "{report:#?}");
    assert!(report.reconnects >= 1, "the kick was noticed: {report:#?}");
    assert!(tokens.issued() >= 2, "no new token after the lapse");
    let mut t = login(target.port, APP_USER).await;
    assert_eq!(count(&mut t, "INBOX").await, 100);
    t.logout().await.unwrap();
    // The first token was dead when the reconnect logged in.
    let answer = tokens.post("/introspect", "token=cc-1");
    assert_eq!(answer, serde_json::json!({"active": false}), "{answer}");
}
