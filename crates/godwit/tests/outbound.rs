//! Outbound (issue 14) against real peers: dnsmasq serves MX, A and DKIM TXT
//! records for foreign test domains; Postfix's smtp-sink instances on
//! loopback addresses (127.0.0.2, 127.0.0.3, ...) are their MX hosts, all on
//! `outbound.mx_port`; dkimpy verifies what arrives, with the public key it
//! fetches from the same dnsmasq; swaks plays a client outside
//! relay_networks by binding 127.0.0.9.

mod support;

use std::collections::HashSet;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq answering only for the test zones (`--local`), so a name it does
/// not know is NXDOMAIN.
fn dnsmasq(port: u16, records: &[String]) -> Proc {
    let child = Command::new("dnsmasq")
        .args([
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
            "--local-ttl=1",
            "--local=/test/",
            "--local=/example.com/",
            // DMARCbis's tree walk (mail-auth) asks _dmarc.com too: NXDOMAIN
            // as on the internet, not REFUSED.
            "--local=/com/",
            "--local=/example.org/",
        ])
        .args(records)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is installed (scripts/install-peers)");
    // dnsmasq answers on TCP too: ready once it accepts.
    wait_for("dnsmasq to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Proc(child)
}

/// `--txt-record` split into character-strings of at most 255 octets (RFC
/// 1035 3.3.14); resolvers join them again.
fn txt(name: &str, value: &str) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(250)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", parts.join(","))
}

/// smtp-sink on `ip:port` (an MX host of a foreign test domain).
struct MxSink {
    dir: std::path::PathBuf,
    _proc: Proc,
    _tmp: tempfile::TempDir,
}

impl MxSink {
    fn start(ip: &str, port: u16, extra: &[&str]) -> MxSink {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dump");
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("chmod")
            .args(["-R", "777", tmp.path().to_str().unwrap()])
            .status()
            .unwrap();
        let mut args: Vec<String> = vec![
            "-u".into(),
            "nobody".into(),
            "-d".into(),
            format!("{}/%M%S.", dir.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("{ip}:{port}"));
        args.push("256".into());
        let child = Command::new("/usr/sbin/smtp-sink")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        wait_for("smtp-sink (MX) to listen", Duration::from_secs(10), || {
            TcpStream::connect(addr).ok()
        });
        MxSink {
            dir,
            _proc: Proc(child),
            _tmp: tmp,
        }
    }

    fn files(&self) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn messages(&self) -> Vec<String> {
        self.files()
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }
}

/// The test's world: DNS, MX sinks, platform sinks, the gateway with its
/// relay port and a DKIM key for example.com published in the DNS.
struct World {
    gw: Gateway,
    relay_port: u16,
    mx_port: u16,
    dns_port: u16,
    old: Sink,
    mx: MxSink,
    _mx_refusing: MxSink,
    _dns: Proc,
    _keys: tempfile::TempDir,
}

const SELECTOR: &str = "gw2026";

fn world(queue_extra: &str, outbound_extra: &str) -> World {
    world_with("", queue_extra, outbound_extra)
}

fn world_with(smtp_extra: &str, queue_extra: &str, outbound_extra: &str) -> World {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let _new = Sink::start(pn, &[]);
    std::mem::forget(_new);
    let mx_port = free_port();
    let mx = MxSink::start("127.0.0.2", mx_port, &[]);
    // RFC 5321 4.2.5: 550 at RCPT is a permanent refusal.
    let mx_refusing = MxSink::start("127.0.0.3", mx_port, &["-f", "rcpt"]);
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("example.com.pem");
    let out = Command::new(godwit_bin())
        .args([
            "dkim",
            "keygen",
            "--domain",
            "example.com",
            "--selector",
            SELECTOR,
            "--algorithm",
            "rsa",
            "--out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dkim keygen: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The plain line: `gw2026._domainkey.example.com TXT "v=DKIM1; k=rsa; p=..."`.
    let record = printed
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{SELECTOR}._domainkey.example.com TXT \"")))
        .map(|r| r.trim_end_matches('"').to_string())
        .unwrap_or_else(|| panic!("keygen printed no TXT record: {printed}"));
    assert!(record.starts_with("v=DKIM1; k=rsa; p=MII"), "{record}");
    let dns_port = free_port();
    let dns = dnsmasq(
        dns_port,
        &[
            "--mx-host=foreign.test,mx1.foreign.test,10".into(),
            "--host-record=mx1.foreign.test,127.0.0.2".into(),
            "--mx-host=refusing.test,mx.refusing.test,10".into(),
            "--host-record=mx.refusing.test,127.0.0.3".into(),
            // The retry test's MX: a sink that first records then 450s the DATA.
            "--mx-host=retry.test,mx.retry.test,10".into(),
            "--host-record=mx.retry.test,127.0.0.4".into(),
            // RFC 5321 5.1 implicit MX: no MX record, an A record.
            "--host-record=implicit.test,127.0.0.2".into(),
            // RFC 7505 null MX: preference 0, exchange "." (RDATA 00 00 00).
            "--dns-rr=nullmx.test,15,000000".into(),
            txt(&format!("{SELECTOR}._domainkey.example.com"), &record),
            // What `godwit check outbound` reads: SPF for the egress IP,
            // HELO with forward-confirmed reverse DNS, DMARC.
            txt("example.com", "v=spf1 ip4:203.0.113.55 -all"),
            txt("example.org", "v=spf1 ip4:203.0.113.55 -all"),
            txt("_dmarc.example.com", "v=DMARC1; p=reject"),
            "--host-record=mx-gw.example.com,203.0.113.55".into(),
        ],
    );
    let relay_port = free_port();
    let extra = format!(
        "{queue_extra}\n[outbound]\nlisten = [\"127.0.0.1:{relay_port}\"]\nrelay_networks = [\"127.0.0.1/32\"]\n\
         mx_port = {mx_port}\nresolvers = [\"127.0.0.1:{dns_port}\"]\nhelo = \"mx-gw.example.com\"\n{outbound_extra}\n\
         [[dkim]]\ndomain = \"example.com\"\nselector = \"{SELECTOR}\"\nkey = \"{}\"\n\
         [events]\npostfix_log = \"maillog\"\n",
        key.display()
    );
    let gw = Gateway::start(
        po,
        pn,
        &format!("max_connections_per_ip = 100\n{smtp_extra}"),
        &extra,
    );
    wait_relay_port(relay_port);
    World {
        gw,
        relay_port,
        mx_port,
        dns_port,
        old,
        mx,
        _mx_refusing: mx_refusing,
        _dns: dns,
        _keys: keys,
    }
}

/// The relay port binds just after the inbound one that `Gateway` waits for.
fn wait_relay_port(port: u16) {
    wait_for("the relay port to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

fn out_message(id: &str, to: &str) -> String {
    format!(
        "Message-ID: <{id}>\r\nFrom: Alice <alice@example.com>\r\nTo: <{to}>\r\nSubject: outbound {id}\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n\
         Hello from the organisation.\r\n.leading dot line\r\n"
    )
}

/// dkimpy (Debian's python3-dkim, not mail-auth) verifies `file` as
/// smtp-sink stored it, fetching the key over DNS from dnsmasq. Returns
/// dkimpy's verdict for the message, and for it with its Subject altered.
fn dkimpy_verify(file: &std::path::Path, dns_port: u16) -> (bool, bool) {
    let script = format!(
        r#"
import sys, dkim, dns.resolver
r = dns.resolver.Resolver(configure=False)
r.nameservers = ['127.0.0.1']
r.port = {dns_port}
def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    ans = r.resolve(name.rstrip('.'), 'TXT')
    return b''.join(b''.join(rd.strings) for rd in ans)
raw = open(sys.argv[1], 'rb').read()
lines = raw.split(b'\n')
# smtp-sink's own envelope lines come first; the message follows.
while lines and lines[0].startswith((b'X-Client-', b'X-Helo-', b'X-Mail-', b'X-Rcpt-')):
    lines.pop(0)
msg = b'\r\n'.join(l.rstrip(b'\r') for l in lines)
ok = dkim.verify(msg, dnsfunc=dnsfunc)
bad = dkim.verify(msg.replace(b'Subject: outbound', b'Subject: tampered', 1), dnsfunc=dnsfunc)
print('verify', ok, bad)
"#
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .arg(file)
        .output()
        .expect("python3 with dkimpy (scripts/install-peers)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("verify "))
        .unwrap_or_else(|| panic!("dkimpy failed: {text}"));
    let mut it = line.split_whitespace().skip(1);
    (it.next() == Some("True"), it.next() == Some("True"))
}

fn relay_client(w: &World) -> Client {
    let mut c = Client::connect(w.relay_port);
    c.greet();
    c
}

#[test]
fn relayed_mail_reaches_the_mx_signed_and_dkimpy_verifies_it() {
    let w = world("", "");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("out1@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let delivered =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "bob@foreign.test"
        });
    assert_eq!(delivered["platform"], "mx:foreign.test");
    let host = delivered["host"].as_str().unwrap();
    assert!(host.starts_with("mx1.foreign.test[127.0.0.2]:"), "{host}");
    let file = wait_for("the message at the MX sink", Duration::from_secs(5), || {
        w.mx.files().into_iter().next()
    });
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("X-Helo-Args: mx-gw.example.com"), "{text}");
    assert!(
        text.contains("DKIM-Signature: v=1; a=rsa-sha256;"),
        "{text}"
    );
    assert!(text.contains("d=example.com"), "{text}");
    assert!(text.contains(&format!("s={SELECTOR}")), "{text}");
    let (ok, tampered) = dkimpy_verify(&file, w.dns_port);
    assert!(ok, "dkimpy must verify godwit's signature:\n{text}");
    assert!(!tampered, "dkimpy must reject the tampered copy");
    // Evidence: the accepted event says outbound; the Postfix-style line
    // names the MX host and address; /metrics counts it.
    let accepted =
        w.gw.wait_event("message.accepted", Duration::from_secs(2), |e| {
            e["mail_from"] == "alice@example.com"
        });
    assert_eq!(accepted["direction"], "outbound");
    let maillog = w.gw.data.parent().unwrap().join("maillog");
    wait_for("the relay= log line", Duration::from_secs(5), || {
        std::fs::read_to_string(&maillog)
            .ok()?
            .lines()
            .find(|l| l.contains("to=<bob@foreign.test>") && l.contains("status=sent"))
            .filter(|l| l.contains("relay=mx1.foreign.test[127.0.0.2]:"))
            .map(|_| ())
    });
    let (_, metrics) = w.gw.admin_get("/metrics");
    assert!(
        metrics.contains("godwit_messages_accepted_by_direction_total{direction=\"outbound\"} 1"),
        "{metrics}"
    );
}

/// A 50 MB message leaves by MX signed, and signing it costs a chunk of
/// memory, not the message: the body hash is fed from the spool as it is
/// read. dkimpy verifies the delivered copy. Before, each attempt read the
/// whole body to sign it: the peak rose by at least 50 MB.
#[test]
fn a_fifty_megabyte_message_is_signed_in_bounded_memory() {
    const MB50: usize = 50 * 1024 * 1024;
    let w = world_with("max_message_size = \"64MB\"", "", "");
    let mut c = relay_client(&w);
    // A small message first: the runtime, its threads and pools are warm.
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("warm@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
        e["rcpt"] == "bob@foreign.test"
    });
    let before = vm_hwm_kb(w.gw.pid());
    let mut m = out_message("big@example.com", "carol@foreign.test");
    let mut i = 0usize;
    while m.len() < MB50 {
        m.push_str(&format!("line {i:09} {}\r\n", "abc  def\tghij ".repeat(5)));
        i += 1;
    }
    let r = c.mail("alice@example.com", &["carol@foreign.test"], &m);
    assert!(r.starts_with("250"), "{r}");
    w.gw.wait_event("delivery.delivered", Duration::from_secs(120), |e| {
        e["rcpt"] == "carol@foreign.test"
    });
    let grew_mb = vm_hwm_kb(w.gw.pid()).saturating_sub(before) / 1024;
    eprintln!("signing and relaying 50 MB raised the peak by {grew_mb} MB");
    // As in engine's 50 MB test: buffers of a few hundred KB per stage and
    // the allocator's per-thread pages; a whole copy would add 50 MB.
    assert!(
        grew_mb < 40,
        "signing and relaying 50 MB raised the peak by {grew_mb} MB"
    );
    let file = wait_for(
        "the big message at the MX sink",
        Duration::from_secs(20),
        || {
            w.mx.files().into_iter().find(|f| {
                // smtp-sink stores lines with LF alone: a little shorter.
                std::fs::metadata(f).is_ok_and(|m| m.len() as usize >= MB50 * 9 / 10)
                    && std::fs::read(f).is_ok_and(|t| {
                        String::from_utf8_lossy(&t[..16384])
                            .contains("Message-ID: <big@example.com>")
                    })
            })
        },
    );
    let (ok, tampered) = dkimpy_verify(&file, w.dns_port);
    assert!(ok, "dkimpy must verify the 50 MB message's signature");
    assert!(!tampered, "dkimpy must reject the tampered copy");
}

#[test]
fn implicit_mx_delivers_to_the_domains_own_address() {
    let w = world("", "");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["carol@implicit.test"],
        &out_message("implicit1@example.com", "carol@implicit.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let d =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "carol@implicit.test"
        });
    assert!(
        d["host"]
            .as_str()
            .unwrap()
            .starts_with("implicit.test[127.0.0.2]:"),
        "{d}"
    );
}

#[test]
fn null_mx_fails_at_once_with_556_and_a_dsn() {
    let w = world("", "");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["nobody@nullmx.test"],
        &out_message("null1@example.com", "nobody@nullmx.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let f =
        w.gw.wait_event("delivery.failed", Duration::from_secs(20), |e| {
            e["rcpt"] == "nobody@nullmx.test"
        });
    let reply = f["reply"].as_str().unwrap();
    assert!(reply.starts_with("556 5.1.10"), "{reply}");
    // At once: no deferral came first.
    assert!(
        w.gw.events_named("delivery.deferred")
            .iter()
            .all(|e| e["rcpt"] != "nobody@nullmx.test")
    );
    // The DSN goes to the sender, through the inbound routing (platform old).
    wait_for(
        "the DSN at the sender's platform",
        Duration::from_secs(20),
        || (w.old.count_containing("5.1.10") > 0).then_some(()),
    );
}

#[test]
fn a_5xx_from_the_internet_bounces_even_with_soft_bounce() {
    // soft_bounce is for platforms mid-migration only.
    let w = world("soft_bounce = true", "");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["dave@refusing.test"],
        &out_message("bounce1@example.com", "dave@refusing.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let f =
        w.gw.wait_event("delivery.failed", Duration::from_secs(20), |e| {
            e["rcpt"] == "dave@refusing.test"
        });
    assert!(f["reply"].as_str().unwrap().starts_with('5'), "{f}");
    w.gw.wait_event("dsn.queued", Duration::from_secs(5), |e| {
        e["to"] == "alice@example.com"
    });
    wait_for(
        "the DSN at alice's platform",
        Duration::from_secs(20),
        || (w.old.count_containing("dave@refusing.test") > 0).then_some(()),
    );
}

#[test]
fn mail_between_our_users_stays_inside() {
    let w = world("", "");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["carol@example.com", "bob@foreign.test"],
        &out_message("mixed1@example.com", "carol@example.com"),
    );
    assert!(r.starts_with("250"), "{r}");
    let inside =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "carol@example.com"
        });
    // The inbound routing map's platform, not the internet.
    assert_eq!(inside["platform"], "old");
    let outside =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "bob@foreign.test"
        });
    assert_eq!(outside["platform"], "mx:foreign.test");
    let at_platform = w.old.messages();
    assert!(
        at_platform
            .iter()
            .any(|m| m.contains("X-Rcpt-Args: <carol@example.com>"))
    );
    assert!(
        at_platform
            .iter()
            .all(|m| !m.contains("bob@foreign.test>\n"))
    );
}

fn swaks(args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(args)
        .output()
        .expect("swaks is installed (scripts/install-peers)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn a_client_outside_relay_networks_gets_554_for_foreign_recipients() {
    let w = world("", "");
    let server = format!("127.0.0.1:{}", w.relay_port);
    // 127.0.0.9 is loopback but outside relay_networks (127.0.0.1/32).
    let out = swaks(&[
        "--server",
        &server,
        "--local-interface",
        "127.0.0.9",
        "--from",
        "x@example.com",
        "--to",
        "bob@foreign.test",
        "--quit-after",
        "RCPT",
    ]);
    assert!(
        out.contains("<** 554 5.7.1 <bob@foreign.test>: Relay access denied"),
        "{out}"
    );
    // Our own domains are still accepted from anywhere.
    let out = swaks(&[
        "--server",
        &server,
        "--local-interface",
        "127.0.0.9",
        "--from",
        "x@foreign.test",
        "--to",
        "carol@example.com",
        "--quit-after",
        "RCPT",
    ]);
    assert!(out.contains("<-  250"), "{out}");
}

#[test]
fn the_inbound_listener_still_refuses_foreign_recipients() {
    let w = world("", "");
    // From 127.0.0.1, inside relay_networks, but on the inbound port.
    let mut c = w.gw.client();
    c.greet();
    assert!(c.cmd("MAIL FROM:<x@example.com>").starts_with("250"));
    let r = c.cmd("RCPT TO:<bob@foreign.test>");
    assert!(r.starts_with("554 5.7.1"), "{r}");
}

#[test]
fn sigkill_under_outbound_load_loses_nothing_acknowledged() {
    const N: usize = 300;
    let w = Arc::new(Mutex::new(world("", "")));
    let port = w.lock().unwrap().relay_port;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut threads = Vec::new();
    for s in 0..4 {
        let acked = acked.clone();
        threads.push(std::thread::spawn(move || {
            let mut conn: Option<Client> = None;
            for i in (s..N).step_by(4) {
                let id = format!("load{i:04}@example.com");
                loop {
                    if conn.is_none() {
                        match std::panic::catch_unwind(|| {
                            let mut c = Client::connect(port);
                            c.greet();
                            c
                        }) {
                            Ok(c) => conn = Some(c),
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        }
                    }
                    let c = conn.as_mut().unwrap();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.mail(
                            "alice@example.com",
                            &["bob@foreign.test"],
                            &out_message(&id, "bob@foreign.test"),
                        )
                    }));
                    match r {
                        Ok(r) if r.starts_with("250") => {
                            acked.lock().unwrap().insert(id.clone());
                            break;
                        }
                        _ => conn = None,
                    }
                }
            }
        }));
    }
    // Kill while mail is flowing, then start again.
    wait_for("some acknowledged mail", Duration::from_secs(30), || {
        (acked.lock().unwrap().len() >= N / 3).then_some(())
    });
    {
        let mut g = w.lock().unwrap();
        g.gw.kill9();
        g.gw.restart();
    }
    for t in threads {
        t.join().unwrap();
    }
    std::panic::set_hook(default_hook);
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), N);
    let g = w.lock().unwrap();
    wait_for(
        "every acknowledged message at the MX",
        Duration::from_secs(60),
        || {
            let got: HashSet<String> =
                g.mx.messages()
                    .iter()
                    .filter_map(|m| {
                        m.lines()
                            .find_map(|l| l.strip_prefix("Message-ID: <"))
                            .map(|s| s.trim_end_matches('>').to_string())
                    })
                    .collect();
            acked.iter().all(|id| got.contains(id)).then_some(())
        },
    );
}

fn version_of(out: &str) -> i64 {
    out.rsplit("version ")
        .next()
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or_else(|_| panic!("no version in: {out}"))
}

fn wait_applied(gw: &Gateway, version: i64) {
    gw.wait_event("route.changed", Duration::from_secs(5), |e| {
        e["version"].as_i64() >= Some(version)
    });
}

#[test]
fn set_outbound_sends_a_sender_via_the_platform_smarthost_and_rolls_back() {
    let mut w = world("", "");
    let smarthost = Sink::start(free_port(), &[]);
    let sp = smarthost.port;
    w.gw.reconfigure(|c| {
        c.replacen(
            "[platforms.new]\n",
            &format!(
                "[platforms.new]\noutbound_relay = [\"127.0.0.1:{sp}\"]\noutbound_tls = \"none\"\n"
            ),
            1,
        )
    });
    wait_relay_port(w.relay_port);
    let (ok, out) =
        w.gw.cli(&["route", "set-outbound", "nobody@foreign.test", "new"]);
    assert!(!ok && out.contains("not in an accepted domain"), "{out}");
    let (ok, out) =
        w.gw.cli(&["route", "set-outbound", "alice@example.com", "old"]);
    assert!(!ok && out.contains("no outbound_relay"), "{out}");
    let (ok, out) =
        w.gw.cli(&["route", "set-outbound", "alice@example.com", "new"]);
    assert!(ok, "{out}");
    let v = version_of(&out);
    wait_applied(&w.gw, v);
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("via1@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let d =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "bob@foreign.test"
        });
    assert_eq!(d["platform"], "smarthost:new");
    wait_for(
        "the message at the smarthost",
        Duration::from_secs(5),
        || {
            smarthost
                .messages()
                .into_iter()
                .find(|m| m.contains("via1@example.com"))
        },
    );
    let (_, history) = w.gw.cli(&["history"]);
    assert!(
        history.contains("route set-outbound alice@example.com new"),
        "{history}"
    );
    // Roll back to before the change: alice's mail goes to the MX again.
    let (ok, out) =
        w.gw.cli(&["route", "rollback", "--to", &(v - 1).to_string()]);
    assert!(ok, "{out}");
    wait_for("the rollback to apply", Duration::from_secs(5), || {
        w.gw.events_named("route.changed")
            .iter()
            .any(|e| e["version"].as_i64() > Some(v))
            .then_some(())
    });
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("via2@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let d =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "bob@foreign.test" && e["platform"] != "smarthost:new"
        });
    assert_eq!(d["platform"], "mx:foreign.test");
    wait_for(
        "the second message at the MX",
        Duration::from_secs(5),
        || {
            w.mx.messages()
                .into_iter()
                .find(|m| m.contains("via2@example.com"))
        },
    );
}

#[test]
fn check_outbound_gives_a_verdict_and_fails_on_an_unauthorized_egress_ip() {
    let mut w = world("", "egress_ips = [\"203.0.113.55\"]");
    // `dkim show` prints the record for the configured key: the one keygen printed.
    let (ok, shown) = w.gw.cli(&["dkim", "show"]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains(&format!(
            "{SELECTOR}._domainkey.example.com TXT \"v=DKIM1; k=rsa; p=MII"
        )),
        "{shown}"
    );
    let (ok, out) = w.gw.cli(&["check", "outbound"]);
    // example.com: SPF passes, the DKIM record matches, HELO resolves and its
    // PTR (dnsmasq's --host-record) names it, DMARC aligns.
    for line in [
        "example.com from 203.0.113.55",
        "gw2026._domainkey.example.com",
        "mx-gw.example.com",
        "From: *@example.com",
    ] {
        let l = out
            .lines()
            .find(|l| l.contains(line))
            .unwrap_or_else(|| panic!("no finding for {line}:\n{out}"));
        assert!(l.contains("OK"), "{l}\n{out}");
    }
    // example.org has no key: godwit cannot sign for it, so the verdict fails.
    assert!(!ok, "{out}");
    assert!(out.contains("example.org"), "{out}");
    // An egress IP SPF does not authorize is a failure, named.
    w.gw.reconfigure(|c| {
        c.replace(
            "egress_ips = [\"203.0.113.55\"]",
            "egress_ips = [\"203.0.113.55\", \"198.51.100.7\"]",
        )
    });
    let (ok, out) = w.gw.cli(&["check", "outbound", "--json"]);
    assert!(!ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let spf_bad = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "outbound.spf" && f["subject"] == "example.com from 198.51.100.7")
        .unwrap_or_else(|| panic!("{out}"))
        .clone();
    assert_eq!(spf_bad["severity"], "BLOCK");
}

#[test]
fn tls_require_defers_rather_than_send_in_clear_text() {
    // smtp-sink offers no STARTTLS: mail for a tls_require domain waits.
    let w = world("", "tls_require = [\"foreign.test\"]");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test", "carol@implicit.test"],
        &out_message("tls1@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let d =
        w.gw.wait_event("delivery.deferred", Duration::from_secs(20), |e| {
            e["rcpt"] == "bob@foreign.test"
        });
    let reply = d["reply"].as_str().unwrap();
    assert!(
        reply.contains("4.7.10") && reply.contains("STARTTLS"),
        "{reply}"
    );
    // Opportunistic elsewhere: the same sink takes the other recipient in clear text.
    w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
        e["rcpt"] == "carol@implicit.test"
    });
}

#[test]
fn a_platforms_own_signature_is_kept_and_ours_added() {
    let w = world("", "");
    let mut c = relay_client(&w);
    let theirs =
        "DKIM-Signature: v=1; a=rsa-sha256; d=platform.example; s=p1; h=from; bh=AAAA; b=BBBB\r\n";
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &format!(
            "{theirs}{}",
            out_message("kept1@example.com", "bob@foreign.test")
        ),
    );
    assert!(r.starts_with("250"), "{r}");
    // The sink has written the whole file once it answered the 250.
    w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
        e["rcpt"] == "bob@foreign.test"
    });
    let text = wait_for("the message at the MX sink", Duration::from_secs(5), || {
        w.mx.messages()
            .into_iter()
            .find(|m| m.contains("kept1@example.com"))
    });
    assert!(text.contains("d=platform.example; s=p1"), "{text}");
    assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
    let ours = text.find("d=example.com").unwrap();
    assert!(
        ours < text.find("d=platform.example").unwrap(),
        "ours goes on top"
    );
}

/// The two halves of issue 14 together: a user authenticates on the
/// submission port (swaks, STARTTLS, AUTH PLAIN against a `{SHA512-CRYPT}`
/// passwd-file line made by `doveadm pw`) and sends to a foreign recipient;
/// the message leaves by MX, DKIM-signed, and dkimpy verifies it. Without
/// AUTH the same recipient is refused.
#[test]
fn an_authenticated_submission_leaves_by_mx_signed() {
    let mut w = world("", "");
    let dir = w.gw.data.parent().unwrap().to_path_buf();
    let hash = Command::new("doveadm")
        .args(["pw", "-s", "SHA512-CRYPT", "-p", "Subm-Pw-77"])
        .output()
        .expect("doveadm (Debian dovecot-core)");
    assert!(hash.status.success(), "{hash:?}");
    let users = dir.join("users");
    std::fs::write(
        &users,
        format!(
            "alice@example.com:{}::::::\n",
            String::from_utf8_lossy(&hash.stdout).trim()
        ),
    )
    .unwrap();
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("sub.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("sub.key"), c.signing_key.serialize_pem()).unwrap();
    let sub = free_port();
    let section = format!(
        "[submission]\nlisten = [\"127.0.0.1:{sub}\"]\nauth = \"file\"\nusers_file = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        users.display(),
        dir.join("sub.pem").display(),
        dir.join("sub.key").display()
    );
    w.gw.reconfigure(|c| format!("{c}\n{section}"));
    wait_for("the submission port", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", sub)).ok()
    });
    let server = format!("127.0.0.1:{sub}");
    let base = [
        "--server",
        &server,
        "--tls",
        "--from",
        "alice@example.com",
        "--to",
        "carol@foreign.test",
        "--header",
        "From: Alice <alice@example.com>",
        "--header",
        "Subject: outbound submitted",
    ];
    // No AUTH: the submission port requires it (RFC 6409 4.3).
    let out = swaks(&base);
    assert!(out.contains("530 5.7.0"), "{out}");
    let mut args = base.to_vec();
    args.extend([
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice@example.com",
        "--auth-password",
        "Subm-Pw-77",
    ]);
    let out = swaks(&args);
    assert!(out.contains("235 2.7.0"), "{out}");
    assert!(out.contains("<~  250 2.0.0"), "{out}");
    let delivered =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "carol@foreign.test"
        });
    assert_eq!(delivered["platform"], "mx:foreign.test");
    let file = wait_for("the message at the MX sink", Duration::from_secs(5), || {
        w.mx.files().into_iter().next()
    });
    let (ok, tampered) = dkimpy_verify(&file, w.dns_port);
    assert!(
        ok && !tampered,
        "{}",
        std::fs::read_to_string(&file).unwrap()
    );
    let accepted =
        w.gw.wait_event("message.accepted", Duration::from_secs(2), |e| {
            e["sasl_username"] == "alice@example.com"
        });
    assert_eq!(accepted["direction"], "outbound", "{accepted}");
}

/// The `t=` tag of the first DKIM-Signature of ours (d=example.com) in `text`.
fn dkim_t(text: &str) -> i64 {
    let sig: String = {
        let start = text
            .find("DKIM-Signature:")
            .unwrap_or_else(|| panic!("no DKIM-Signature:\n{text}"));
        // The header with its folded continuation lines.
        let mut lines = text[start..].lines();
        let mut h = lines.next().unwrap().to_string();
        for l in lines {
            if l.starts_with([' ', '\t']) {
                h.push_str(l);
            } else {
                break;
            }
        }
        h
    };
    assert!(sig.contains("d=example.com"), "{sig}");
    sig.split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix("t="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no t= in {sig}"))
}

/// RFC 6376 signs on the way out, not in the spool: the MX first records
/// the DATA and answers 450 at the final dot (smtp-sink `-r .`), then a
/// plain sink takes the retry. Each attempt carries a signature made at
/// that attempt (a later `t=` on the retry), dkimpy verifies the delivered
/// copy, and the spooled original meanwhile holds no signature of ours.
#[test]
fn a_retry_is_signed_afresh_and_the_spool_keeps_the_original() {
    let w = world("", "");
    let deferring = MxSink::start("127.0.0.4", w.mx_port, &["-r", "."]);
    let before_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["erin@retry.test"],
        &out_message("retry1@example.com", "erin@retry.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let deferred =
        w.gw.wait_event("delivery.deferred", Duration::from_secs(20), |e| {
            e["rcpt"] == "erin@retry.test"
        });
    assert!(
        deferred["reply"].as_str().unwrap().starts_with("450"),
        "{deferred}"
    );
    let first = wait_for(
        "the first attempt recorded by the deferring MX",
        Duration::from_secs(5),
        || {
            deferring
                .messages()
                .into_iter()
                .find(|m| m.contains("retry1@example.com") && m.contains("Hello from"))
        },
    );
    let t_first = dkim_t(&first);
    assert!(
        t_first >= before_s,
        "t={t_first} before the accept ({before_s})"
    );
    // The spool holds the message as accepted: no signature of ours.
    let qid = deferred["queue_id"].as_str().unwrap();
    let spooled = std::fs::read(w.gw.data.join("spool/queue").join(qid))
        .unwrap_or_else(|e| panic!("the spooled message {qid}: {e}"));
    let spooled = String::from_utf8_lossy(&spooled);
    assert!(spooled.contains("retry1@example.com"), "{spooled}");
    assert!(!spooled.contains("DKIM-Signature"), "{spooled}");
    // The MX recovers: the retry goes to a sink that takes it.
    drop(deferring);
    let taking = MxSink::start("127.0.0.4", w.mx_port, &[]);
    w.gw.wait_event("delivery.delivered", Duration::from_secs(30), |e| {
        e["rcpt"] == "erin@retry.test"
    });
    let file = wait_for("the retry at the MX", Duration::from_secs(5), || {
        taking.files().into_iter().next()
    });
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.matches("DKIM-Signature:").count(), 1, "{text}");
    let t_retry = dkim_t(&text);
    assert!(
        t_retry > t_first,
        "the retry's t={t_retry} must be later than the first attempt's t={t_first}"
    );
    let (ok, tampered) = dkimpy_verify(&file, w.dns_port);
    assert!(ok && !tampered, "dkimpy on the retry:\n{text}");
}

/// The destination names `queue destinations --json` lists now.
fn destination_names(gw: &Gateway) -> Vec<String> {
    let (ok, out) = gw.cli(&["queue", "destinations", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().next().unwrap()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["destinations"]
        .as_object()
        .unwrap_or_else(|| panic!("{out}"))
        .keys()
        .cloned()
        .collect()
}

/// One `mx:DOMAIN` destination per recipient domain ever seen would grow
/// without bound: an idle one (nothing queued, circuit closed, no attempt
/// for `destination_idle`) is forgotten, while one with deferred mail
/// stays; the platforms always stay; mail for a forgotten domain later
/// makes a fresh destination and is delivered.
#[test]
fn idle_outbound_destinations_are_pruned_and_come_back() {
    let mut w = world("", "destination_idle = \"1s\"");
    // The pruner says at info level what it forgot and why.
    w.gw.env
        .push(("RUST_LOG".into(), "warn,godwit_relay=info".into()));
    w.gw.reconfigure(|c| c);
    wait_relay_port(w.relay_port);
    // retry.test's MX answers 450 to every DATA: its mail stays queued.
    let _deferring = MxSink::start("127.0.0.4", w.mx_port, &["-r", "."]);
    let mut c = relay_client(&w);
    for (id, rcpt) in [
        ("prune1@example.com", "bob@foreign.test"),
        ("prune2@example.com", "carol@implicit.test"),
        ("prune3@example.com", "erin@retry.test"),
    ] {
        let r = c.mail("alice@example.com", &[rcpt], &out_message(id, rcpt));
        assert!(r.starts_with("250"), "{r}");
    }
    for rcpt in ["bob@foreign.test", "carol@implicit.test"] {
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == rcpt
        });
    }
    w.gw.wait_event("delivery.deferred", Duration::from_secs(20), |e| {
        e["rcpt"] == "erin@retry.test"
    });
    let names = wait_for(
        "the idle MX destinations to be forgotten",
        Duration::from_secs(20),
        || {
            // The listing comes from the gateway's heartbeat (every second):
            // one taken before the MX destinations existed also lacks the
            // two, so wait for a listing that has retry.test's as well.
            let names = destination_names(&w.gw);
            (names.iter().any(|n| n == "mx:retry.test")
                && !names
                    .iter()
                    .any(|n| n == "mx:foreign.test" || n == "mx:implicit.test"))
            .then_some(names)
        },
    );
    // In the same listing: the platforms, and the domain with queued mail.
    for kept in ["old", "new", "mx:retry.test"] {
        assert!(
            names.iter().any(|n| n == kept),
            "{kept} in {names:?}; erin's events: {:?}\ngodwit's log:\n{}",
            w.gw.events()
                .into_iter()
                .filter(|e| e.to_string().contains("erin@retry.test"))
                .collect::<Vec<_>>(),
            std::fs::read_to_string(w.gw.data.with_extension("log")).unwrap_or_default()
        );
    }
    // A forgotten domain comes back with its next message.
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("prune4@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for(
        "the second message at foreign.test's MX",
        Duration::from_secs(20),
        || {
            w.mx.messages()
                .into_iter()
                .find(|m| m.contains("prune4@example.com"))
        },
    );
}

/// Outbound mail is evidence like inbound, counted apart: `godwit report`
/// (JSON and text) and the dashboard, read by headless Chromium, show the
/// outbound messages and their `mx:DOMAIN` deliveries beside, not inside,
/// the inbound ones.
#[test]
fn outbound_mail_shows_apart_in_the_report_and_on_the_dashboard() {
    let w = world("", "");
    let mut inbound = w.gw.client();
    inbound.greet();
    let r = inbound.mail(
        "someone@outside.test",
        &["u@example.com"],
        &message("in1@outside.test", "inbound"),
    );
    assert!(r.starts_with("250"), "{r}");
    let mut c = relay_client(&w);
    for i in 0..2 {
        let id = format!("dir{i}@example.com");
        let r = c.mail(
            "alice@example.com",
            &["bob@foreign.test"],
            &out_message(&id, "bob@foreign.test"),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    wait_for("the deliveries", Duration::from_secs(20), || {
        let d = w.gw.events_named("delivery.delivered");
        (d.iter()
            .filter(|e| e["platform"] == "mx:foreign.test")
            .count()
            == 2
            && d.iter().any(|e| e["platform"] == "old"))
        .then_some(())
    });
    let report = wait_for(
        "the report to count it all",
        Duration::from_secs(20),
        || {
            let (ok, out) = w.gw.cli(&[
                "report", "--since", "10m", "--format", "json", "--sample", "0",
            ]);
            assert!(ok, "{out}");
            let v: serde_json::Value =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            (v["by_direction"]["outbound"]["delivered"] == 2
                && v["by_direction"]["inbound"]["delivered"] == 1)
                .then_some(v)
        },
    );
    let dir = &report["by_direction"];
    assert_eq!(dir["outbound"]["accepted"], 2, "{report}");
    assert_eq!(dir["inbound"]["accepted"], 1, "{report}");
    assert_eq!(report["accepted"], 3, "{report}");
    assert_eq!(report["delivered_by_platform"]["mx:foreign.test"], 2);
    assert_eq!(report["delivered_by_platform"]["old"], 1);
    let (ok, text) = w.gw.cli(&["report", "--since", "10m", "--sample", "0"]);
    assert!(ok, "{text}");
    assert!(text.contains("| outbound | 2 | 2 | 0 | 0 |"), "{text}");
    assert!(text.contains("| inbound | 1 | 1 | 0 | 0 |"), "{text}");
    assert!(text.contains("| mx:foreign.test | 2 |"), "{text}");
    // The dashboard, as a browser draws it.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/", w.gw.admin_port);
    let dom = String::from_utf8_lossy(&chromium(profile.path(), &url, &["--dump-dom"]).stdout)
        .to_string();
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the page did not load:\n{dom}"
    );
    let value = |id: &str| element_text(&dom, id);
    assert_eq!(value("dir-outbound-accepted"), "2");
    assert_eq!(value("dir-outbound-delivered"), "2");
    assert_eq!(value("dir-inbound-accepted"), "1");
    assert_eq!(value("dir-inbound-delivered"), "1");
    assert_eq!(value("delivered-mx:foreign.test"), "2");
    assert_eq!(value("delivered-old"), "1");
}

/// Dovecot's submission service (Debian dovecot-submissiond) as a
/// platform's smarthost: STARTTLS with a CA-signed certificate, AUTH PLAIN
/// and LOGIN against its own passwd-file only after TLS, relaying what it
/// accepts to an smtp-sink (`submission_relay_host`).
struct DovecotSubmission {
    port: u16,
    dir: std::path::PathBuf,
    ca: std::path::PathBuf,
    sink: Sink,
    _tmp: tempfile::TempDir,
}

impl DovecotSubmission {
    fn start(user: &str, password: &str) -> DovecotSubmission {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let (cert, key, ca) = ca_signed(&dir, "Smarthost Test CA");
        let sink = Sink::start(free_port(), &[]);
        let port = free_port();
        for d in ["run", "state", "home"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(
            dir.join("users"),
            format!("{user}:{{PLAIN}}{password}::::::\n"),
        )
        .unwrap();
        let d = dir.display();
        let conf = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\n\
             listen = 127.0.0.1\nprotocols = submission\nhostname = smarthost.test\n\
             ssl = yes\nssl_cert = <{}\nssl_key = <{}\n\
             disable_plaintext_auth = yes\nauth_mechanisms = plain login\nauth_verbose = yes\n\
             first_valid_uid = 100\nmail_location = maildir:{d}/home/%u/Maildir\n\
             submission_relay_host = 127.0.0.1\nsubmission_relay_port = {}\nsubmission_relay_trusted = yes\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/users\n}}\n\
             userdb {{\n  driver = static\n  args = uid=vmail gid=vmail home={d}/home/%u\n}}\n\
             service submission-login {{\n  chroot =\n  inet_listener submission {{\n    port = {port}\n  }}\n}}\n\
             service anvil {{\n  chroot =\n}}\n",
            cert.display(),
            key.display(),
            sink.port
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        // The mail user (vmail, as PEERS.md sets up) owns the session's home.
        Command::new("chown")
            .args(["-R", "vmail:vmail"])
            .arg(dir.join("home"))
            .status()
            .unwrap();
        let st = Command::new("dovecot")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            // The daemon forks and outlives this call: not on the test's stdio.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("dovecot (Debian dovecot-core + dovecot-submissiond)");
        assert!(
            st.success(),
            "dovecot failed to start: {}",
            std::fs::read_to_string(dir.join("dovecot.log")).unwrap_or_default()
        );
        wait_for(
            "Dovecot submission to listen",
            Duration::from_secs(10),
            || TcpStream::connect(("127.0.0.1", port)).ok(),
        );
        DovecotSubmission {
            port,
            dir,
            ca,
            sink,
            _tmp: tmp,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for DovecotSubmission {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/master.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// Every file under `dir` (recursively) that contains `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// `route set-outbound` to a platform whose smarthost wants SMTP AUTH
/// (RFC 4954) over required, verified TLS: Dovecot's submission service
/// logs the login, relays the mail to its sink, and a wrong password
/// defers (never bounces) with an error naming the smarthost and the user.
/// The password appears in no file godwit writes, at debug log level.
#[test]
fn smarthost_auth_over_required_tls_and_a_wrong_password_defers() {
    const USER: &str = "relay@example.com";
    const GOOD: &str = "Smart-Pw-9x7";
    const BAD: &str = "Wrong-Pw-3q1";
    let mut w = world("", "");
    let smarthost = DovecotSubmission::start(USER, GOOD);
    let dir = w.gw.data.parent().unwrap().to_path_buf();
    // Outside godwit's own directory, so the scan below finds only leaks.
    let secrets = tempfile::tempdir().unwrap();
    let pw_file = secrets.path().join("smarthost.pw");
    std::fs::write(&pw_file, format!("{GOOD}\n")).unwrap();
    let sp = smarthost.port;
    w.gw.env.push(("RUST_LOG".into(), "debug".into()));
    w.gw.reconfigure(|c| {
        c.replacen(
            "[platforms.new]\n",
            &format!(
                "[platforms.new]\noutbound_relay = [\"127.0.0.1:{sp}\"]\noutbound_user = \"{USER}\"\n\
                 outbound_password_file = \"{}\"\noutbound_tls = \"require\"\ntls_ca = \"{}\"\n",
                pw_file.display(),
                smarthost.ca.display()
            ),
            1,
        )
    });
    wait_relay_port(w.relay_port);
    let (ok, out) =
        w.gw.cli(&["route", "set-outbound", "alice@example.com", "new"]);
    assert!(ok, "{out}");
    wait_applied(&w.gw, version_of(&out));
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("auth1@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let d =
        w.gw.wait_event("delivery.delivered", Duration::from_secs(20), |e| {
            e["rcpt"] == "bob@foreign.test"
        });
    assert_eq!(d["platform"], "smarthost:new");
    let relayed = wait_for(
        "the mail behind the smarthost",
        Duration::from_secs(10),
        || {
            smarthost
                .sink
                .messages()
                .into_iter()
                .find(|m| m.contains("auth1@example.com"))
        },
    );
    assert!(relayed.contains("DKIM-Signature:"), "{relayed}");
    let log = smarthost.log();
    assert!(
        log.contains(&format!("Login: user=<{USER}>, method=PLAIN"))
            && log
                .lines()
                .any(|l| l.contains("submission-login") && l.contains("TLS")),
        "Dovecot saw no AUTH over TLS:\n{log}"
    );
    assert!(log.contains("Successfully relayed message"), "{log}");
    // The operator typed the password wrong: the mail waits, and says why.
    drop(c);
    std::fs::write(&pw_file, format!("{BAD}\n")).unwrap();
    w.gw.reconfigure(|c| c);
    wait_relay_port(w.relay_port);
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("auth2@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    let deferred =
        w.gw.wait_event("delivery.deferred", Duration::from_secs(30), |e| {
            e["rcpt"] == "bob@foreign.test" && e["platform"] == "smarthost:new"
        });
    let reply = deferred["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("454 4.7.0")
            && reply.contains(&format!("AUTH as {USER}"))
            && reply.contains(&format!("127.0.0.1:{sp}")),
        "{reply}"
    );
    wait_for(
        "Dovecot to log the mismatch",
        Duration::from_secs(10),
        || smarthost.log().contains("Password mismatch").then_some(()),
    );
    assert!(
        w.gw.events_named("delivery.failed")
            .iter()
            .all(|e| e["rcpt"] != "bob@foreign.test"),
        "a refused AUTH must not bounce"
    );
    // Neither password in anything godwit wrote: its log, the events,
    // the Postfix-style maillog, the spool, the store.
    for pw in [GOOD, BAD] {
        let leaks = files_containing(&dir, pw);
        assert!(leaks.is_empty(), "{pw} leaked into {leaks:?}");
    }
    let godwit_log = std::fs::read_to_string(w.gw.data.with_extension("log")).unwrap();
    assert!(godwit_log.contains("DEBUG"), "the log ran at debug level");
}

#[test]
fn doctor_names_an_outbound_5xx_burst_by_domain_and_code_and_exits_4() {
    let w = world("", "egress_ips = [\"203.0.113.55\"]");
    let mut c = relay_client(&w);
    for i in 0..3 {
        let to = format!("u{i}@refusing.test");
        let r = c.mail(
            "alice@example.com",
            &[&to],
            &out_message(&format!("burst{i}@example.com"), &to),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    let (code, out) = wait_for("doctor to see the bounces", Duration::from_secs(30), || {
        let (code, out) = w.gw.cli_code(&["doctor"]);
        (code == 4).then_some((code, out))
    });
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("4. Is outbound deliverability tanking? [BROKEN]"),
        "{out}"
    );
    // smtp-sink -f: "500 5.3.0 Error: command failed" at RCPT.
    assert!(
        out.contains("bounced by refusing.test: 3 x 500 5.3.0"),
        "{out}"
    );
    assert!(out.contains("5. Are clients failing rather than mailflow? [not reached]"));
}

#[test]
fn doctor_passes_question_4_for_healthy_aligned_outbound_mail() {
    let w = world("", "egress_ips = [\"203.0.113.55\"]");
    let mut c = relay_client(&w);
    let r = c.mail(
        "alice@example.com",
        &["bob@foreign.test"],
        &out_message("healthy@example.com", "bob@foreign.test"),
    );
    assert!(r.starts_with("250"), "{r}");
    w.gw.wait_event("delivery.delivered", Duration::from_secs(30), |e| {
        e["rcpt"] == "bob@foreign.test"
    });
    let (code, out) = w.gw.cli_code(&["doctor"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("4. Is outbound deliverability tanking? [ok]"),
        "{out}"
    );
    // Our own signature, verified by mail-auth against dnsmasq's key; SPF
    // for the egress IP; DMARC p=reject passes.
    assert!(
        out.contains(
            "sample From *@example.com via 203.0.113.55: dkim=pass spf=pass dmarc=pass (p=reject)"
        ),
        "{out}"
    );
    drop(c);
}
