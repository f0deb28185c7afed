//! OAuth 2.0 access tokens for IMAP logins (SASL XOAUTH2, and OAUTHBEARER per
//! RFC 7628), which is all Microsoft 365 and Google Workspace accept for IMAP.
//!
//! A token comes from a client-credentials grant (RFC 6749 4.4, client
//! authentication per 2.3.1), cached until shortly before `expires_in`, or
//! from a command that prints one for the address it is given. Tokens are
//! never logged, printed in Debug, or written to the store.

use crate::ImapError;
use base64::Engine;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub enum TokenSource {
    ClientCredentials {
        url: String,
        client_id: String,
        client_secret: String,
        scope: Option<String>,
        tls_insecure: bool,
        cache: Mutex<Option<Cached>>,
    },
    /// argv; `{address}` in an argument is replaced by the address.
    Command { argv: Vec<String> },
}

pub struct Cached {
    token: String,
    /// Refresh from this instant on.
    until: Instant,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::ClientCredentials { url, client_id, .. } => {
                write!(f, "client credentials at {url} as {client_id}")
            }
            TokenSource::Command { argv } => write!(f, "token command {argv:?}"),
        }
    }
}

/// How long before `expires_in` a cached token is replaced: a tenth of its
/// life, at most a minute, so a connection never starts with a token about to
/// lapse.
pub fn refresh_at(expires_in: Duration) -> Duration {
    expires_in.saturating_sub((expires_in / 10).min(Duration::from_secs(60)))
}

impl TokenSource {
    /// A token for `address`: the cached one while it is fresh.
    pub async fn token(&self, address: &str) -> Result<String, ImapError> {
        match self {
            TokenSource::ClientCredentials {
                url,
                client_id,
                client_secret,
                scope,
                tls_insecure,
                cache,
            } => {
                if let Some(c) = cache.lock().unwrap().as_ref()
                    && Instant::now() < c.until
                {
                    return Ok(c.token.clone());
                }
                // expires_in counts from when the server issued the token,
                // which is after this instant: the life is measured from here
                // so the refresh is never late by the request's round trip.
                let asked = Instant::now();
                let (token, expires_in) = client_credentials(
                    url,
                    client_id,
                    client_secret,
                    scope.as_deref(),
                    *tls_insecure,
                )
                .await?;
                let life = expires_in.unwrap_or(Duration::from_secs(3600));
                *cache.lock().unwrap() = Some(Cached {
                    token: token.clone(),
                    until: asked + refresh_at(life),
                });
                Ok(token)
            }
            TokenSource::Command { argv } => token_command(argv, address).await,
        }
    }
}

async fn token_command(argv: &[String], address: &str) -> Result<String, ImapError> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.replace("{address}", address))
        .collect();
    let err = |m: String| ImapError::Token(format!("token_command {}: {m}", args[0]));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| err("no answer in 60s".into()))?
    .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} for {address}: {}",
            out.status,
            crate::conn::excerpt(String::from_utf8_lossy(&out.stderr).trim(), 200)
        )));
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(err(format!("printed no token for {address}")));
    }
    Ok(token)
}

/// RFC 6749 2.3.1: the client ID and secret, each form-urlencoded (Appendix
/// B), as the user and password of HTTP Basic authentication.
pub fn basic_credentials(client_id: &str, client_secret: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        form_encode(client_id),
        form_encode(client_secret)
    ));
    format!("Basic {b}")
}

/// application/x-www-form-urlencoded (RFC 6749 Appendix B).
pub fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `scheme://host[:port]/path` of a token URL.
fn split_url(url: &str) -> Option<(bool, String, u16, String)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        (false, url.strip_prefix("http://")?)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (h.to_string(), p.parse().ok()?),
        _ => (authority.to_string(), if tls { 443 } else { 80 }),
    };
    Some((tls, host.trim_matches(['[', ']']).to_string(), port, path))
}

/// The client-credentials grant (RFC 6749 4.4.2): the access token and its
/// `expires_in`.
async fn client_credentials(
    url: &str,
    client_id: &str,
    client_secret: &str,
    scope: Option<&str>,
    tls_insecure: bool,
) -> Result<(String, Option<Duration>), ImapError> {
    use http_body_util::BodyExt;
    let err = |m: String| ImapError::Token(format!("token_url {url}: {m}"));
    let (tls, host, port, path) = split_url(url).ok_or_else(|| err("not an http(s) URL".into()))?;
    let mut body = "grant_type=client_credentials".to_string();
    if let Some(s) = scope {
        body.push_str(&format!("&scope={}", form_encode(s)));
    }
    let req = hyper::Request::post(&path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(hyper::header::ACCEPT, "application/json")
        .header(
            hyper::header::AUTHORIZATION,
            basic_credentials(client_id, client_secret),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| err(e.to_string()))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| err(e.to_string()))?;
        let resp = if tls {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| err(format!("`{host}` is not a TLS server name")))?;
            let stream = tokio_rustls::TlsConnector::from(godwit_tls::client_config(tls_insecure))
                .connect(name, tcp)
                .await
                .map_err(|e| err(format!("TLS: {e}")))?;
            send(hyper_util::rt::TokioIo::new(stream), req).await
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), req).await
        }
        .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        Ok::<_, ImapError>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .map_err(|_| err("no answer in 60s".into()))??;
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        // RFC 6749 5.2: error and error_description say what is wrong
        // (consent, scope, secret): show them.
        let e = json["error"].as_str().unwrap_or("");
        let d = json["error_description"].as_str().unwrap_or("");
        return Err(err(format!(
            "{status}: {}",
            crate::conn::excerpt(&format!("{e} {d}"), 300).trim()
        )));
    }
    let token = json["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| err("the answer has no access_token".into()))?
        .to_string();
    let expires_in = json["expires_in"]
        .as_u64()
        .or_else(|| json["expires_in"].as_str().and_then(|s| s.parse().ok()))
        .map(Duration::from_secs);
    Ok((token, expires_in))
}

async fn send<S>(
    io: S,
    req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}

/// The SASL exchange for XOAUTH2 (Google's and Microsoft's format) or
/// OAUTHBEARER (RFC 7628 3.1). After a refusal the server sends a JSON
/// challenge (RFC 7628 3.2.2); the client answers it with the dummy `\x01`
/// and keeps the JSON for the error it reports.
pub struct Bearer {
    pub initial: Vec<u8>,
    pub sent: bool,
    pub challenge: std::sync::Arc<Mutex<Option<String>>>,
}

impl Bearer {
    pub fn xoauth2(user: &str, token: &str) -> Bearer {
        Bearer::new(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
    }

    pub fn oauthbearer(user: &str, token: &str, host: &str, port: u16) -> Bearer {
        // RFC 7628 3.1: gs2 header with the authzid, then key=value pairs.
        let user = user.replace('=', "=3D").replace(',', "=2C");
        Bearer::new(format!(
            "n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
        ))
    }

    fn new(initial: String) -> Bearer {
        Bearer {
            initial: initial.into_bytes(),
            sent: false,
            challenge: Default::default(),
        }
    }
}

impl async_imap::Authenticator for Bearer {
    type Response = Vec<u8>;
    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        if !self.sent {
            self.sent = true;
            return std::mem::take(&mut self.initial);
        }
        *self.challenge.lock().unwrap() = Some(crate::conn::excerpt(
            &String::from_utf8_lossy(challenge),
            300,
        ));
        b"\x01".to_vec()
    }
}

/// SASL PLAIN (RFC 4616): authzid NUL authcid NUL password.
pub struct Plain(pub Option<Vec<u8>>);

impl async_imap::Authenticator for Plain {
    type Response = Vec<u8>;
    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        self.0.take().unwrap_or_default()
    }
}

/// One token source per server configuration, shared by all its accounts.
pub type Sources = HashMap<String, std::sync::Arc<TokenSource>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_authentication_follows_rfc_6749_2_3_1() {
        // Appendix B encoding before Basic: a ':' in the ID must not split it.
        assert_eq!(form_encode("a b:c/d"), "a+b%3Ac%2Fd");
        let h = basic_credentials("id:1", "s ecret");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(h.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(raw, b"id%3A1:s+ecret");
    }

    #[test]
    fn tokens_are_refreshed_shortly_before_they_expire() {
        for (life, at) in [(3600, 3540), (300, 270), (10, 9), (0, 0)] {
            assert_eq!(
                refresh_at(Duration::from_secs(life)),
                Duration::from_secs(at),
                "{life}"
            );
        }
    }

    #[test]
    fn sasl_initial_responses() {
        let b = Bearer::xoauth2("u@x", "tok");
        assert_eq!(b.initial, b"user=u@x\x01auth=Bearer tok\x01\x01");
        let b = Bearer::oauthbearer("u,=x", "tok", "h", 993);
        assert_eq!(
            b.initial,
            b"n,a=u=2C=3Dx,\x01host=h\x01port=993\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(
            split_url("https://login.example/t/oauth2/v2.0/token"),
            Some((
                true,
                "login.example".into(),
                443,
                "/t/oauth2/v2.0/token".into()
            ))
        );
        assert_eq!(
            split_url("http://127.0.0.1:8080"),
            Some((false, "127.0.0.1".into(), 8080, "/".into()))
        );
    }
}
