//! Private Dovecot instances for the sync tests, and an independent IMAP reader
//! (plain async-imap, no godwit code) to check what each server holds.
#![allow(dead_code)]

use async_imap::Session;
use futures::TryStreamExt;
use godwit_testkit::free_port;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub const PASSWORD: &str = "secret";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavor {
    /// separator '.', maildir++, Sent/Drafts/Trash/Junk/Archive with attributes.
    Source,
    /// separator '/', LAYOUT=fs, Exchange names: Sent Items, Deleted Items, Junk Email.
    Exchange,
    /// Courier-style: every folder under the `INBOX.` namespace prefix, no special-use attributes.
    Courier,
}

pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    pub conf: PathBuf,
    /// Implicit-TLS port when started with `start_tls` (0 otherwise).
    pub imaps_port: u16,
}

impl Dovecot {
    pub fn start(flavor: Flavor, users: &[&str]) -> Dovecot {
        Self::start_with(flavor, users, "")
    }

    pub fn start_with(flavor: Flavor, users: &[&str], extra: &str) -> Dovecot {
        Self::start_full(flavor, users, extra, false)
    }

    /// With a self-signed certificate: STARTTLS on `port`, implicit TLS on `imaps_port`.
    pub fn start_tls(flavor: Flavor, users: &[&str]) -> Dovecot {
        Self::start_full(flavor, users, "", true)
    }

    /// Retries on a new port when another process took the chosen one between
    /// `free_port` and Dovecot's bind (tests of several crates run in parallel).
    fn start_full(flavor: Flavor, users: &[&str], extra: &str, tls: bool) -> Dovecot {
        for _ in 0..5 {
            if let Some(d) = Self::try_start(flavor, users, extra, tls) {
                return d;
            }
        }
        panic!("dovecot did not start on five ports");
    }

    fn try_start(flavor: Flavor, users: &[&str], extra: &str, tls: bool) -> Option<Dovecot> {
        let dir = tempfile::Builder::new()
            .prefix("godwit-dovecot-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        // Dovecot's mail processes run as vmail and must reach the mail folder.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        Command::new("chown")
            .args(["-R", "vmail:vmail"])
            .arg(d.join("mail"))
            .status()
            .unwrap();
        let users_file: String = users
            .iter()
            .map(|u| format!("{u}:{{PLAIN}}{PASSWORD}::::::\n"))
            .collect();
        std::fs::write(d.join("users"), users_file).unwrap();
        std::fs::write(
            d.join("masters"),
            format!("admin:{{PLAIN}}{PASSWORD}::::::\n"),
        )
        .unwrap();
        let prefix = if flavor == Flavor::Courier {
            "  prefix = INBOX.\n"
        } else {
            ""
        };
        let (sep, layout, specials): (&str, &str, &[(&str, &str)]) = match flavor {
            Flavor::Courier => (".", "", &[]),
            Flavor::Source => (
                ".",
                "",
                &[
                    ("Sent", "Sent"),
                    ("Drafts", "Drafts"),
                    ("Trash", "Trash"),
                    ("Junk", "Junk"),
                    ("Archive", "Archive"),
                ],
            ),
            Flavor::Exchange => (
                "/",
                ":LAYOUT=fs",
                &[
                    ("Sent Items", "Sent"),
                    ("Drafts", "Drafts"),
                    ("Deleted Items", "Trash"),
                    ("Junk Email", "Junk"),
                ],
            ),
        };
        let mailboxes: String = specials
            .iter()
            .map(|(name, usage)| format!("  mailbox \"{name}\" {{\n    special_use = \\{usage}\n    auto = create\n  }}\n"))
            .collect();
        let port = free_port();
        let (ssl, imaps_port) = if tls {
            let cert = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            std::fs::write(d.join("cert.pem"), cert.cert.pem()).unwrap();
            std::fs::write(d.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
            let p = free_port();
            (
                format!(
                    "ssl = yes\nssl_cert = <{0}/cert.pem\nssl_key = <{0}/key.pem",
                    d.display()
                ),
                p,
            )
        } else {
            ("ssl = no".to_string(), 0)
        };
        let conf = format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 100
mail_location = maildir:{d}/mail/%u{layout}
mail_max_userip_connections = 50
auth_master_user_separator = *
namespace inbox {{
  inbox = yes
  separator = {sep}
{prefix}{mailboxes}
}}
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN username_format=%u {d}/masters
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
{extra}
"#,
            d = d.display()
        );
        let conf_path = d.join("dovecot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("dovecot")
            .arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .spawn()
            .expect("dovecot starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if child.try_wait().unwrap().is_some() {
                return None; // the port was taken: try another
            }
            assert!(Instant::now() < deadline, "dovecot did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whoever answered must be our Dovecot, still running.
        std::thread::sleep(Duration::from_millis(100));
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        Some(Dovecot {
            dir,
            port,
            child,
            conf: conf_path,
            imaps_port,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("imap://127.0.0.1:{}", self.port)
    }

    pub fn doveadm(&self, args: &[&str]) -> String {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "doveadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn mail_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM to the master; it stops its children before exiting.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type Imap = Session<TcpStream>;

/// A plain IMAP session, independent of godwit's connection code.
pub async fn login(port: u16, user: &str) -> Imap {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await.unwrap();
    client
        .login(user, PASSWORD)
        .await
        .map_err(|(e, _)| e)
        .unwrap()
}

pub async fn create(s: &mut Imap, name: &str) {
    s.create(godwit_imap::utf7::encode(name)).await.unwrap();
}

/// APPENDs through async-imap's own path (synchronizing literal).
pub async fn append(s: &mut Imap, folder: &str, flags: &str, date: &str, body: &[u8]) {
    s.append(
        godwit_imap::utf7::encode(folder),
        Some(flags),
        Some(&format!("\"{date}\"")),
        body,
    )
    .await
    .unwrap();
}

/// One message as a server holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub sha256: String,
    pub flags: String,
    pub internal_date: i64,
    pub size: usize,
}

/// Folder (Unicode) -> sorted messages.
pub async fn dump(s: &mut Imap) -> BTreeMap<String, Vec<Held>> {
    let names: Vec<_> = s
        .list(Some(""), Some("*"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    // imap-proto leaves RFC 3501 4.3 quoted-string escapes in place.
    let selectable = |n: &&async_imap::types::Name| {
        !n.attributes().iter().any(|a| {
            matches!(a, async_imap::types::NameAttribute::NoSelect)
                || matches!(a, async_imap::types::NameAttribute::Extension(e) if e.eq_ignore_ascii_case("\\NonExistent"))
        })
    };
    let folders: Vec<String> = names
        .iter()
        .filter(selectable)
        .map(|n| n.name().replace("\\\"", "\"").replace("\\\\", "\\"))
        .collect();
    let mut out = BTreeMap::new();
    for wire in folders {
        let mbox = s.examine(&wire).await.unwrap();
        let mut held = Vec::new();
        if mbox.exists > 0 {
            let fetches: Vec<_> = s
                .fetch("1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            for f in &fetches {
                let body = f.body().unwrap();
                let mut flags: Vec<String> = f
                    .flags()
                    .filter(|f| !matches!(f, async_imap::types::Flag::Recent))
                    .map(|f| format!("{f:?}"))
                    .collect();
                flags.sort();
                held.push(Held {
                    sha256: Sha256::digest(body)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                    flags: flags.join(" "),
                    internal_date: f.internal_date().unwrap().timestamp(),
                    size: body.len(),
                });
            }
        }
        held.sort();
        out.insert(godwit_imap::utf7::decode(&wire).unwrap(), held);
    }
    while s.unsolicited_responses.try_recv().is_ok() {}
    out
}

pub async fn count(s: &mut Imap, folder: &str) -> u32 {
    s.status(godwit_imap::utf7::encode(folder), "(MESSAGES)")
        .await
        .unwrap()
        .exists
}

pub fn message(id: Option<&str>, subject: &str, body: &str) -> Vec<u8> {
    let mut m = String::new();
    m.push_str("From: Alice <alice@example.com>\r\nTo: bob@example.com\r\n");
    m.push_str(&format!(
        "Subject: {subject}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    ));
    if let Some(id) = id {
        m.push_str(&format!("Message-ID: {id}\r\n"));
    }
    m.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    m.push_str(body);
    m.push_str("\r\n");
    m.into_bytes()
}

/// A multipart message with a base64 attachment of `size` bytes.
pub fn with_attachment(id: &str, size: usize) -> Vec<u8> {
    use base64::Engine;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 13) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let mut m = format!(
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: attachment\r\nMessage-ID: {id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\nPièce jointe ci-dessous — Grüße\r\n--XX\r\nContent-Type: application/octet-stream\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"data.bin\"\r\n\r\n"
    );
    for chunk in b64.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(chunk).unwrap());
        m.push_str("\r\n");
    }
    m.push_str("--XX--\r\n");
    m.into_bytes()
}

pub async fn store(dir: &Path) -> godwit_store::Store {
    godwit_store::Store::open(&format!(
        "sqlite://{}?mode=rwc",
        dir.join("state.db").display()
    ))
    .await
    .unwrap()
}

pub fn endpoints(
    source: &Dovecot,
    target: &Dovecot,
    max_connections: usize,
) -> godwit_imap::engine::Endpoints {
    let mk = |d: &Dovecot| {
        let mut s = godwit_imap::conn::Server::from_url(&d.url()).unwrap();
        s.limits = std::sync::Arc::new(godwit_imap::limits::ServerLimits::new(
            max_connections,
            None,
        ));
        s
    };
    godwit_imap::engine::Endpoints {
        source: mk(source),
        target: mk(target),
        overrides: Default::default(),
        exclude: vec![],
        acls: false,
        acl_users: Default::default(),
    }
}

/// One account synced with the defaults, logging in as the user on both
/// sides: what most tests run.
#[allow(dead_code)] // not every test binary syncs
pub async fn sync_user(
    store: &godwit_store::Store,
    ep: &godwit_imap::engine::Endpoints,
    user: &str,
) -> godwit_imap::engine::AccountReport {
    godwit_imap::engine::sync_account(
        store,
        ep,
        user,
        &login_of(user),
        &login_of(user),
        &Default::default(),
        std::sync::Arc::new(Default::default()),
    )
    .await
}

pub fn login_of(user: &str) -> godwit_imap::conn::Login {
    godwit_imap::conn::Login {
        user: user.into(),
        password: PASSWORD.into(),
    }
}
