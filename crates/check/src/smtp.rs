//! The SMTP probe: banner, EHLO, STARTTLS and the certificate, and optionally
//! recipient acceptance (`--rcpt`) or a labelled test message (`--send`), as
//! swaks does in the seed's Task 15.

use crate::cert::{CertObservation, Trust};
use crate::finding::{Contract, Finding, Severity};
use anyhow::Context;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct SmtpCheck {
    /// `HOST[:PORT]`, port 25 by default.
    pub target: String,
    /// The name the certificate must carry; the host part of `target` by default.
    pub tls_name: Option<String>,
    /// Our EHLO name.
    pub ehlo: String,
    /// Extra trusted roots (PEM), for private CAs.
    pub ca_files: Vec<PathBuf>,
    /// Check that this recipient is accepted (MAIL, RCPT, RSET; nothing is sent).
    pub rcpt: Option<String>,
    /// Envelope sender for `--rcpt` and `--send`.
    pub mail_from: String,
    /// Send a labelled test message to `rcpt`.
    pub send: bool,
    pub timeout: Duration,
    pub contract: Contract,
}

impl SmtpCheck {
    pub fn new(target: &str) -> Self {
        SmtpCheck {
            target: target.to_string(),
            tls_name: None,
            ehlo: "godwit-check.invalid".into(),
            ca_files: Vec::new(),
            rcpt: None,
            mail_from: String::new(),
            send: false,
            timeout: Duration::from_secs(30),
            contract: Contract::InboundDelivery,
        }
    }
}

/// Splits `host[:port]`, `[v6]:port` or a bare IPv6 address.
pub fn split_target(target: &str) -> (String, u16) {
    if let Some(rest) = target.strip_prefix('[') {
        if let Some((host, port)) = rest.split_once("]:") {
            return (host.to_string(), port.parse().unwrap_or(25));
        }
        return (rest.trim_end_matches(']').to_string(), 25);
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host.to_string(), port.parse().unwrap_or(25)),
        _ => (target.to_string(), 25),
    }
}

/// One SMTP reply (RFC 5321 4.2): the code and the text of every line.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join(" / ")
    }
    fn ok(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Session {
    io: BufReader<Box<dyn Io>>,
    timeout: Duration,
    /// The dialogue, as swaks prints it, for the findings.
    transcript: Vec<String>,
}

impl Session {
    async fn reply(&mut self) -> anyhow::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(self.timeout, self.io.read_line(&mut line))
                .await
                .context("timed out waiting for the server's reply")??;
            if n == 0 {
                anyhow::bail!("the server closed the connection");
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            self.transcript.push(format!("<= {line}"));
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("not an SMTP reply: {line:?}"))?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if last {
                return Ok(Reply { code, lines });
            }
        }
    }

    async fn command(&mut self, cmd: &str) -> anyhow::Result<Reply> {
        self.transcript.push(format!("=> {cmd}"));
        self.io
            .get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await?;
        self.io.get_mut().flush().await?;
        self.reply().await
    }
}

/// Records the chain the server sends and accepts it, so the handshake
/// completes and the certificate can be judged with explanations instead of
/// a bare handshake error. Handshake signatures are still verified.
#[derive(Debug)]
struct RecordingVerifier {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap() = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The system's roots plus the `--ca` files.
pub fn root_store(ca_files: &[PathBuf]) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for file in ca_files {
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(file)
            .with_context(|| format!("--ca {}: cannot read", file.display()))?
        {
            let cert =
                cert.with_context(|| format!("--ca {}: not PEM certificates", file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("--ca {}: unusable CA certificate", file.display()))?;
            n += 1;
        }
        anyhow::ensure!(n > 0, "--ca {}: no certificate in the file", file.display());
    }
    Ok(roots)
}

/// webpki's verdict on the issuer path alone: the name is one the certificate
/// carries and the time is inside its validity, because the analyzer judges
/// name and dates itself and webpki reports only its first error.
fn trust_verdict(chain: &[CertificateDer<'static>], roots: RootCertStore) -> Trust {
    let Some(leaf) = chain.first() else {
        return Trust::Untrusted("no certificate".into());
    };
    let Ok(f) = crate::cert::facts(leaf) else {
        return Trust::Untrusted("unreadable certificate".into());
    };
    let name = f
        .dns_names
        .iter()
        .find(|n| !n.starts_with('*'))
        .cloned()
        .or_else(|| f.dns_names.first().map(|n| n.replacen('*', "x", 1)))
        .or_else(|| f.ip_addrs.first().map(|i| i.to_string()));
    let Some(name) = name.and_then(|n| ServerName::try_from(n).ok()) else {
        return Trust::Untrusted("the certificate names no host".into());
    };
    let mid = f.not_before + (f.not_after - f.not_before) / 2;
    let now = UnixTime::since_unix_epoch(Duration::from_secs(mid.max(0) as u64));
    let verifier =
        match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build() {
            Ok(v) => v,
            Err(e) => return Trust::Untrusted(format!("no trusted roots: {e}")),
        };
    match verifier.verify_server_cert(leaf, &chain[1..], &name, &[], now) {
        Ok(_) => Trust::Trusted,
        Err(rustls::Error::InvalidCertificate(e)) => Trust::Untrusted(format!("{e:?}")),
        Err(e) => Trust::Untrusted(e.to_string()),
    }
}

/// The queue ID in a 250 reply to DATA: "Ok: queued as 12345ABCDE" (Postfix,
/// Exim's "OK id=..." too). Servers that name none get the whole reply quoted.
pub fn queue_id(reply: &str) -> Option<String> {
    let lower = reply.to_ascii_lowercase();
    let start = lower
        .find("queued as ")
        .map(|i| i + 10)
        .or_else(|| lower.find(" id=").map(|i| i + 4))?;
    reply[start..]
        .split_whitespace()
        .next()
        .map(|s| s.trim_matches(['<', '>', '.', ',']).to_string())
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Runs the probe; connection problems become findings, not errors. Errors are
/// for bad arguments (an unreadable --ca file).
pub async fn check(opts: &SmtpCheck) -> anyhow::Result<Vec<Finding>> {
    let roots = root_store(&opts.ca_files)?;
    let (host, port) = split_target(&opts.target);
    let subject = format!("{host}:{port}");
    let c = opts.contract;
    let mut out = Vec::new();
    let tcp =
        match tokio::time::timeout(opts.timeout, TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                out.push(Finding::new(
                    c,
                    "smtp.connect",
                    subject,
                    Severity::Block,
                    format!("Cannot connect: {e}."),
                    "Check the host name, the port and any firewall between here and the server.",
                ));
                return Ok(out);
            }
            Err(_) => {
                out.push(Finding::new(
                    c,
                    "smtp.connect",
                    subject,
                    Severity::Block,
                    format!("No TCP connection within {}s.", opts.timeout.as_secs()),
                    "Check routing and firewalls (outbound port 25 is often blocked).",
                ));
                return Ok(out);
            }
        };
    let mut s = Session {
        io: BufReader::new(Box::new(tcp)),
        timeout: opts.timeout,
        transcript: Vec::new(),
    };
    if let Err(e) = dialogue(opts, &host, &subject, roots, &mut s, &mut out).await {
        out.push(Finding::new(
            c,
            "smtp.session",
            subject.clone(),
            Severity::Block,
            format!(
                "The SMTP session failed: {e:#}.\n{}",
                s.transcript.join("\n")
            ),
            "Read the transcript above; fix the server before the cutover.",
        ));
    }
    Ok(out)
}

async fn dialogue(
    opts: &SmtpCheck,
    host: &str,
    subject: &str,
    roots: RootCertStore,
    s: &mut Session,
    out: &mut Vec<Finding>,
) -> anyhow::Result<()> {
    let c = opts.contract;
    let banner = s.reply().await.context("reading the banner")?;
    if banner.code != 220 {
        out.push(Finding::new(
            c,
            "smtp.banner",
            subject,
            Severity::Block,
            format!(
                "The server refuses sessions: {} {}.",
                banner.code,
                banner.text()
            ),
            "Find out why the server turns clients away (overload, blocklist, maintenance).",
        ));
        return Ok(());
    }
    out.push(Finding::new(
        c,
        "smtp.banner",
        subject,
        Severity::Ok,
        format!("220 {}", banner.text()),
        "",
    ));
    let ehlo = s.command(&format!("EHLO {}", opts.ehlo)).await?;
    if ehlo.code != 250 {
        out.push(Finding::new(
            c,
            "smtp.ehlo",
            subject,
            Severity::Block,
            format!("EHLO refused: {} {}.", ehlo.code, ehlo.text()),
            "An MX must speak ESMTP (RFC 5321 4.1.1.1).",
        ));
        return Ok(());
    }
    let caps: Vec<String> = ehlo
        .lines
        .iter()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    out.push(Finding::new(
        c,
        "smtp.ehlo",
        subject,
        Severity::Ok,
        format!(
            "EHLO capabilities: {}.",
            if caps.is_empty() {
                "none".to_string()
            } else {
                caps.join(", ")
            }
        ),
        "",
    ));
    let starttls = caps.iter().any(|c| c.eq_ignore_ascii_case("STARTTLS"));
    if starttls {
        let reply = s.command("STARTTLS").await?;
        if reply.code != 220 {
            out.push(Finding::new(
                c,
                "smtp.starttls",
                subject,
                Severity::Block,
                format!(
                    "STARTTLS is advertised but refused: {} {}.",
                    reply.code,
                    reply.text()
                ),
                "Fix the server's TLS configuration (certificate and key files).",
            ));
            return Ok(());
        }
        // RFC 3207 4.2 / CVE-2011-0411: anything buffered after the 220 was
        // sent in clear text and would be read as if it came over TLS.
        if !s.io.buffer().is_empty() {
            out.push(Finding::new(
                c,
                "smtp.starttls",
                subject,
                Severity::Block,
                "The server sent data after its STARTTLS reply, before the handshake: plain-text \
                 injection into the TLS session is possible."
                    .to_string(),
                "Put the host behind a server that discards pipelined data at STARTTLS.",
            ));
            return Ok(());
        }
        let verifier = Arc::new(RecordingVerifier {
            chain: Mutex::new(Vec::new()),
            provider: provider(),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let expected = opts.tls_name.clone().unwrap_or_else(|| host.to_string());
        let sni = ServerName::try_from(expected.clone())
            .with_context(|| format!("{expected} is not a valid TLS server name"))?;
        let plain = std::mem::replace(
            &mut s.io,
            BufReader::new(Box::new(tokio::io::join(
                tokio::io::empty(),
                tokio::io::sink(),
            ))),
        );
        let tcp = plain.into_inner();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = match tokio::time::timeout(s.timeout, connector.connect(sni, tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                out.push(Finding::new(
                    c,
                    "smtp.starttls",
                    subject,
                    Severity::Block,
                    format!("The TLS handshake failed: {e}."),
                    "Fix the server's TLS configuration; senders fall back to clear text or defer.",
                ));
                return Ok(());
            }
            Err(_) => anyhow::bail!("the TLS handshake timed out"),
        };
        let (version, suite) = {
            let (_, conn) = tls.get_ref();
            (
                conn.protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default(),
                conn.negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_default(),
            )
        };
        out.push(Finding::new(
            c,
            "smtp.starttls",
            subject,
            Severity::Ok,
            format!("STARTTLS works: {version}, {suite}."),
            "",
        ));
        let chain = verifier.chain.lock().unwrap().clone();
        let trust = trust_verdict(&chain, roots);
        out.extend(crate::cert::analyze(
            subject,
            &CertObservation {
                expected_name: expected,
                chain: chain.iter().map(|c| c.to_vec()).collect(),
                trust,
                extra_roots: !opts.ca_files.is_empty(),
                now: now_unix(),
            },
        ));
        s.io = BufReader::new(Box::new(tls));
        // RFC 3207 4.2: forget everything learned before TLS and ask again.
        let again = s.command(&format!("EHLO {}", opts.ehlo)).await?;
        anyhow::ensure!(
            again.code == 250,
            "EHLO after STARTTLS refused: {} {}",
            again.code,
            again.text()
        );
    } else {
        out.push(Finding::new(
            c,
            "smtp.starttls",
            subject,
            Severity::Warn,
            "No STARTTLS: mail to this host travels in clear text, and senders that require TLS \
             (MTA-STS enforce, DANE, many gateways) will not deliver to it."
                .to_string(),
            "Enable STARTTLS with a valid certificate before this host takes traffic.",
        ));
    }

    if let Some(rcpt) = &opts.rcpt {
        let mail = s
            .command(&format!("MAIL FROM:<{}>", opts.mail_from))
            .await?;
        if !mail.ok() {
            out.push(Finding::new(
                c,
                "smtp.rcpt",
                format!("{subject} / {rcpt}"),
                Severity::Block,
                format!(
                    "MAIL FROM:<{}> refused: {} {}.",
                    opts.mail_from,
                    mail.code,
                    mail.text()
                ),
                "Try another envelope sender with --mail-from.",
            ));
        } else {
            let reply = s.command(&format!("RCPT TO:<{rcpt}>")).await?;
            let (sev, meaning, action) = match reply.code {
                250 | 251 => (
                    Severity::Ok,
                    format!("The server accepts mail for {rcpt}: {} {}.", reply.code, reply.text()),
                    String::new(),
                ),
                400..=499 => (
                    Severity::Warn,
                    format!(
                        "The server defers mail for {rcpt}: {} {}. Senders retry, so mail is late, \
                         not lost (greylisting or a temporary lookup failure).",
                        reply.code,
                        reply.text()
                    ),
                    "Run the check again in a few minutes; if it persists, read the server's log.".into(),
                ),
                _ => (
                    Severity::Block,
                    format!("The server rejects mail for {rcpt}: {} {}. Senders bounce it.", reply.code, reply.text()),
                    "Make the server accept this recipient (relay domains, recipient maps) before it \
                     receives traffic."
                        .into(),
                ),
            };
            let accepted = sev == Severity::Ok;
            out.push(Finding::new(
                c,
                "smtp.rcpt",
                format!("{subject} / {rcpt}"),
                sev,
                meaning,
                action,
            ));
            if opts.send && accepted {
                send_test_message(opts, rcpt, subject, s, out).await?;
            }
        }
        if !opts.send {
            let _ = s.command("RSET").await;
        }
    }
    let _ = s.command("QUIT").await;
    Ok(())
}

async fn send_test_message(
    opts: &SmtpCheck,
    rcpt: &str,
    subject: &str,
    s: &mut Session,
    out: &mut Vec<Finding>,
) -> anyhow::Result<()> {
    let c = opts.contract;
    let data = s.command("DATA").await?;
    anyhow::ensure!(
        data.code == 354,
        "DATA refused: {} {}",
        data.code,
        data.text()
    );
    let now = time::OffsetDateTime::now_utc();
    let date = now
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let message_id = format!(
        "<godwit-check.{}.{}@{}>",
        now.unix_timestamp(),
        std::process::id(),
        opts.ehlo
    );
    let from = if opts.mail_from.is_empty() {
        format!("postmaster@{}", opts.ehlo)
    } else {
        opts.mail_from.clone()
    };
    // Lines never start with '.', so no dot-stuffing is needed (RFC 5321 4.5.2).
    let message = format!(
        "From: <{from}>\r\nTo: <{rcpt}>\r\nSubject: godwit preflight test message\r\nDate: {date}\r\n\
         Message-ID: {message_id}\r\nX-Godwit-Check: test message, safe to delete\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
         This message was sent by `godwit check smtp --send` to prove that\r\n\
         {subject} accepts mail for {rcpt}. It can be deleted.\r\n.\r\n"
    );
    s.transcript.push(format!("=> [message {message_id}]"));
    s.io.get_mut().write_all(message.as_bytes()).await?;
    s.io.get_mut().flush().await?;
    let reply = s.reply().await?;
    if reply.code == 250 {
        let id = queue_id(&reply.text()).unwrap_or_else(|| "(none named)".into());
        out.push(Finding::new(
            c,
            "smtp.send",
            format!("{subject} / {rcpt}"),
            Severity::Ok,
            format!(
                "The server accepted the test message: queue ID {id} ({}), Message-ID {message_id}. \
                 This host still accepts and queues mail.",
                reply.text()
            ),
            "Keep this capability until you're confident all senders have moved; trace the \
             queue ID in the server's log to see where it went.",
        ));
    } else {
        out.push(Finding::new(
            c,
            "smtp.send",
            format!("{subject} / {rcpt}"),
            if reply.code >= 500 {
                Severity::Block
            } else {
                Severity::Warn
            },
            format!(
                "The server did not accept the test message: {} {}.",
                reply.code,
                reply.text()
            ),
            "Read the server's log for the reason.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_queue_ids() {
        assert_eq!(
            split_target("mx.example.com"),
            ("mx.example.com".into(), 25)
        );
        assert_eq!(split_target("127.0.0.1:2525"), ("127.0.0.1".into(), 2525));
        assert_eq!(split_target("[::1]:2525"), ("::1".into(), 2525));
        assert_eq!(split_target("2001:db8::1"), ("2001:db8::1".into(), 25));
        assert_eq!(
            queue_id("2.0.0 Ok: queued as 12345ABCDE").as_deref(),
            Some("12345ABCDE")
        );
        assert_eq!(
            queue_id("OK id=1tXyZa-000123-AB").as_deref(),
            Some("1tXyZa-000123-AB")
        );
        assert_eq!(queue_id("2.6.0 Queued mail for delivery"), None);
    }
}
