//! Issue 18: a 50 MB message never needs 50 MB in memory. `godwit sync`
//! copies two 50 MB messages (and a small one) Dovecot → Dovecot, and verifies
//! them; its peak resident set (VmHWM in /proc/PID/status, read while it
//! runs) grows by well under one
//! message's size over a sync of one small message (the binary's own pages
//! and runtime, ~20 MB for a debug build), and Python's imaplib reads back
//! copies byte-identical to what was written.

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use imap_common::{Dovecot, Flavor, PASSWORD};
use sha2::{Digest, Sha256};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const USER: &str = "big@example.com";
const SMALL: &str = "small@example.com";
const MB: usize = 1 << 20;
const SIZE: usize = 50 * MB;

/// A message of `size` bytes: headers, then base64-like lines that differ
/// per message and per line (no two messages share a digest).
fn big_message(n: usize, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: a@example.com\r\nTo: {USER}\r\nSubject: big {n}\r\nMessage-ID: <big{n}@x>\r\n\
         MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut line = 0usize;
    while m.len() + 78 <= size {
        m.extend((0..76).map(|i| alphabet[(i * 7 + line * 13 + n * 31) % 64]));
        m.extend_from_slice(b"\r\n");
        line += 1;
    }
    m.resize(size - 2, b'A');
    m.extend_from_slice(b"\r\n");
    m
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// kB from a /proc/PID/status line such as "VmHWM:   12345 kB".
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `godwit sync --mailbox ADDRESS` (with its verify) and returns its
/// peak resident set in kB: VmHWM as last read from /proc/PID/status while it
/// ran (VmHWM only grows, and covers the new image only: ru_maxrss from wait4
/// would also count the test process's pages at the fork).
fn peak_of_sync(config: &std::path::Path, mailbox: &str) -> u64 {
    let mut child = Command::new(godwit_bin())
        .args(["sync", "--no-progress", "--mailbox", mailbox, "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut hwm_kb = 0;
    loop {
        if let Some(kb) = status_kb(pid, "VmHWM:") {
            hwm_kb = hwm_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(status.success(), "godwit sync failed: {out}{err}");
            assert!(hwm_kb > 0, "VmHWM was read while godwit ran");
            return hwm_kb;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fifty_megabyte_messages_are_copied_in_bounded_memory_and_intact() {
    let src = Dovecot::start(Flavor::Source, &[USER, SMALL]);
    let dst = Dovecot::start(Flavor::Exchange, &[USER, SMALL]);
    // Written straight into the source's maildir (cur/, flags in the name,
    // RFC-less but Dovecot's own format): far faster than APPENDing 100 MB.
    let cur = src.mail_dir().join("mail").join(USER).join("cur");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(src.mail_dir().join("mail").join(USER).join(sub)).unwrap();
    }
    let mut written = Vec::new();
    for n in 0..3 {
        let body = if n == 1 {
            imap_common::message(Some("<small@x>"), "small", "between the big ones")
        } else {
            big_message(n, SIZE)
        };
        std::fs::write(cur.join(format!("17000000{n:02}.M{n}P1.test:2,S")), &body).unwrap();
        written.push(sha(&body));
    }
    let small = src.mail_dir().join("mail").join(SMALL);
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(small.join(sub)).unwrap();
    }
    std::fs::write(
        small.join("cur").join("1700000000.M9P1.test:2,S"),
        imap_common::message(Some("<only@x>"), "only", "one small message"),
    )
    .unwrap();
    Command::new("chown")
        .args(["-R", "vmail:vmail"])
        .arg(src.mail_dir().join("mail"))
        .status()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("accounts.csv"),
        format!("{USER},{USER},{PASSWORD},{USER},{PASSWORD}\n{SMALL},{SMALL},{PASSWORD},{SMALL},{PASSWORD}\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("godwit.toml"),
        format!(
            "hostname = \"gw.test\"\ndata_dir = \"{}\"\n[domains]\naccepted = [\"example.com\"]\n\
             [platforms.old]\nrelay = [\"127.0.0.1:1\"]\n[sync]\naccounts = \"{}\"\ncommand_timeout = \"60s\"\n\
             [sync.source]\nurl = \"{}\"\n[sync.target]\nurl = \"{}\"\n",
            d.join("data").display(),
            d.join("accounts.csv").display(),
            src.url(),
            dst.url()
        ),
    )
    .unwrap();
    // The binary's own pages and runtime: the peak of a sync of one small message.
    let small_hwm = peak_of_sync(&d.join("godwit.toml"), SMALL);
    let hwm = peak_of_sync(&d.join("godwit.toml"), USER);
    eprintln!(
        "godwit sync peak RSS (VmHWM): one small message {small_hwm} kB, two 50 MB messages {hwm} kB"
    );
    let limit_kb = (SIZE / 4 / 1024) as u64;
    assert!(
        hwm.saturating_sub(small_hwm) < limit_kb,
        "the 50 MB messages took VmHWM from {small_hwm} to {hwm} kB: not well below one message"
    );

    // Byte for byte, by imaplib.
    let got = python(
        r#"
import imaplib, hashlib, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login(sys.argv[2], sys.argv[3])
m.select("INBOX", readonly=True)
typ, data = m.uid("FETCH", "1:*", "(BODY.PEEK[])")
print(" ".join(sorted(hashlib.sha256(p[1]).hexdigest() for p in data if isinstance(p, tuple))))
"#,
        &[&dst.port.to_string(), USER, PASSWORD],
    );
    let mut want = written.clone();
    want.sort();
    assert_eq!(got.trim(), want.join(" "));
}
