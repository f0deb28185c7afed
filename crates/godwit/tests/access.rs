//! The access front against real peers: two Dovecots holding different
//! INBOXes for the same user, the godwit binary, and Python's imaplib and
//! poplib as independent clients. A login lands where the routing map says
//! now; a wave cutover moves it (closing the open session), a rollback
//! moves it back.

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use imap_common::{Dovecot, Flavor, PASSWORD};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(20);

/// A Dovecot serving IMAP and POP3; returns it with its POP3 port.
fn dovecot(flavor: Flavor, users: &[&str]) -> (Dovecot, u16) {
    let pop3 = free_port();
    let d = Dovecot::start_with(
        flavor,
        users,
        &format!(
            "protocols = imap pop3\nservice pop3-login {{\n  inet_listener pop3 {{\n    address = 127.0.0.1\n    port = {pop3}\n  }}\n  chroot =\n}}\npop3_uidl_format = %08Xu%08Xv\n"
        ),
    );
    wait_for("dovecot pop3", T, || {
        TcpStream::connect(("127.0.0.1", pop3)).ok()
    });
    (d, pop3)
}

/// Files a message into a user's INBOX, as the platform's delivery agent would.
fn save(d: &Dovecot, user: &str, msg: &str) {
    let mut child = Command::new("doveadm")
        .arg("-c")
        .arg(&d.conf)
        .args(["save", "-u", user, "-m", "INBOX"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(msg.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn msg(subject: &str) -> String {
    format!(
        "From: s@outside.test\r\nTo: alice@example.com\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nbody of {subject}\r\n"
    )
}

const IMAP_PY: &str = r#"
import imaplib, ssl, sys
host, port, user, pw, mode, ca = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca) if ca else None
try:
    if mode == "imaps":
        M = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
    else:
        M = imaplib.IMAP4(host, int(port))
    print("GREETING", M.welcome.decode())
    if mode == "starttls":
        M.starttls(ssl_context=ctx)
    typ, dat = M.login(user, pw)
    print("LOGIN", typ, dat[0].decode())
    M.select("INBOX")
    typ, data = M.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    print("SUBJECT", data[0][1].decode().strip())
    M.logout()
except imaplib.IMAP4.error as e:
    print("NO", e)
"#;

const POP3_PY: &str = r#"
import poplib, ssl, sys
host, port, user, pw, mode, ca = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca) if ca else None
try:
    P = poplib.POP3(host, int(port))
    if mode == "stls":
        P.stls(context=ctx)
    if mode == "auth":
        import base64
        P._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode()).decode())
    else:
        P.user(user)
        P.pass_(pw)
    resp, lines, octets = P.retr(1)
    print("SUBJECT", [l for l in lines if l.lower().startswith(b"subject:")][0].decode())
    P.quit()
except poplib.error_proto as e:
    print("ERR", e)
"#;

fn py(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn imap(port: u16, user: &str, pw: &str) -> String {
    py(
        IMAP_PY,
        &["127.0.0.1", &port.to_string(), user, pw, "plain", ""],
    )
}

fn pop3(port: u16, user: &str, pw: &str, mode: &str) -> String {
    py(
        POP3_PY,
        &["127.0.0.1", &port.to_string(), user, pw, mode, ""],
    )
}

/// A raw IMAP client for sessions the test holds open.
struct Raw {
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut r = Raw {
            r: BufReader::new(s),
        };
        let g = r.line();
        assert!(g.starts_with("* OK"), "{g}");
        r
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    fn send(&mut self, s: &str) {
        self.r.get_mut().write_all(s.as_bytes()).unwrap();
    }
    /// Sends a tagged command and returns every line up to its tagged reply.
    fn cmd(&mut self, tag: &str, c: &str) -> String {
        self.send(&format!("{tag} {c}\r\n"));
        let mut out = String::new();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "connection closed; so far: {out}");
            out.push_str(&l);
            if l.starts_with(&format!("{tag} ")) {
                return out;
            }
        }
    }
    fn login(port: u16, user: &str) -> Raw {
        let mut r = Raw::connect(port);
        let out = r.cmd("a", &format!("LOGIN {user} {PASSWORD}"));
        assert!(out.contains("a OK"), "{out}");
        r
    }
}

struct Setup {
    old: Dovecot,
    new: Dovecot,
    gw: Gateway,
    imap: u16,
    pop3: u16,
    http: u16,
    sinks: (Sink, Sink),
    /// The platforms' POP3 ports (IMAP: `old.port`, `new.port`).
    pop3_ports: (u16, u16),
}

fn setup(access_extra: &str) -> Setup {
    setup_on(access_extra, "")
}

/// A gateway with an access front in front of the two Dovecots; `tail` is
/// appended to its configuration (e.g. a shared `[store]`).
fn setup_on(access_extra: &str, tail: &str) -> Setup {
    let (old, old_pop3) = dovecot(Flavor::Source, &["alice@example.com", "bob@example.com"]);
    let (new, new_pop3) = dovecot(Flavor::Exchange, &["alice@example.com", "bob@example.com"]);
    save(&old, "alice@example.com", &msg("from-old"));
    save(&new, "alice@example.com", &msg("from-new"));
    let (po, pn) = (free_port(), free_port());
    let sinks = (Sink::start(po, &[]), Sink::start(pn, &[]));
    let (gw, imap, pop3, http) = front(
        po,
        pn,
        (old.port, old_pop3),
        (new.port, new_pop3),
        access_extra,
        tail,
    );
    Setup {
        old,
        new,
        gw,
        imap,
        pop3,
        http,
        sinks,
        pop3_ports: (old_pop3, new_pop3),
    }
}

/// One gateway node with an access front: returns it and its IMAP, POP3
/// and HTTP ports. `old`/`new` are the platforms' (IMAP, POP3) ports.
fn front(
    po: u16,
    pn: u16,
    old: (u16, u16),
    new: (u16, u16),
    access_extra: &str,
    tail: &str,
) -> (Gateway, u16, u16, u16) {
    let (imap, pop3, http) = (free_port(), free_port(), free_port());
    let access = format!(
        "[access]\nimap_listen = [\"127.0.0.1:{imap}\"]\npop3_listen = [\"127.0.0.1:{pop3}\"]\nhttp_listen = [\"127.0.0.1:{http}\"]\nlogin_failure_delay = \"50ms\"\npublic_hostname = \"mail.example.com\"\nsubmission_port = 587\n{access_extra}\n{tail}\n"
    );
    let mut gw = Gateway::start(po, pn, "", &access);
    // The platforms' mailbox servers, beside their relays.
    gw.reconfigure(|c| {
        c.replacen(
            "[platforms.new]\n",
            &format!("imap = \"imap://127.0.0.1:{}\"\npop3 = \"pop3://127.0.0.1:{}\"\n[platforms.new]\nimap = \"imap://127.0.0.1:{}\"\npop3 = \"pop3://127.0.0.1:{}\"\n", old.0, old.1, new.0, new.1),
            1,
        )
    });
    wait_for("the access front", T, || {
        TcpStream::connect(("127.0.0.1", imap)).ok()
    });
    (gw, imap, pop3, http)
}

fn control(gw: &Gateway, args: &[&str]) -> i64 {
    let (ok, out) = gw.cli(args);
    assert!(ok, "{args:?}: {out}");
    let version: i64 = out
        .rsplit("version ")
        .next()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no version in {out}"));
    wait_for("the gateway to apply the version", T, || {
        gw.events_named("route.changed")
            .iter()
            .any(|e| e["version"].as_i64() >= Some(version))
            .then_some(())
    });
    version
}

/// Reads until the server closes; returns everything read and how long it took.
fn until_closed(r: &mut Raw) -> (String, Duration) {
    let start = Instant::now();
    let mut out = String::new();
    let _ = r.r.read_to_string(&mut out);
    (out, start.elapsed())
}

#[test]
fn logins_follow_wave_cutover_and_rollback() {
    let s = setup("allow_plaintext_login = true");
    let gw = &s.gw;
    let dir = gw.data.parent().unwrap().join("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\nalice@example.com,Alice,user,al@example.org,,old\n",
    )
    .unwrap();
    control(
        gw,
        &["directory", "import", dir.to_str().unwrap(), "--apply"],
    );
    control(gw, &["directory", "state", "ready", "alice@example.com"]);
    let (ok, out) = gw.cli(&["wave", "create", "pilot", "--members", "alice@example.com"]);
    assert!(ok, "{out}");

    // Before the move: old's INBOX, over IMAP and POP3 (USER/PASS and AUTH PLAIN).
    let out = imap(s.imap, "alice@example.com", PASSWORD);
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");
    // The platform's post-login CAPABILITY reaches the client (Dovecot's IDLE).
    assert!(
        out.contains("LOGIN OK [CAPABILITY IMAP4rev1") && out.contains("IDLE"),
        "{out}"
    );
    assert!(!out.contains("LOGINDISABLED"), "{out}");
    let out = pop3(s.pop3, "alice@example.com", PASSWORD, "user");
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");
    let out = pop3(s.pop3, "alice@example.com", PASSWORD, "auth");
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");

    // Sessions left open across the cutover: IMAP and POP3.
    let mut held = Raw::login(s.imap, "alice@example.com");
    assert!(held.cmd("b", "SELECT INBOX").contains("b OK"));
    let mut held_pop = TcpStream::connect(("127.0.0.1", s.pop3)).unwrap();
    held_pop.set_read_timeout(Some(T)).unwrap();
    let mut pr = BufReader::new(held_pop.try_clone().unwrap());
    let mut l = String::new();
    pr.read_line(&mut l).unwrap();
    held_pop
        .write_all(format!("USER alice@example.com\r\nPASS {PASSWORD}\r\n").as_bytes())
        .unwrap();
    for _ in 0..2 {
        l.clear();
        pr.read_line(&mut l).unwrap();
        assert!(l.starts_with("+OK"), "{l}");
    }

    control(gw, &["wave", "cutover", "pilot"]);
    let (bye, took) = until_closed(&mut held);
    assert!(
        bye.contains("* BYE [UNAVAILABLE]") && bye.contains("moved"),
        "{bye}"
    );
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    let mut rest = String::new();
    let _ = pr.read_to_string(&mut rest);
    assert!(
        rest.starts_with("-ERR [SYS/TEMP]") && rest.contains("moved"),
        "{rest}"
    );
    let moved = gw.events_named("access.moved");
    assert!(
        moved.iter().any(|e| e["protocol"] == "imap"
            && e["from_platform"] == "old"
            && e["to_platform"] == "new"),
        "{moved:?}"
    );

    // `check access` logs in through the front and finds who answered.
    let (ok, out) = gw.cli(&[
        "check",
        "access",
        "alice@example.com",
        "--password",
        PASSWORD,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("logs in at new") && out.contains("answered by new, as routed"),
        "{out}"
    );
    assert!(
        out.contains("autoconfig (Thunderbird): names the front"),
        "{out}"
    );
    assert!(
        out.contains("autodiscover (Outlook): names the front"),
        "{out}"
    );

    // After: new's INBOX.
    let out = imap(s.imap, "alice@example.com", PASSWORD);
    assert!(out.contains("SUBJECT Subject: from-new"), "{out}");
    let out = pop3(s.pop3, "alice@example.com", PASSWORD, "user");
    assert!(out.contains("SUBJECT Subject: from-new"), "{out}");

    // Rollback: old's again, and a session on new is closed.
    let mut held = Raw::login(s.imap, "alice@example.com");
    control(gw, &["wave", "rollback", "pilot"]);
    let (bye, took) = until_closed(&mut held);
    assert!(bye.contains("* BYE [UNAVAILABLE]"), "{bye}");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    let out = imap(s.imap, "alice@example.com", PASSWORD);
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");
    let (ok, out) = gw.cli(&[
        "check",
        "access",
        "alice@example.com",
        "--password",
        PASSWORD,
    ]);
    assert!(ok && out.contains("answered by old, as routed"), "{out}");
    let (ok, out) = gw.cli(&["check", "access", "alice@evil.test", "--password", PASSWORD]);
    assert!(
        !ok && out.contains("refuses this login (foreign_domain)"),
        "{out}"
    );

    // Refusals: one reply for a wrong password, an unknown user and a
    // foreign domain; only the wrong password reached a platform.
    let refused = "NO b'[AUTHENTICATIONFAILED] Authentication failed.'";
    for (user, pw) in [
        ("alice@example.com", "wrong"),
        ("bob@example.com", PASSWORD),
        ("alice@evil.test", PASSWORD),
    ] {
        let out = imap(s.imap, user, pw);
        assert!(out.contains(refused), "{user}: {out}");
        let out = pop3(s.pop3, user, pw, "user");
        assert!(
            out.contains("-ERR [AUTH] Authentication failed."),
            "{user}: {out}"
        );
    }
    let logins = gw.events_named("access.login");
    let failed = |addr: &str| {
        logins
            .iter()
            .filter(|e| e["address"] == addr && e["result"] == "failed")
            .cloned()
            .collect::<Vec<_>>()
    };
    let wrong = failed("alice@example.com");
    assert!(
        wrong.iter().all(|e| e["reason"] == "auth"
            && e["platform"] == "old"
            && e["backend_reply"].is_string()),
        "{wrong:?}"
    );
    for (addr, reason) in [
        ("bob@example.com", "unknown"),
        ("alice@evil.test", "foreign_domain"),
    ] {
        let f = failed(addr);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f.iter()
                .all(|e| e["reason"] == reason && e["platform"].is_null()),
            "{f:?}"
        );
    }
    let ok: Vec<_> = logins.iter().filter(|e| e["result"] == "ok").collect();
    assert!(
        ok.iter()
            .any(|e| e["platform"] == "new" && e["protocol"] == "pop3"),
        "{ok:?}"
    );
    // No event ever carries the password.
    assert!(
        !std::fs::read_to_string(gw.data.with_extension("log"))
            .unwrap_or_default()
            .contains(PASSWORD)
    );
    for e in gw.events() {
        assert!(!e.to_string().contains(PASSWORD), "{e}");
    }
    let _ = (&s.old, &s.new);

    // `godwit report` counts logins per platform and failures by reason.
    let report = wait_for("the report to count the logins", T, || {
        let (ok, out) = gw.cli(&[
            "report", "--since", "1h", "--format", "csv", "--sample", "0",
        ]);
        (ok && out.contains("access_failed,foreign_domain,2")).then_some(out)
    });
    for line in [
        "access_login,new,4",
        "access_login,old,7",
        "access_failed,unknown,2",
        "access_moved,sessions,3",
    ] {
        assert!(report.contains(line), "{line}: {report}");
    }

    // Metrics on the access listener.
    let (status, body) = http(
        s.http,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(
        body.contains("godwit_access_logins_total{platform=\"new\",protocol=\"imap\"} 3"),
        "{body}"
    );
    assert!(
        body.contains(
            "godwit_access_login_failures_total{reason=\"foreign_domain\",protocol=\"imap\"} 1"
        ),
        "{body}"
    );
    assert!(body.contains("godwit_access_moved_total 3"), "{body}");
}

const AUTOCONFIG_PY: &str = r#"
import json, sys, urllib.request, urllib.error
import xml.etree.ElementTree as ET
base = "http://127.0.0.1:%s" % sys.argv[1]
out = {}
def get(path):
    try:
        return urllib.request.urlopen(base + path).read()
    except urllib.error.HTTPError as e:
        return e.code
for key, path in [("tb", "/mail/config-v1.1.xml?emailaddress=alice%40example.com"),
                  ("wk", "/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=alice%40example.com"),
                  ("foreign", "/mail/config-v1.1.xml?emailaddress=alice%40evil.test")]:
    body = get(path)
    if isinstance(body, int):
        out[key] = body
        continue
    root = ET.fromstring(body)
    p = root.find("emailProvider")
    out[key] = {
        "version": root.get("version"),
        "domain": p.findtext("domain"),
        "servers": [[s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"),
                     s.findtext("socketType"), s.findtext("authentication"), s.findtext("username")]
                    for s in p if s.tag in ("incomingServer", "outgoingServer")],
    }
req = b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>alice@example.com</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>'
body = urllib.request.urlopen(urllib.request.Request(base + "/autodiscover/autodiscover.xml", data=req, method="POST")).read()
ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006",
      "r": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
acct = ET.fromstring(body).find("r:Response/r:Account", ns)
out["pox"] = {
    "type": acct.findtext("r:AccountType", namespaces=ns),
    "action": acct.findtext("r:Action", namespaces=ns),
    "protocols": [[p.findtext("r:" + f, namespaces=ns) for f in ("Type", "Server", "Port", "LoginName", "SSL", "Encryption")]
                  for p in acct.findall("r:Protocol", ns)],
}
print(json.dumps(out))
"#;

#[test]
fn tls_front_refuses_clear_text_and_autoconfig_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let (imaps, pop3s) = (free_port(), free_port());
    let s = setup(&format!(
        "imaps_listen = [\"127.0.0.1:{imaps}\"]\npop3s_listen = [\"127.0.0.1:{pop3s}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    ));
    let ca = cert_path.to_str().unwrap();

    // Before TLS: STARTTLS and LOGINDISABLED, no AUTH=PLAIN; clear-text
    // passwords are refused without asking a platform.
    let mut r = Raw::connect(s.imap);
    let caps = r.cmd("c", "CAPABILITY");
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED") && !caps.contains("AUTH=PLAIN"),
        "{caps}"
    );
    let out = r.cmd("a", &format!("LOGIN alice@example.com {PASSWORD}"));
    assert!(out.starts_with("a NO [PRIVACYREQUIRED]"), "{out}");
    let out = r.cmd(
        "b",
        "AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==",
    );
    assert!(out.starts_with("b NO [PRIVACYREQUIRED]"), "{out}");
    let out = pop3(s.pop3, "alice@example.com", PASSWORD, "user");
    assert!(
        out.contains("ERR") && out.contains("Plaintext authentication disallowed"),
        "{out}"
    );
    assert!(s.gw.events_named("access.login").is_empty());

    // STARTTLS (imaplib verifies the rcgen certificate), implicit TLS, STLS.
    let out = py(
        IMAP_PY,
        &[
            "localhost",
            &s.imap.to_string(),
            "alice@example.com",
            PASSWORD,
            "starttls",
            ca,
        ],
    );
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");
    let out = py(
        IMAP_PY,
        &[
            "localhost",
            &imaps.to_string(),
            "alice@example.com",
            PASSWORD,
            "imaps",
            ca,
        ],
    );
    assert!(
        out.contains("GREETING * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN]"),
        "{out}"
    );
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");
    let out = py(
        POP3_PY,
        &[
            "localhost",
            &s.pop3.to_string(),
            "alice@example.com",
            PASSWORD,
            "stls",
            ca,
        ],
    );
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");

    // Autoconfig and autodiscover, parsed field by field.
    let out = py(AUTOCONFIG_PY, &[&s.http.to_string()]);
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let server = |tag: &str, kind: &str, port: u16, socket: &str| {
        serde_json::json!([
            tag,
            kind,
            "mail.example.com",
            port.to_string(),
            socket,
            "password-cleartext",
            "%EMAILADDRESS%"
        ])
    };
    let want = serde_json::json!({
        "version": "1.1",
        "domain": "example.com",
        "servers": [
            server("incomingServer", "imap", imaps, "SSL"),
            server("incomingServer", "imap", s.imap, "STARTTLS"),
            server("incomingServer", "pop3", pop3s, "SSL"),
            server("incomingServer", "pop3", s.pop3, "STARTTLS"),
            server("outgoingServer", "smtp", 587, "STARTTLS"),
        ],
    });
    assert_eq!(v["tb"], want, "{out}");
    assert_eq!(v["wk"], want, "{out}");
    assert_eq!(v["foreign"], 404, "{out}");
    let p = |t: &str, port: u16, ssl: &str, enc: &str| {
        serde_json::json!([
            t,
            "mail.example.com",
            port.to_string(),
            "alice@example.com",
            ssl,
            enc
        ])
    };
    assert_eq!(
        v["pox"],
        serde_json::json!({
            "type": "email",
            "action": "settings",
            "protocols": [
                p("IMAP", imaps, "on", "SSL"),
                p("IMAP", s.imap, "on", "TLS"),
                p("POP3", pop3s, "on", "SSL"),
                p("POP3", s.pop3, "on", "TLS"),
                p("SMTP", 587, "on", "TLS"),
            ],
        }),
        "{out}"
    );
}

#[test]
fn idle_through_the_front_wakes_on_mail_delivered_through_the_gateway() {
    let s = setup("allow_plaintext_login = true\nmax_failures_per_user = 2");
    let mut idle = Raw::login(s.imap, "alice@example.com");
    let sel = idle.cmd("s", "SELECT INBOX");
    assert!(sel.contains("* 1 EXISTS"), "{sel}");
    idle.send("i IDLE\r\n");
    let l = idle.line();
    assert!(l.starts_with("+ "), "{l}");

    let mut c = s.gw.client();
    c.greet();
    let r = c.mail(
        "s@outside.test",
        &["alice@example.com"],
        &message("idle-wake@test", "wake up"),
    );
    assert!(r.starts_with("250"), "{r}");
    let delivered = wait_for("delivery to old", T, || {
        s.sinks
            .0
            .messages()
            .into_iter()
            .find(|m| m.contains("idle-wake@test"))
    });
    // The old platform files it into alice's INBOX, as its delivery agent does.
    save(
        &s.old,
        "alice@example.com",
        &delivered[delivered.find("Received:").unwrap()..],
    );
    // Dovecot's IDLE notifies within its check interval; the front relays it.
    let mut l = idle.line();
    while l.starts_with("* ") && !l.contains("EXISTS") {
        l = idle.line(); // `* n RECENT` and the like
    }
    assert_eq!(l.trim_end(), "* 2 EXISTS");
    idle.send("DONE\r\n");
    let mut l = idle.line();
    while l.starts_with("* ") {
        l = idle.line();
    }
    assert!(l.starts_with("i OK"), "{l}");
    let out = idle.cmd("f", "FETCH 2 (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])");
    assert!(out.contains("<idle-wake@test>"), "{out}");

    // Failed logins are limited per user: after two wrong passwords even the
    // right one is refused, without asking the platform.
    for pw in ["wrong1", "wrong2", PASSWORD] {
        let out = imap(s.imap, "bob@example.com", pw);
        assert!(out.contains("[AUTHENTICATIONFAILED]"), "{out}");
    }
    let bob = wait_for("bob's three login events", T, || {
        let v: Vec<_> =
            s.gw.events_named("access.login")
                .into_iter()
                .filter(|e| e["address"] == "bob@example.com")
                .collect();
        (v.len() == 3).then_some(v)
    });
    let reasons: Vec<_> = bob
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(reasons, ["auth", "auth", "rate_limited"], "{bob:?}");
    assert!(bob[2]["platform"].is_null(), "{bob:?}");
}

/// `imap_master_user`: the front checks the client's password at the
/// platform, then opens the session as `user*admin` (Dovecot's master
/// passdb). Real Dovecot proves each step: a wrong user password is refused
/// by the check; a wrong master password makes the platform refuse the
/// master login, which the client sees as UNAVAILABLE (our configuration's
/// fault, not a failed login), so the session really is a master login.
#[test]
fn master_user_sessions_after_the_clients_password_is_checked() {
    let mut s = setup("allow_plaintext_login = true");
    let secret = s.gw.data.parent().unwrap().join("master.secret");
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    let master = format!(
        "imap_master_user = \"admin\"\nimap_master_password = \"file:{}\"\n[platforms.new]\n",
        secret.display()
    );
    s.gw.reconfigure(|c| c.replacen("[platforms.new]\n", &master, 1));
    let out = imap(s.imap, "alice@example.com", PASSWORD);
    assert!(out.contains("LOGIN OK"), "{out}");
    assert!(out.contains("SUBJECT Subject: from-old"), "{out}");
    let ok = s.gw.wait_event("access.login", T, |e| e["result"] == "ok");
    assert_eq!(ok["platform"], "old", "{ok}");
    // Dovecot saw two logins for the one client login: the password check
    // and the session.
    let dlog = s.old.dir.path().join("dovecot.log");
    wait_for("both logins in Dovecot's log", T, || {
        let log = std::fs::read_to_string(&dlog).ok()?;
        (log.matches("Login: user=<alice@example.com>").count() == 2).then_some(())
    });

    let out = imap(s.imap, "alice@example.com", "wrong");
    assert!(out.contains("AUTHENTICATIONFAILED"), "{out}");

    // The master's password no longer matches: the user's own password still
    // passes the check, but the platform refuses the master.
    std::fs::write(&secret, "not-the-master-password\n").unwrap();
    let out = imap(s.imap, "alice@example.com", PASSWORD);
    assert!(out.contains("UNAVAILABLE"), "{out}");
    let e = s.gw.wait_event("access.login", T, |e| {
        e["reason"] == "unavailable"
            && e["backend_reply"]
                .as_str()
                .is_some_and(|r| r.contains("master user admin was refused"))
    });
    assert_eq!(e["platform"], "old", "{e}");
    let log = std::fs::read_to_string(s.gw.data.with_extension("log")).unwrap_or_default();
    assert!(
        !log.contains("not-the-master-password"),
        "a secret was logged"
    );
}

/// What headless Chromium shows of the dashboard after its data loaded.
fn dashboard_dom(gw: &Gateway) -> String {
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/", gw.admin_port);
    let out = chromium(profile.path(), &url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the page did not load:\n{dom}"
    );
    dom
}

fn cell(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    Some(dom[start..start + dom[start..].find('<')?].to_string())
}

/// The dashboard shows client sessions per platform next to mail flow, so a
/// wave's client move can be watched: the session on old, the cutover
/// closing it, the reconnect landing on new, and the logins chart's data.
#[test]
fn dashboard_shows_client_sessions_follow_a_wave() {
    let s = setup("allow_plaintext_login = true");
    let gw = &s.gw;
    let dir = gw.data.parent().unwrap().join("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\nalice@example.com,Alice,user,,,old\n",
    )
    .unwrap();
    control(
        gw,
        &["directory", "import", dir.to_str().unwrap(), "--apply"],
    );
    control(gw, &["directory", "state", "ready", "alice@example.com"]);
    let (ok, out) = gw.cli(&["wave", "create", "pilot", "--members", "alice@example.com"]);
    assert!(ok, "{out}");

    let mut held = Raw::login(s.imap, "alice@example.com");
    let dom = dashboard_dom(gw);
    assert_eq!(
        cell(&dom, "sessions-old-imap").as_deref(),
        Some("1"),
        "{dom}"
    );
    assert_eq!(
        cell(&dom, "sessions-new-imap").as_deref(),
        Some("0"),
        "{dom}"
    );

    control(gw, &["wave", "cutover", "pilot"]);
    let (bye, _) = until_closed(&mut held);
    assert!(bye.contains("* BYE [UNAVAILABLE]"), "{bye}");
    let _again = Raw::login(s.imap, "alice@example.com");
    let dom = dashboard_dom(gw);
    assert_eq!(
        cell(&dom, "sessions-old-imap").as_deref(),
        Some("0"),
        "{dom}"
    );
    assert_eq!(
        cell(&dom, "sessions-new-imap").as_deref(),
        Some("1"),
        "{dom}"
    );

    // The chart's series, from the event index (fleet-wide).
    let series = wait_for("logins in the series", T, || {
        let (_, body) = gw.admin_get("/api/series?range=15m");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let sum = |x: &serde_json::Value| -> u64 {
            x.as_array()
                .map(|a| a.iter().filter_map(|n| n.as_u64()).sum())
                .unwrap_or(0)
        };
        (sum(&v["logins"]["old"]) >= 1 && sum(&v["logins"]["new"]) >= 1 && sum(&v["moved"]) >= 1)
            .then_some(v)
    });
    assert!(
        series["routing_changes"]
            .as_array()
            .is_some_and(|m| !m.is_empty())
    );
}

/// Two gateway nodes on one PostgreSQL store: a wave cutover made through
/// one node closes the moved user's sessions on both within 2 s, and the
/// reconnect lands on the new platform through either node.
#[test]
fn a_move_closes_sessions_on_every_node_of_a_fleet() {
    let Some(admin) = godwit_store::test_postgres_url("GODWIT_TEST_POSTGRES") else {
        return;
    };
    let db = format!(
        "godwit_access_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([admin.as_str(), "-qAtc", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(&format!("CREATE DATABASE {db}"));
    let (base, _) = admin.rsplit_once('/').unwrap();
    let store = format!("[store]\nurl = \"{base}/{db}\"\n");
    let s = setup_on("allow_plaintext_login = true", &store);
    let (b, b_imap, _, _) = front(
        s.sinks.0.port,
        s.sinks.1.port,
        (s.old.port, s.pop3_ports.0),
        (s.new.port, s.pop3_ports.1),
        "allow_plaintext_login = true",
        &store,
    );
    let a = &s.gw;
    let dir = a.data.parent().unwrap().join("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\nalice@example.com,Alice,user,,,old\n",
    )
    .unwrap();
    control(
        a,
        &["directory", "import", dir.to_str().unwrap(), "--apply"],
    );
    control(a, &["directory", "state", "ready", "alice@example.com"]);
    let (ok, out) = a.cli(&["wave", "create", "pilot", "--members", "alice@example.com"]);
    assert!(ok, "{out}");
    // Node B applied the directory too (it routes logins by the same map).
    let v = control(a, &["route", "set", "bob@example.com", "old"]);
    wait_for("node B to apply the directory", T, || {
        b.events_named("route.changed")
            .iter()
            .any(|e| e["version"].as_i64() >= Some(v))
            .then_some(())
    });

    let on_a = Raw::login(s.imap, "alice@example.com");
    let on_b = Raw::login(b_imap, "alice@example.com");
    let readers: Vec<_> = [on_a, on_b]
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || {
                let (bye, _) = until_closed(&mut r);
                (bye, Instant::now())
            })
        })
        .collect();
    let cut = Instant::now();
    let (ok, out) = a.cli(&["wave", "cutover", "pilot"]);
    assert!(ok, "{out}");
    for (node, h) in ["A", "B"].iter().zip(readers) {
        let (bye, at) = h.join().unwrap();
        let took = at - cut;
        assert!(bye.contains("* BYE [UNAVAILABLE]"), "node {node}: {bye}");
        // From the start of the command, so the commit is inside the window.
        assert!(
            took < Duration::from_secs(2),
            "node {node} closed after {took:?}"
        );
    }
    for node in [&s.gw, &b] {
        node.wait_event("access.moved", T, |e| e["to_platform"] == "new");
    }
    // Reconnecting through B lands on new.
    let out = imap(b_imap, "alice@example.com", PASSWORD);
    assert!(out.contains("SUBJECT Subject: from-new"), "{out}");
    drop(b);
    drop(s);
    psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}

/// Doctor question 5 reads the access front: a healthy login passes it, a
/// run of refused logins (real Dovecot answering NO) is "clients failing,
/// not mailflow": exit 5, naming the platform, the reason and the
/// autoconfig answer for the address.
#[test]
fn doctor_question_5_names_failing_client_logins_and_exits_5() {
    let s = setup("allow_plaintext_login = true");
    let out = imap(s.imap, "alice@example.com", PASSWORD);
    assert!(out.contains("LOGIN OK"), "{out}");
    let (code, out) = wait_for("doctor to see the login", T, || {
        let (code, out) = s.gw.cli_code(&["doctor", "alice@example.com"]);
        out.contains("1 successful login(s)").then_some((code, out))
    });
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("5. Are clients failing rather than mailflow? [ok]"),
        "{out}"
    );
    for _ in 0..4 {
        let out = imap(s.imap, "alice@example.com", "wrong");
        assert!(out.contains("AUTHENTICATIONFAILED"), "{out}");
    }
    let (code, out) = wait_for("doctor to see the failures", T, || {
        let (code, out) = s.gw.cli_code(&["doctor", "alice@example.com"]);
        (code == 5).then_some((code, out))
    });
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("5. Are clients failing rather than mailflow? [BROKEN]"),
        "{out}"
    );
    assert!(out.contains("login failures at old: 4 x "), "{out}");
    assert!(
        out.contains("autoconfig: for example.com: IMAP mail.example.com:"),
        "{out}"
    );
    assert!(out.contains("identity or client configuration"), "{out}");
}
