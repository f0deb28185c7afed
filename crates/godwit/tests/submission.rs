//! The submission listener against real peers: swaks as the client (STARTTLS
//! and implicit TLS, AUTH PLAIN and LOGIN), passwd-file hashes made by
//! Dovecot's own `doveadm pw`, two Dovecots as the platforms that
//! auth = "platform" asks, and smtp-sink as the platforms' relays.

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use imap_common::{Dovecot, Flavor, PASSWORD};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(30);

/// `doveadm pw -s SCHEME -p PASSWORD`: a hash exactly as Dovecot writes it.
fn doveadm_pw(scheme: &str, password: &str) -> String {
    let out = Command::new("doveadm")
        .args(["pw", "-s", scheme, "-p", password])
        .output()
        .expect("doveadm (Debian dovecot-core) is a test peer: run scripts/install-peers");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A self-signed certificate for 127.0.0.1; returns the smtp.tls_* lines.
fn cert(dir: &Path) -> String {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cp, kp) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cp, c.cert.pem()).unwrap();
    std::fs::write(&kp, c.signing_key.serialize_pem()).unwrap();
    format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cp.display(),
        kp.display()
    )
}

/// Runs swaks; returns its whole transcript and how long it took.
fn swaks(args: &[&str]) -> (String, Duration) {
    let start = Instant::now();
    let out = Command::new("swaks")
        .args(args)
        .args(["--timeout", "30"])
        .output()
        .expect("swaks is a test peer: run scripts/install-peers");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, start.elapsed())
}

/// swaks with STARTTLS (or implicit TLS) and AUTH as `user`.
fn submit(
    port: u16,
    tls: &str,
    mech: &str,
    user: &str,
    pw: &str,
    extra: &[&str],
) -> (String, Duration) {
    let server = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--server",
        &server,
        tls,
        "--auth",
        mech,
        "--auth-user",
        user,
        "--auth-password",
        pw,
    ];
    args.extend_from_slice(extra);
    swaks(&args)
}

fn wait_port(port: u16) {
    wait_for("the submission listener", T, || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// A raw client: the whole (multi-line) reply to each command.
struct Raw {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut r = Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        assert!(r.reply().starts_with("220"));
        r
    }

    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        self.reply()
    }
}

fn b64(s: &str) -> String {
    // RFC 4648 base64 without a crate: the tests drive the wire themselves.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every log the gateway writes: stderr, the event log, the Postfix-style log.
fn all_logs(gw: &Gateway, maillog: &Path) -> String {
    let mut s = std::fs::read_to_string(gw.data.with_extension("log")).unwrap_or_default();
    for e in gw.events() {
        s.push_str(&e.to_string());
        s.push('\n');
    }
    s.push_str(&std::fs::read_to_string(maillog).unwrap_or_default());
    s
}

struct FileSetup {
    gw: Gateway,
    sub: u16,
    subs: u16,
    maillog: std::path::PathBuf,
    sinks: (Sink, Sink),
    _dir: tempfile::TempDir,
}

const ARGON_PW: &str = "argon-Pw-4711";
const SHA_PW: &str = "sha512-Pw-0815";

fn file_setup(submission_extra: &str) -> FileSetup {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "argon@example.com:{}::::::\nsha512@example.com:{}::::::\n",
            doveadm_pw("ARGON2ID", ARGON_PW),
            doveadm_pw("SHA512-CRYPT", SHA_PW)
        ),
    )
    .unwrap();
    let (po, pn) = (free_port(), free_port());
    let sinks = (Sink::start(po, &[]), Sink::start(pn, &[]));
    let (sub, subs) = (free_port(), free_port());
    let maillog = dir.path().join("maillog");
    let gw = Gateway::start(
        po,
        pn,
        &cert(dir.path()),
        &format!(
            "[submission]\nlisten = [\"127.0.0.1:{sub}\"]\nlisten_tls = [\"127.0.0.1:{subs}\"]\nauth = \"file\"\nusers_file = \"{}\"\n{submission_extra}\n[events]\npostfix_log = \"{}\"\n",
            users.display(),
            maillog.display()
        ),
    );
    wait_port(sub);
    wait_port(subs);
    FileSetup {
        gw,
        sub,
        subs,
        maillog,
        sinks,
        _dir: dir,
    }
}

#[test]
fn file_auth_over_starttls_and_implicit_tls_with_the_open_relay_rules() {
    let s = file_setup("auth_failure_delay = \"1s\"\n");

    // STARTTLS, AUTH PLAIN with an {ARGON2ID} user: accepted, routed to a
    // platform like any mail for our domains, trace says ESMTPSA.
    let (out, _) = submit(
        s.sub,
        "--tls",
        "PLAIN",
        "argon@example.com",
        ARGON_PW,
        &[
            "--from",
            "argon@example.com",
            "--to",
            "bob@example.com",
            "--header",
            "Subject: via-plain",
        ],
    );
    assert!(out.contains("<~  235 2.7.0"), "{out}");
    assert!(out.contains("<~  250 2.0.0 Ok: queued as"), "{out}");
    // Implicit TLS (RFC 8314), AUTH LOGIN with a {SHA512-CRYPT} user.
    let (out, _) = submit(
        s.subs,
        "--tlsc",
        "LOGIN",
        "sha512@example.com",
        SHA_PW,
        &[
            "--from",
            "sha512@example.com",
            "--to",
            "bob@example.com",
            "--header",
            "Subject: via-login",
        ],
    );
    assert!(out.contains("<~  235 2.7.0"), "{out}");
    assert!(out.contains("<~  250 2.0.0 Ok: queued as"), "{out}");
    wait_for("both messages at the platform", T, || {
        (s.sinks.0.count_containing("Subject: via-plain") == 1
            && s.sinks.0.count_containing("Subject: via-login") == 1)
            .then_some(())
    });
    let m = s
        .sinks
        .0
        .messages()
        .into_iter()
        .find(|m| m.contains("via-plain"))
        .unwrap();
    assert!(m.contains("with ESMTPSA"), "{m}");

    // Authenticated: a foreign recipient is accepted for relaying.
    let (out, _) = submit(
        s.sub,
        "--tls",
        "PLAIN",
        "argon@example.com",
        ARGON_PW,
        &[
            "--from",
            "argon@example.com",
            "--to",
            "someone@foreign.test",
            "--quit-after",
            "RCPT",
        ],
    );
    assert!(out.contains("<~  250 2.1.5"), "{out}");
    // The inbound listener keeps refusing foreign recipients exactly as before.
    let mx = format!("127.0.0.1:{}", s.gw.port);
    let (out, _) = swaks(&[
        "--server",
        &mx,
        "--from",
        "argon@example.com",
        "--to",
        "someone@foreign.test",
        "--quit-after",
        "RCPT",
    ]);
    assert!(
        out.contains("<** 554 5.7.1 <someone@foreign.test>: Relay access denied"),
        "{out}"
    );
    // ... and offers no AUTH at all.
    let mut raw = Raw::connect(s.gw.port);
    let ehlo = raw.cmd("EHLO c.test");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");

    // Before TLS: STARTTLS, no AUTH; AUTH gets 538 and MAIL gets 530.
    let mut raw = Raw::connect(s.sub);
    let ehlo = raw.cmd("EHLO c.test");
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let plain = b64(&format!("\0argon@example.com\0{ARGON_PW}"));
    let r = raw.cmd(&format!("AUTH PLAIN {plain}"));
    assert!(r.starts_with("538 5.7.11"), "{r}");
    let r = raw.cmd("MAIL FROM:<argon@example.com>");
    assert!(r.starts_with("530 5.7.0 Authentication required"), "{r}");
    // Under TLS without AUTH: 530 as well.
    let sub = format!("127.0.0.1:{}", s.sub);
    let (out, _) = swaks(&[
        "--server",
        &sub,
        "--tls",
        "--from",
        "argon@example.com",
        "--to",
        "bob@example.com",
        "--quit-after",
        "MAIL",
    ]);
    assert!(
        out.contains("<~* 530 5.7.0 Authentication required"),
        "{out}"
    );

    // A wrong password: 535 5.7.8, after the one-second delay.
    let wrong = "Wrong-Horse-Battery";
    let (out, took) = submit(
        s.sub,
        "--tls",
        "PLAIN",
        "argon@example.com",
        wrong,
        &["--quit-after", "AUTH"],
    );
    assert!(out.contains("<~* 535 5.7.8"), "{out}");
    assert!(took >= Duration::from_secs(1), "{took:?}");

    // Sending as someone else: 553 5.7.1 at MAIL FROM, and for a header From.
    let (out, _) = submit(
        s.sub,
        "--tls",
        "PLAIN",
        "argon@example.com",
        ARGON_PW,
        &["--from", "bob@example.com", "--to", "bob@example.com"],
    );
    assert!(out.contains("<~* 553 5.7.1 <bob@example.com>: Sender address rejected: not owned by user argon@example.com"), "{out}");
    let (out, _) = submit(
        s.subs,
        "--tlsc",
        "PLAIN",
        "argon@example.com",
        ARGON_PW,
        &[
            "--from",
            "argon@example.com",
            "--to",
            "bob@example.com",
            "--h-From",
            "Bob <bob@example.com>",
            "--header",
            "Subject: forged-from",
        ],
    );
    assert!(
        out.contains(
            "<~* 553 5.7.1 Header From <bob@example.com> is not owned by user argon@example.com"
        ),
        "{out}"
    );

    // Evidence: events, metrics by listener and reason, Postfix-style lines.
    let auths = s.gw.events_named("submission.auth");
    assert!(
        auths.iter().any(|e| e["result"] == "ok"
            && e["listener"] == "submission_tls"
            && e["method"] == "LOGIN"
            && e["user"] == "sha512@example.com"),
        "{auths:?}"
    );
    assert!(
        auths.iter().any(|e| e["result"] == "failed"
            && e["reason"] == "auth"
            && e["user"] == "argon@example.com"),
        "{auths:?}"
    );
    let (_, metrics) = s.gw.admin_get("/metrics");
    let line = |want: &[&str]| {
        metrics.lines().any(|l| {
            l.starts_with("godwit_submission_auth_total{") && want.iter().all(|w| l.contains(w))
        })
    };
    assert!(
        line(&[
            "listener=\"submission\"",
            "result=\"failed\"",
            "reason=\"auth\""
        ]),
        "{metrics}"
    );
    assert!(
        line(&["listener=\"submission_tls\"", "result=\"ok\""]),
        "{metrics}"
    );
    wait_for("the Postfix-style log lines", T, || {
        let log = std::fs::read_to_string(&s.maillog).unwrap_or_default();
        (log.contains("sasl_method=PLAIN, sasl_username=argon@example.com")
            && log.contains("sasl_method=LOGIN, sasl_username=sha512@example.com")
            && log.contains(
                "SASL PLAIN authentication failed: auth, sasl_username=argon@example.com",
            ))
        .then_some(())
    });
    let logs = all_logs(&s.gw, &s.maillog);
    for secret in [wrong, ARGON_PW, SHA_PW] {
        assert!(!logs.contains(secret), "a password is in the logs");
    }
}

#[test]
fn repeated_failures_lock_the_ip_out_and_the_log_names_the_user_not_the_password() {
    let s = file_setup(
        "auth_failure_delay = \"100ms\"\nmax_failures_per_ip = 3\nfailure_window = \"10m\"\n",
    );
    let guesses = ["guess-Aardvark-1", "guess-Badger-2", "guess-Cobra-3"];
    let attempt = |ip: &str, pw: &str| {
        submit(
            s.sub,
            "--tls",
            "PLAIN",
            "argon@example.com",
            pw,
            &["--local-interface", ip, "--quit-after", "AUTH"],
        )
        .0
    };
    for g in guesses {
        let out = attempt("127.0.0.2", g);
        assert!(out.contains("535 5.7.8"), "{out}");
    }
    let lockout = wait_for("the lockout event", T, || {
        s.gw.events_named("submission.lockout").pop()
    });
    assert_eq!(lockout["client_ip"], "127.0.0.2");
    assert_eq!(lockout["user"], "argon@example.com");
    assert_eq!(lockout["failures"], 3);
    // Locked out: even the right password is refused, unchecked.
    let out = attempt("127.0.0.2", ARGON_PW);
    assert!(out.contains("535 5.7.8"), "{out}");
    let last = s.gw.events_named("submission.auth").pop().unwrap();
    assert_eq!(last["reason"], "locked_out", "{last}");
    // Another IP is not affected.
    let out = attempt("127.0.0.1", ARGON_PW);
    assert!(out.contains("235 2.7.0"), "{out}");
    wait_for("the lockout line in the Postfix-style log", T, || {
        std::fs::read_to_string(&s.maillog)
            .unwrap_or_default()
            .contains("SASL authentication locked out after 3 failures in 600s, sasl_username=argon@example.com")
            .then_some(())
    });
    let (_, metrics) = s.gw.admin_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("godwit_submission_lockouts_total 1")),
        "{metrics}"
    );
    let logs = all_logs(&s.gw, &s.maillog);
    assert!(logs.contains("argon@example.com"));
    for secret in guesses.iter().chain([&ARGON_PW]) {
        assert!(!logs.contains(secret), "a password is in the logs");
    }
}

#[test]
fn platform_auth_follows_the_users_route() {
    // The same user on both platforms, with a different password on each:
    // the old password DB is the one that answers until the route moves.
    let old = Dovecot::start(Flavor::Source, &["alice@example.com"]);
    let new = Dovecot::start(Flavor::Exchange, &["alice@example.com"]);
    let new_pw = "new-platform-Pw-42";
    // Dovecot's passwd-file is read again when it changes.
    std::fs::write(
        new.dir.path().join("users"),
        format!("alice@example.com:{{PLAIN}}{new_pw}::::::\n"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (po, pn) = (free_port(), free_port());
    let sinks = (Sink::start(po, &[]), Sink::start(pn, &[]));
    let sub = free_port();
    let mut gw = Gateway::start(po, pn, &cert(dir.path()), "");
    let (o, n) = (old.port, new.port);
    gw.reconfigure(|c| {
        c.replacen(
            "[platforms.new]\n",
            &format!("imap = \"imap://127.0.0.1:{o}\"\n[platforms.new]\nimap = \"imap://127.0.0.1:{n}\"\n"),
            1,
        ) + &format!("[submission]\nlisten = [\"127.0.0.1:{sub}\"]\nauth = \"platform\"\nauth_failure_delay = \"200ms\"\n")
    });
    wait_port(sub);
    let login = |pw: &str| {
        submit(
            sub,
            "--tls",
            "PLAIN",
            "alice@example.com",
            pw,
            &[
                "--from",
                "alice@example.com",
                "--to",
                "bob@example.com",
                "--header",
                "Subject: platform-auth",
            ],
        )
        .0
    };

    // Routed to old: old's password works, new's is refused by old's Dovecot.
    let out = login(PASSWORD);
    assert!(
        out.contains("<~  235 2.7.0") && out.contains("queued as"),
        "{out}"
    );
    let out = login(new_pw);
    assert!(out.contains("<~* 535 5.7.8"), "{out}");
    let ev = gw.events_named("submission.auth");
    assert_eq!(ev[0]["platform"], "old", "{ev:?}");
    assert_eq!(ev[1]["platform"], "old", "{ev:?}");
    assert!(
        ev[1]["backend_reply"].as_str().unwrap().contains("NO"),
        "{ev:?}"
    );

    // The mailbox moves: authentication follows the route.
    gw.route("alice@example.com", "new");
    let out = login(PASSWORD);
    assert!(out.contains("<~* 535 5.7.8"), "{out}");
    let out = login(new_pw);
    assert!(
        out.contains("<~  235 2.7.0") && out.contains("queued as"),
        "{out}"
    );
    let ev = gw.events_named("submission.auth");
    assert_eq!(ev.last().unwrap()["platform"], "new", "{ev:?}");
    assert_eq!(ev.last().unwrap()["result"], "ok", "{ev:?}");
    // Both accepted messages reach the platform bob@example.com routes to.
    wait_for("the two submitted messages", T, || {
        (sinks.0.count_containing("Subject: platform-auth") == 2).then_some(())
    });
    // The platform's IMAP server is down: 454 4.7.0 (RFC 4954 6), try later;
    // not counted as a wrong password.
    drop(new);
    wait_for("the new Dovecot to stop", T, || {
        TcpStream::connect(("127.0.0.1", n)).is_err().then_some(())
    });
    let out = login(new_pw);
    assert!(out.contains("<~* 454 4.7.0"), "{out}");
    let ev = gw.events_named("submission.auth");
    assert_eq!(ev.last().unwrap()["reason"], "unavailable", "{ev:?}");
    let logs = std::fs::read_to_string(gw.data.with_extension("log")).unwrap_or_default()
        + &gw
            .events()
            .iter()
            .map(|e| e.to_string())
            .collect::<String>();
    assert!(!logs.contains(new_pw) && !logs.contains(&format!("\"{PASSWORD}\"")));
    drop(sinks);
}

#[test]
fn directory_aliases_may_be_sent_as_and_sender_restriction_none_lifts_the_rule() {
    let mut s = file_setup("auth_failure_delay = \"100ms\"\n");
    let csv = s.gw.data.parent().unwrap().join("directory.csv");
    std::fs::write(
        &csv,
        "address,display_name,kind,aliases,members,platform\nargon@example.com,Argon,user,a.rgon@example.org;sales-desk@example.com,,old\nbob@example.com,Bob,user,,,old\n",
    )
    .unwrap();
    let (ok, out) =
        s.gw.cli(&["directory", "import", csv.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out}");
    let send = |port: u16, from: &str, header_from: &str, subject: &str| {
        submit(
            port,
            "--tls",
            "PLAIN",
            "argon@example.com",
            ARGON_PW,
            &[
                "--from",
                from,
                "--to",
                "bob@example.com",
                "--h-From",
                header_from,
                "--header",
                &format!("Subject: {subject}"),
            ],
        )
        .0
    };
    // An alias the directory gives the user's mailbox, in either case.
    let out = send(
        s.sub,
        "a.rgon@example.org",
        "Argon <Sales-Desk@Example.com>",
        "alias-ok",
    );
    assert!(out.contains("<~  250 2.0.0 Ok: queued as"), "{out}");
    let out = send(s.sub, "bob@example.com", "bob@example.com", "not-yours");
    assert!(
        out.contains("<~* 553 5.7.1 <bob@example.com>: Sender address rejected"),
        "{out}"
    );
    // Every address of a header From list must be the user's.
    let out = send(
        s.sub,
        "argon@example.com",
        "argon@example.com, bob@example.com",
        "one-of-two",
    );
    assert!(
        out.contains("<~* 553 5.7.1 Header From <bob@example.com>"),
        "{out}"
    );
    wait_for("the alias message at the platform", T, || {
        (s.sinks.0.count_containing("Subject: alias-ok") == 1).then_some(())
    });

    // sender_restriction = "none": an authenticated user may send as anyone.
    s.gw.reconfigure(|c| {
        c.replacen(
            "auth = \"file\"\n",
            "auth = \"file\"\nsender_restriction = \"none\"\n",
            1,
        )
    });
    wait_port(s.sub);
    let out = send(
        s.sub,
        "bob@example.com",
        "bob@example.com",
        "restriction-none",
    );
    assert!(out.contains("<~  250 2.0.0 Ok: queued as"), "{out}");
    wait_for("the unrestricted message at the platform", T, || {
        (s.sinks.0.count_containing("Subject: restriction-none") == 1).then_some(())
    });
    assert_eq!(s.sinks.0.count_containing("Subject: not-yours"), 0);
}
