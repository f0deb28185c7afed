//! Real peers for the preflight tests: dnsmasq, Postfix, Dovecot, each started
//! on 127.0.0.1 on a port reserved by `port` (nextest runs every test in its
//! own process, in parallel, beside other crates' tests) and stopped by a Drop
//! guard, even on panic.
#![allow(dead_code)]

use godwit_check::finding::{Finding, Severity};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child process group when dropped.
pub struct Guard {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The loopback port this test process uses for `slot`. Slots are the
/// numbers the tests name their peers by; each is mapped, once per process,
/// to a port reserved by the workspace's one allocator, so no two test
/// processes of any crate ever share one.
pub fn port(slot: u16) -> u16 {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static PORTS: OnceLock<Mutex<HashMap<u16, u16>>> = OnceLock::new();
    *PORTS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(slot)
        .or_insert_with(godwit_testkit::free_port)
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within 15s");
}

/// A dnsmasq serving only the records given in `args` (`--mx-host=...`,
/// `--txt-record=...`, `--host-record=...`), authoritative-style for the test
/// domains so that a missing name is NXDOMAIN rather than REFUSED.
pub fn dnsmasq(port: u16, ttl: u32, args: &[String]) -> Guard {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        &format!("--port={port}"),
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--no-negcache",
        "--user=root",
        "--pid-file=",
        &format!("--local-ttl={ttl}"),
        "--local=/example.com/",
        "--local=/example.net/",
        "--local=/example/",
        "--local=/test/",
    ])
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .expect("dnsmasq is installed (apt-get install dnsmasq)");
    let guard = Guard {
        child,
        name: "dnsmasq",
    };
    wait_for_port(port, "dnsmasq");
    guard
}

/// `--txt-record` for a long value: split into character-strings of at most 255
/// octets (RFC 1035 3.3.14), which resolvers concatenate again. No quotes: without
/// a shell, dnsmasq keeps them as part of the text (so values must not hold commas).
pub fn txt(name: &str, value: &str) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(250)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}

pub fn find<'a>(findings: &'a [Finding], check: &str, subject_contains: &str) -> Vec<&'a Finding> {
    findings
        .iter()
        .filter(|f| f.check == check && f.subject.contains(subject_contains))
        .collect()
}

/// The single finding `check` about `subject`; panics with all findings otherwise.
pub fn one<'a>(findings: &'a [Finding], check: &str, subject_contains: &str) -> &'a Finding {
    let got = find(findings, check, subject_contains);
    assert_eq!(
        got.len(),
        1,
        "expected one {check} for {subject_contains}, findings: {findings:#?}"
    );
    got[0]
}

pub fn assert_sev(f: &Finding, sev: Severity) {
    assert_eq!(
        f.severity, sev,
        "{} ({}): {} / {}",
        f.check, f.subject, f.meaning, f.action
    );
}

/// An RSA public key (SubjectPublicKeyInfo, base64) of `bits` bits, made by openssl.
pub fn rsa_public_key_b64(dir: &Path, bits: u32) -> String {
    let key = dir.join(format!("rsa{bits}.pem"));
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg(bits.to_string())
        .stderr(Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl genrsa {bits}");
    let out = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&key)
        .stderr(Stdio::null())
        .output()
        .expect("openssl rsa -pubout");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

/// A private Postfix instance (its own config, queue and log under `dir`) with
/// one smtpd per entry of `services`: `(port, extra -o options)`. Mail for
/// example.com is accepted and discarded; other domains are relay-denied,
/// because 127.0.0.1 is deliberately outside mynetworks.
pub struct Postfix {
    pub dir: std::path::PathBuf,
}

impl Postfix {
    pub fn start(dir: &Path, services: &[(u16, Vec<String>)]) -> Postfix {
        use std::os::unix::fs::PermissionsExt;
        // Postfix's daemons run as user postfix and must reach the queue.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.display();
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .unwrap();
        assert!(chown.success(), "chown postfix (is Postfix installed?)");
        std::fs::write(
            dir.join("etc/main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.test.example
mydomain = test.example
myorigin = test.example
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 192.0.2.0/24
relay_domains = example.com
relay_transport = discard:
default_transport = discard:
local_transport = discard:
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_tls_security_level = may
maillog_file_prefixes = /var, /dev/stdout, /tmp
maillog_file = {d}/maillog
alias_maps =
alias_database =
biff = no
"
            ),
        )
        .unwrap();
        // Debian's service table, with nothing chrooted (the chroot would lack
        // our files) and our smtpd listeners instead of port 25.
        let dist = std::fs::read_to_string("/usr/share/postfix/master.cf.dist").unwrap();
        let mut master = String::new();
        for line in dist
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
        {
            let mut f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || (f[0] == "smtp" && f[1] == "inet") || f[7] == "pipe" {
                continue;
            }
            if f[4] == "y" {
                f[4] = "n";
            }
            master.push_str(&f.join(" "));
            master.push('\n');
        }
        for (port, opts) in services {
            master.push_str(&format!("127.0.0.1:{port} inet n - n - - smtpd\n"));
            for o in opts {
                master.push_str(&format!("  -o {o}\n"));
            }
        }
        std::fs::write(dir.join("etc/master.cf"), master).unwrap();
        let pf = Postfix {
            dir: dir.to_path_buf(),
        };
        // Not output(): a daemon that inherits the pipes would hold them open.
        let status = Command::new("postfix")
            .arg("-c")
            .arg(dir.join("etc"))
            .arg("start")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("start.err")).unwrap())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "postfix start failed: {}\n{}",
            std::fs::read_to_string(dir.join("start.err")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("maillog")).unwrap_or_default()
        );
        for (port, _) in services {
            wait_for_port(*port, "postfix smtpd");
        }
        pf
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (postlogd writes asynchronously).
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.join("etc"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // `postfix stop` only signals the master: wait for it to go, so the
        // temporary directory can be removed and the ports reused.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("queue/pid/master.pid")) {
            let pid = pid.trim();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Test certificates made with rcgen: a private CA and leaves signed by it.
pub struct TestPki {
    pub ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    pub fn new() -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "godwit test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        TestPki { ca }
    }

    /// Writes `NAME.crt` (leaf, then the CA) and `NAME.key` into `dir`; the
    /// validity is given in days relative to now.
    pub fn leaf(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        from_days: i64,
        to_days: i64,
        self_signed: bool,
    ) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, sans[0]);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from_days);
        params.not_after = now + time::Duration::days(to_days);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = if self_signed {
            params.self_signed(&key).unwrap().pem()
        } else {
            params.signed_by(&key, &self.ca).unwrap().pem() + &self.ca.pem()
        };
        let crt = dir.join(format!("{name}.crt"));
        let keyf = dir.join(format!("{name}.key"));
        std::fs::write(&crt, pem).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        (crt.display().to_string(), keyf.display().to_string())
    }

    pub fn ca_file(&self, dir: &Path) -> std::path::PathBuf {
        let p = dir.join("ca.pem");
        std::fs::write(&p, self.ca.pem()).unwrap();
        p
    }
}

pub fn tls_opts(cert: &(String, String)) -> Vec<String> {
    vec![
        format!("smtpd_tls_cert_file={}", cert.0),
        format!("smtpd_tls_key_file={}", cert.1),
    ]
}

/// A private Dovecot (config, state and mail under `dir`) serving IMAP on
/// 127.0.0.1:`port` for alice@example.com / secret. `special_use` adds
/// Exchange-style special-use folders; `plugins` enables the zlib plugins so
/// COMPRESS=DEFLATE is advertised.
pub struct Dovecot {
    pub dir: std::path::PathBuf,
    conf: std::path::PathBuf,
}

impl Dovecot {
    pub fn start(dir: &Path, port: u16, special_use: bool) -> Dovecot {
        Self::start_with(dir, port, special_use, None)
    }

    /// As `start`, plus implicit TLS (imaps) on `tls.0` with the certificate
    /// and key files `tls.1`.
    pub fn start_with(
        dir: &Path,
        port: u16,
        special_use: bool,
        tls: Option<(u16, (String, String))>,
    ) -> Dovecot {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.display();
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let ok = Command::new("chown")
            .args(["-R", "vmail:vmail"])
            .arg(dir.join("mail"))
            .status()
            .unwrap();
        assert!(ok.success(), "chown vmail (useradd -m vmail)");
        std::fs::write(dir.join("users"), "alice@example.com:{PLAIN}secret::::::\n").unwrap();
        let mailboxes = if special_use {
            r#"  mailbox "Sent Items" {
    special_use = \Sent
    auto = create
  }
  mailbox "Deleted Items" {
    special_use = \Trash
    auto = create
  }
  mailbox Drafts {
    special_use = \Drafts
    auto = create
  }
  mailbox "Junk Email" {
    special_use = \Junk
    auto = create
  }
  mailbox Archive {
    special_use = \Archive
    auto = create
  }
"#
        } else {
            ""
        };
        let (ssl, imaps_port) = match &tls {
            Some((p, (crt, key))) => (
                format!("ssl = yes\nssl_cert = <{crt}\nssl_key = <{key}"),
                *p,
            ),
            None => ("ssl = no".to_string(), 0),
        };
        let conf = dir.join("dovecot.conf");
        std::fs::write(
            &conf,
            format!(
                r#"protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{d}/mail/%u
mail_uid = vmail
mail_gid = vmail
first_valid_uid = 100
mail_plugins = zlib
service imap-login {{
  chroot =
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    user = root
  }}
  unix_listener stats-writer {{
    user = root
  }}
}}
protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={d}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = .
{mailboxes}}}
"#
            ),
        )
        .unwrap();
        // Not output(): the daemon inherits the pipes and would hold them open.
        let status = Command::new("dovecot")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("start.err")).unwrap())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "dovecot failed: {}",
            std::fs::read_to_string(dir.join("start.err")).unwrap_or_default()
        );
        let dv = Dovecot {
            dir: dir.to_path_buf(),
            conf,
        };
        wait_for_port(port, "dovecot");
        if let Some((p, _)) = &tls {
            wait_for_port(*p, "dovecot imaps");
        }
        dv
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stderr(Stdio::null())
            .status();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/master.pid")) {
            let pid = pid.trim();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
