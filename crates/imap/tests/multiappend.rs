//! MULTIAPPEND (RFC 3502): a batch of new messages goes to a target that
//! advertises it as one APPEND command with LITERAL+ literals (RFC 7888),
//! each with its flags and internal date, and lands intact (read back by
//! Python's imaplib, not by godwit). A target without it gets one APPEND per
//! message; a refused MULTIAPPEND is sent again one by one, so only the
//! message the server will not take is refused.

mod common;

use common::*;
use godwit_imap::conn::{AppendItem, Conn, Server};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const USER: &str = "multi@example.com";

/// A TCP relay that records what the client sent, to see the commands on the wire.
async fn recording_proxy(to: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = TcpStream::connect(("127.0.0.1", to)).await.unwrap();
            let rec = rec.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            let _ = sw.shutdown().await;
                            return;
                        }
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (port, seen)
}

/// Every message of every folder, as imaplib reads it: Message-ID, flags
/// (without \Recent), INTERNALDATE and the body's SHA-256, sorted.
fn imaplib_dump(port: u16) -> serde_json::Value {
    let script = r#"
import imaplib, json, hashlib, re, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login(sys.argv[2], sys.argv[3])
out = {}
for line in m.list()[1]:
    name = line.decode().rsplit(' ', 1)[1]
    if m.select(name, readonly=True)[0] != 'OK':
        continue
    typ, data = m.uid('FETCH', '1:*', '(FLAGS INTERNALDATE BODY.PEEK[])')
    msgs = []
    for part in data:
        if not isinstance(part, tuple):
            continue
        meta, body = part[0].decode(), part[1]
        flags = sorted(f for f in re.search(r'FLAGS \(([^)]*)\)', meta).group(1).split() if f != '\\Recent')
        date = re.search(r'INTERNALDATE "([^"]+)"', meta).group(1)
        mid = re.search(rb'Message-ID: (\S+)', body).group(1).decode()
        msgs.append([mid, flags, date, hashlib.sha256(body).hexdigest(), len(body)])
    out[name.strip('"')] = sorted(msgs)
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &port.to_string(), USER, PASSWORD])
        .output()
        .expect("python3 runs imaplib");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiappend_lands_flags_dates_and_bodies_intact() {
    let source = Dovecot::start(Flavor::Source, &[USER]);
    let target = Dovecot::start(Flavor::Source, &[USER]);
    let mut src = login(source.port, USER).await;
    create(&mut src, "Archive.2024").await;
    let flags = [
        "(\\Seen)",
        "()",
        "(\\Flagged \\Seen)",
        "(\\Answered $Label1)",
    ];
    for i in 0..40 {
        let folder = if i % 3 == 0 { "Archive.2024" } else { "INBOX" };
        let body = if i % 7 == 0 {
            with_attachment(&format!("<att{i}@x>"), 20_000 + i * 100)
        } else {
            message(
                Some(&format!("<m{i}@x>")),
                &format!("s{i}"),
                &"é ".repeat(i * 50),
            )
        };
        let date = format!(
            "{:02}-Mar-2021 {:02}:17:05 +0{}00",
            1 + i % 28,
            i % 24,
            i % 10
        );
        append(&mut src, folder, flags[i % flags.len()], &date, &body).await;
    }
    let (proxy, seen) = recording_proxy(target.port).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let mut ep = endpoints(&source, &target, 4);
    ep.target = Server::from_url(&format!("imap://127.0.0.1:{proxy}")).unwrap();
    let r = sync_user(&store, &ep, USER).await;
    assert_eq!(r.error, None, "{r:#?}");
    assert_eq!(r.copied(), 40, "{r:#?}");

    // On the wire: one APPEND command per folder, carrying all its messages.
    let wire = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let appends = wire.matches(" APPEND ").count();
    let literals = wire.matches("+}\r\n").count();
    assert_eq!(literals, 40, "one LITERAL+ literal per message");
    assert_eq!(
        appends, 2,
        "one MULTIAPPEND per folder: {appends} APPEND commands"
    );
    assert!(!wire.contains("STORE"), "flags went in the APPEND");

    let (from, to) = (imaplib_dump(source.port), imaplib_dump(target.port));
    assert_eq!(from["INBOX"].as_array().unwrap().len(), 26);
    assert_eq!(from["Archive.2024"].as_array().unwrap().len(), 14);
    assert_eq!(from, to, "flags, dates and bodies byte for byte");

    // The APPENDUIDs of the uid-set were recorded per message: a second run
    // copies nothing and verify finds every pair.
    let again = sync_user(&store, &ep, USER).await;
    assert_eq!((again.error.clone(), again.copied()), (None, 0));
    let check =
        godwit_imap::verify::verify_account(&store, &ep, USER, &login_of(USER), &login_of(USER))
            .await;
    assert!(check.clean, "{check:#?}");
}

/// What the minimal server below received: per APPEND command, its messages' bodies.
type Received = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;

/// A deliberately minimal IMAP server: LOGIN, CAPABILITY, APPEND (one or
/// several messages, LITERAL+ only), LOGOUT. It refuses a whole APPEND
/// (RFC 3502 6.3.11) when one of its messages contains "REFUSE".
async fn minimal_server(caps: &'static str) -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Received = Arc::default();
    let rec = received.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (r, mut w) = tcp.into_split();
        let mut r = BufReader::new(r);
        w.write_all(format!("* OK [CAPABILITY {caps}] minimal\r\n").as_bytes())
            .await
            .unwrap();
        let mut next_uid = 1;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            let (tag, rest) = line.trim_end().split_once(' ').unwrap();
            let cmd = rest.split(' ').next().unwrap().to_ascii_uppercase();
            let answer = match cmd.as_str() {
                "LOGIN" => format!("{tag} OK logged in\r\n"),
                "CAPABILITY" => format!("* CAPABILITY {caps}\r\n{tag} OK done\r\n"),
                "LOGOUT" => format!("* BYE bye\r\n{tag} OK done\r\n"),
                "APPEND" => {
                    let mut bodies = Vec::new();
                    let mut part = rest.to_string();
                    // Each part ends with {n+}: read n bytes, then the rest of the
                    // line is empty (end of command) or the next message's part.
                    while let Some(open) = part.rfind('{') {
                        let n: usize = part[open + 1..part.len() - 2].parse().unwrap();
                        assert!(part.ends_with("+}"), "LITERAL+ literal: {part}");
                        let mut body = vec![0u8; n];
                        r.read_exact(&mut body).await.unwrap();
                        bodies.push(body);
                        let mut more = String::new();
                        r.read_line(&mut more).await.unwrap();
                        part = more.trim_end().to_string();
                    }
                    let refused = bodies.iter().any(|b| b.windows(6).any(|w| w == b"REFUSE"));
                    let count = bodies.len();
                    rec.lock().unwrap().push(bodies);
                    if refused {
                        format!("{tag} NO [LIMIT] one message is refused\r\n")
                    } else {
                        let first = next_uid;
                        next_uid += count as u32;
                        format!("{tag} OK [APPENDUID 7 {first}:{}] done\r\n", next_uid - 1)
                    }
                }
                _ => format!("{tag} BAD unknown\r\n"),
            };
            w.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    (port, received)
}

async fn append_three(
    caps: &'static str,
    bodies: [&'static [u8]; 3],
) -> (Vec<godwit_imap::conn::AppendOutcome>, Vec<Vec<Vec<u8>>>) {
    let (port, received) = minimal_server(caps).await;
    let server = Server::from_url(&format!("imap://127.0.0.1:{port}")).unwrap();
    let mut conn = Conn::open(&server, &login_of(USER)).await.unwrap();
    let items: Vec<AppendItem<'_>> = bodies
        .iter()
        .map(|b| AppendItem {
            flags: vec!["\\Seen".into()],
            internal_date: Some("01-Jan-2020 00:00:00 +0000".into()),
            body: b,
        })
        .collect();
    let out = conn.append_batch("INBOX", &items).await.unwrap();
    conn.logout().await;
    let got = received.lock().unwrap().clone();
    (out, got)
}

/// Three small messages for the minimal server's APPENDs.
const THREE: [&[u8]; 3] = [
    b"Subject: a\r\n\r\none\r\n",
    b"Subject: b\r\n\r\ntwo\r\n",
    b"Subject: c\r\n\r\nthree\r\n",
];

#[tokio::test]
async fn without_multiappend_each_message_is_its_own_append() {
    let bodies = THREE;
    let (out, got) = append_three("IMAP4rev1 LITERAL+ UIDPLUS", bodies).await;
    assert_eq!(
        out,
        vec![Ok(Some((7, 1))), Ok(Some((7, 2))), Ok(Some((7, 3)))]
    );
    let per_command: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(per_command, vec![1, 1, 1]);
    assert_eq!(got.concat(), bodies.map(<[u8]>::to_vec).to_vec());
}

#[tokio::test]
async fn with_multiappend_the_batch_is_one_command() {
    let bodies = THREE;
    let (out, got) = append_three("IMAP4rev1 LITERAL+ UIDPLUS MULTIAPPEND", bodies).await;
    assert_eq!(
        out,
        vec![Ok(Some((7, 1))), Ok(Some((7, 2))), Ok(Some((7, 3)))]
    );
    assert_eq!(got, vec![bodies.map(<[u8]>::to_vec).to_vec()]);
}

#[tokio::test]
async fn a_refused_multiappend_is_retried_one_by_one() {
    let bodies: [&[u8]; 3] = [
        b"Subject: a\r\n\r\none\r\n",
        b"Subject: b\r\n\r\nREFUSE\r\n",
        b"Subject: c\r\n\r\nthree\r\n",
    ];
    let (out, got) = append_three("IMAP4rev1 LITERAL+ UIDPLUS MULTIAPPEND", bodies).await;
    assert_eq!(out[0], Ok(Some((7, 1))));
    assert!(
        out[1].as_ref().is_err_and(|t| t.contains("refused")),
        "{out:?}"
    );
    assert_eq!(out[2], Ok(Some((7, 2))));
    let per_command: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(per_command, vec![3, 1, 1, 1], "the batch, then each alone");
}
