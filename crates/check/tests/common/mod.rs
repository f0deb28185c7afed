//! Real peers for the preflight tests: dnsmasq, Postfix, Dovecot, each started
//! on 127.0.0.1 with a fixed high port per test (nextest runs every test in its
//! own process, in parallel) and stopped by a Drop guard, even on panic.
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
