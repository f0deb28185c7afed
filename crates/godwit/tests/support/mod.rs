//! Test harness: real peers (Postfix's smtp-sink as the platforms) and the
//! real godwit binary, driven over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use godwit_testkit::free_port;

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn smtp_sink_bin() -> String {
    for p in ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("smtp-sink not found: run scripts/install-peers (installs Postfix)");
}

/// Postfix's smtp-sink standing in for a mail platform. Every transaction it
/// accepts is dumped to a file in `dir` (envelope as X-*-Args headers).
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl Sink {
    pub fn start(port: u16, extra: &[&str]) -> Sink {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dump");
        std::fs::create_dir_all(&dir).unwrap();
        // smtp-sink drops privileges to `nobody`, who must write the dumps.
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
        args.push(format!("127.0.0.1:{port}"));
        args.push("256".into());
        let child = Command::new(smtp_sink_bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("smtp-sink to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Sink {
            port,
            dir,
            child,
            _tmp: tmp,
        }
    }

    /// Each dumped transaction's full text.
    pub fn messages(&self) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v.iter()
            .filter_map(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    pub fn count_containing(&self, needle: &str) -> usize {
        self.messages()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The godwit binary under test, with its own data directory.
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    pub data: PathBuf,
    /// Extra environment for the serving process.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

pub fn godwit_bin() -> &'static str {
    env!("CARGO_BIN_EXE_godwit")
}

impl Gateway {
    /// `extra` is appended to a base config naming platforms old and new on
    /// the given ports; sections it repeats replace nothing, so pass only keys
    /// under sections the base does not define, or use `smtp_extra`.
    pub fn start(old_port: u16, new_port: u16, smtp_extra: &str, extra: &str) -> Gateway {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let port = free_port();
        let admin_port = free_port();
        let config = format!(
            r#"hostname = "gw.test"
data_dir = "{}"
[smtp]
listen = ["127.0.0.1:{port}"]
{smtp_extra}
[domains]
accepted = ["example.com", "example.org"]
[platforms.old]
relay = ["127.0.0.1:{old_port}"]
[platforms.new]
relay = ["127.0.0.1:{new_port}"]
[admin]
listen = "127.0.0.1:{admin_port}"
[queue]
min_backoff = "1s"
max_backoff = "2s"
{extra}
"#,
            data.display()
        );
        let config_path = tmp.path().join("godwit.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut g = Gateway {
            port,
            admin_port,
            config_path,
            data,
            env: Vec::new(),
            child: None,
            _tmp: tmp,
        };
        g.restart();
        g
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(godwit_bin());
        cmd.args(["serve", "--config", self.config_path.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        // An empty value unsets the variable (RUST_LOG: the file's log.level
        // decides then).
        for (k, _) in self.env.iter().filter(|(_, v)| v.is_empty()) {
            cmd.env_remove(k);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let port = self.port;
        let probe = wait_for("godwit to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        // End the probe's session before going on: until the gateway has seen
        // it close, it counts against max_connections.
        let _ = probe.set_read_timeout(Some(Duration::from_secs(10)));
        let mut probe = std::io::BufReader::new(probe);
        let mut greeting = String::new();
        let _ = probe.read_line(&mut greeting);
        let _ = probe.get_mut().write_all(b"QUIT\r\n");
        let _ = probe.read_to_string(&mut greeting);
    }

    /// Rewrites the configuration file with `f` and restarts the gateway.
    pub fn reconfigure(&mut self, f: impl FnOnce(String) -> String) {
        let cfg = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(&self.config_path, f(cfg)).unwrap();
        self.kill9();
        self.restart();
    }

    /// Queue IDs in the spool, with whether any recipient is held (read-only
    /// `queue list --json`).
    pub fn queued(&self) -> Vec<(String, bool)> {
        let (_, out) = self.cli(&["queue", "list", "--json"]);
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                let id = v["queue_id"].as_str()?.to_string();
                let held = v["recipients"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["state"] == "held"));
                Some((id, held))
            })
            .collect()
    }

    /// Waits until the queue is empty: every recipient final, so no further
    /// attempt (and no duplicate) can happen.
    pub fn wait_queue_empty(&self, timeout: Duration) {
        wait_for("the queue to empty", timeout, || {
            self.queued().is_empty().then_some(())
        });
    }

    /// Waits until message `id` is queued with a held recipient.
    pub fn wait_held(&self, id: &str, timeout: Duration) {
        wait_for(&format!("{id} held in the queue"), timeout, || {
            self.queued()
                .iter()
                .any(|(q, h)| q == id && *h)
                .then_some(())
        });
    }

    /// The serving process's pid (for /proc measurements and signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway running").id()
    }

    /// Sends a signal by name ("HUP", "TERM") to the running gateway.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("gateway running").id();
        let ok = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    /// The exit status, once the gateway has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().unwrap()
    }

    /// Waits for the first event named `name` that `f` accepts.
    pub fn wait_event(
        &self,
        name: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(&format!("event {name}"), timeout, || {
            self.events_named(name).into_iter().find(|e| f(e))
        })
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Runs a godwit CLI command against this gateway's configuration.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let (code, text) = self.cli_code(args);
        (code == 0, text)
    }

    /// As `cli`, with the exit code (`godwit doctor` answers with it; -1
    /// for a signal).
    pub fn cli_code(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(godwit_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// `route set` through the CLI, then waits until the running gateway has
    /// applied that version (its `route.changed` event), which the contract
    /// bounds at one second.
    pub fn route(&self, address: &str, route: &str) {
        let (ok, out) = self.cli(&["route", "set", address, route]);
        assert!(ok, "{out}");
        let version: i64 = out
            .rsplit("version ")
            .next()
            .unwrap()
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap();
        let start = std::time::Instant::now();
        wait_for(
            "the gateway to apply the route change",
            Duration::from_secs(1),
            || {
                self.events_named("route.changed")
                    .iter()
                    .any(|e| e["version"].as_i64() >= Some(version))
                    .then_some(())
            },
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// GET on the admin listener; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http(
            self.admin_port,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        let dir = self.data.join("events");
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let mut files: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            files.sort();
            for f in files {
                for line in std::fs::read_to_string(f).unwrap_or_default().lines() {
                    if let Ok(v) = serde_json::from_str(line) {
                        out.push(v);
                    }
                }
            }
        }
        out
    }

    pub fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A raw SMTP client that can send any bytes and read whole replies.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { reader, stream }
    }

    /// Reads one (possibly multi-line) reply; returns its last line.
    pub fn reply(&mut self) -> String {
        let mut last = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return if last.is_empty() { "EOF".into() } else { last };
            }
            let done = line.len() < 4 || line.as_bytes()[3] == b' ';
            last = line.trim_end().to_string();
            if done {
                return last;
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    pub fn greet(&mut self) -> String {
        let g = self.reply();
        assert!(g.starts_with("220"), "greeting: {g}");
        self.cmd("EHLO client.test")
    }

    /// A whole transaction; returns the reply to the end of DATA.
    pub fn mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "RCPT {t}: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(body.as_bytes());
        self.send(b"\r\n.\r\n");
        self.reply()
    }

    pub fn read_to_end(&mut self) -> String {
        let mut s = String::new();
        let _ = self.reader.read_to_string(&mut s);
        s
    }
}

pub fn message(id: &str, body: &str) -> String {
    format!("Message-ID: <{id}>\r\nSubject: {id}\r\nFrom: a@sender.test\r\n\r\n{body}")
}

/// Sends one raw HTTP request (with `Connection: close`) to a loopback port;
/// returns the status and the body.
pub fn http(port: u16, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Headless Chromium (an independent reader of the dashboard) on `url`
/// with the profile in `profile`; `extra` is e.g. `--dump-dom`.
pub fn chromium(profile: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=4000", "--window-size=1400,1200"])
        .args(extra)
        .env("TZ", "UTC")
        .arg(url)
        .output()
        .expect("chromium (scripts/install-peers installs it)")
}

/// The text of the element with `id` in a page Chromium dumped
/// (`--dump-dom`): what the reader sees there.
pub fn element_text(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    dom[start..]
        .split('>')
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string()
}

/// A CA named `ca_name` and a certificate it signed for 127.0.0.1 (a peer's
/// name as godwit dials it), written to `dir`: (certificate, key, CA).
pub fn ca_signed(dir: &Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (c, k, a) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&c, leaf.pem()).unwrap();
    std::fs::write(&k, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&a, ca.pem()).unwrap();
    (c, k, a)
}

/// A database of its own on the test PostgreSQL cluster, named after
/// `prefix` and this process (the tests of several crates share the
/// cluster). `None` only outside CI without the cluster's variables.
pub fn scratch_database(prefix: &str) -> Option<String> {
    let admin = godwit_store::test_postgres_url("GODWIT_TEST_POSTGRES")?;
    let base = godwit_store::test_postgres_url("GODWIT_TEST_POSTGRES_URL")?;
    let name = format!("{prefix}_{}_{}", std::process::id(), godwit_store::now_ms());
    psql(&admin, &format!("CREATE DATABASE {name}"));
    let at = base.rfind('/').unwrap();
    Some(format!("{}/{name}", &base[..at]))
}

/// A metric's value in Prometheus text: the line that starts with `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `psql URL -c SQL`, its output trimmed; a failure panics with psql's text.
pub fn psql(url: &str, sql: &str) -> String {
    try_psql(url, sql).unwrap_or_else(|e| panic!("psql {sql}: {e}"))
}

/// As `psql`, with psql's error text as `Err` (before a schema exists, say).
pub fn try_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([url, "-qAtX", "-c", sql])
        .output()
        .expect("psql runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `python3 -c SCRIPT ARGS` (an independent reader: imaplib, sqlite3,
/// email); its stdout. A failing script panics with its stderr.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The peak resident set size (VmHWM) of process `pid`, in KB.
#[allow(dead_code)]
pub fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
