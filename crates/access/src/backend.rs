//! Logging in to a platform's IMAP or POP3 server with the client's own
//! credentials. On success the connection is handed to the splice; on
//! failure the platform's reply is kept for the `access.login` event.

use crate::conn::Conn;
use crate::imap;
use godwit_config::{MailUrl, TlsPolicy};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub enum BackendError {
    /// The platform refused the credentials; its reply.
    Auth(String),
    /// Not reachable, not speaking the protocol, or TLS not possible.
    Unavailable(String),
}

pub struct Target<'a> {
    pub url: &'a MailUrl,
    pub tls: TlsPolicy,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub timeout: Duration,
}

fn unavailable(url: &MailUrl, what: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("{}:{}: {what}", url.host, url.port))
}

async fn connect(t: &Target<'_>) -> Result<Conn, BackendError> {
    let tcp = tokio::time::timeout(
        t.timeout,
        tokio::net::TcpStream::connect((t.url.host.as_str(), t.url.port)),
    )
    .await
    .map_err(|_| unavailable(t.url, "connect timed out"))?
    .map_err(|e| unavailable(t.url, e))?;
    let _ = tcp.set_nodelay(true);
    let conn = Conn::new(tcp, t.timeout);
    if t.url.scheme.implicit_tls() {
        conn.connect_tls(t.client_tls.clone(), &t.url.host)
            .await
            .map_err(|e| unavailable(t.url, format!("TLS: {e}")))
    } else {
        Ok(conn)
    }
}

async fn line(c: &mut Conn, url: &MailUrl) -> Result<String, BackendError> {
    match c.read_line(65536).await {
        Ok(Some(l)) => Ok(String::from_utf8_lossy(&l).into_owned()),
        Ok(None) => Err(unavailable(url, "closed the connection")),
        Err(e) => Err(unavailable(url, e)),
    }
}

async fn send(c: &mut Conn, url: &MailUrl, s: &str) -> Result<(), BackendError> {
    c.write(s.as_bytes()).await.map_err(|e| unavailable(url, e))
}

/// Reads to the tagged reply of `tag`; returns (untagged lines, tagged line).
async fn until_tagged(
    c: &mut Conn,
    url: &MailUrl,
    tag: &str,
) -> Result<(Vec<String>, String), BackendError> {
    let mut untagged = Vec::new();
    loop {
        let l = line(c, url).await?;
        if l.starts_with(tag) && l.as_bytes().get(tag.len()) == Some(&b' ') {
            return Ok((untagged, l));
        }
        untagged.push(l);
    }
}

/// IMAP: greeting, STARTTLS when offered (imap://), LOGIN. Returns the
/// connection and the bytes to send the client: the platform's untagged
/// lines and its tagged OK under the client's tag, which carries the
/// post-login CAPABILITY (RFC 3501 6.2.3, as Dovecot's proxy forwards it).
pub async fn imap_login(
    t: &Target<'_>,
    user: &str,
    password: &str,
    client_tag: &str,
) -> Result<(Conn, Vec<u8>), BackendError> {
    let (Some(qu), Some(qp)) = (imap::quote(user), imap::quote(password)) else {
        return Err(BackendError::Auth(
            "credentials with CR or LF cannot be sent".into(),
        ));
    };
    let mut c = connect(t).await?;
    let greeting = line(&mut c, t.url).await?;
    if !greeting.starts_with("* OK") {
        return Err(unavailable(t.url, format!("greeting `{greeting}`")));
    }
    if !c.tls && t.tls != TlsPolicy::None {
        let mut caps = greeting.clone();
        if !imap::has_capability(&greeting, "CAPABILITY") {
            send(&mut c, t.url, "G0 CAPABILITY\r\n").await?;
            let (untagged, _) = until_tagged(&mut c, t.url, "G0").await?;
            caps = untagged.join(" ");
        }
        if imap::has_capability(&caps, "STARTTLS") {
            send(&mut c, t.url, "G1 STARTTLS\r\n").await?;
            let (_, tagged) = until_tagged(&mut c, t.url, "G1").await?;
            if imap::status(&tagged).map(|s| s.1) != Some("OK") {
                return Err(unavailable(t.url, format!("STARTTLS refused: `{tagged}`")));
            }
            c = c
                .connect_tls(t.client_tls.clone(), &t.url.host)
                .await
                .map_err(|e| unavailable(t.url, format!("TLS: {e}")))?;
        } else if t.tls == TlsPolicy::Require {
            return Err(unavailable(
                t.url,
                "no STARTTLS and the platform's tls = \"require\"",
            ));
        }
    }
    send(&mut c, t.url, &format!("G2 LOGIN {qu} {qp}\r\n")).await?;
    let (untagged, tagged) = until_tagged(&mut c, t.url, "G2").await?;
    let (_, st, rest) = imap::status(&tagged).unwrap_or(("", "", ""));
    match st.to_ascii_uppercase().as_str() {
        "OK" => {
            let mut out = Vec::new();
            for u in untagged {
                out.extend_from_slice(u.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(format!("{client_tag} OK {rest}\r\n").as_bytes());
            Ok((c, out))
        }
        "NO" => Err(BackendError::Auth(tagged[3..].to_string())),
        _ => Err(unavailable(t.url, format!("LOGIN answered `{tagged}`"))),
    }
}

/// Checks a user's password with a LOGIN at the platform, then LOGOUT: the
/// check before a master-user session (Dovecot's `user*master` logs in
/// without the user's password, so the front must verify it first).
pub async fn imap_verify(t: &Target<'_>, user: &str, password: &str) -> Result<(), BackendError> {
    let (mut c, _) = imap_login(t, user, password, "V0").await?;
    // RFC 3501 6.1.3; the reply does not matter, the check is done.
    let _ = send(&mut c, t.url, "V1 LOGOUT\r\n").await;
    Ok(())
}

/// A session as `user{separator}{master}` with the master's password, once
/// [`imap_verify`] has passed. The platform refusing the master is our
/// configuration's fault, not the user's: it is reported as unavailable.
pub async fn imap_master_login(
    t: &Target<'_>,
    user: &str,
    master: (&str, &str, &str),
    client_tag: &str,
) -> Result<(Conn, Vec<u8>), BackendError> {
    let (name, separator, password) = master;
    imap_login(t, &format!("{user}{separator}{name}"), password, client_tag)
        .await
        .map_err(|e| match e {
            BackendError::Auth(reply) => unavailable(
                t.url,
                format!("the master user {name} was refused: {reply}"),
            ),
            e => e,
        })
}

/// POP3: greeting, STLS when CAPA offers it (pop3://, RFC 2595 4), USER and
/// PASS (RFC 1939 7). Returns the connection and the platform's +OK line.
pub async fn pop3_login(
    t: &Target<'_>,
    user: &str,
    password: &str,
) -> Result<(Conn, Vec<u8>), BackendError> {
    if user.contains(['\r', '\n']) || password.contains(['\r', '\n']) {
        return Err(BackendError::Auth(
            "credentials with CR or LF cannot be sent".into(),
        ));
    }
    let mut c = connect(t).await?;
    let greeting = line(&mut c, t.url).await?;
    if !greeting.starts_with("+OK") {
        return Err(unavailable(t.url, format!("greeting `{greeting}`")));
    }
    if !c.tls && t.tls != TlsPolicy::None {
        send(&mut c, t.url, "CAPA\r\n").await?;
        let mut stls = false;
        if line(&mut c, t.url).await?.starts_with("+OK") {
            loop {
                let l = line(&mut c, t.url).await?;
                if l == "." {
                    break;
                }
                stls |= l.eq_ignore_ascii_case("STLS");
            }
        }
        if stls {
            send(&mut c, t.url, "STLS\r\n").await?;
            let r = line(&mut c, t.url).await?;
            if !r.starts_with("+OK") {
                return Err(unavailable(t.url, format!("STLS refused: `{r}`")));
            }
            c = c
                .connect_tls(t.client_tls.clone(), &t.url.host)
                .await
                .map_err(|e| unavailable(t.url, format!("TLS: {e}")))?;
        } else if t.tls == TlsPolicy::Require {
            return Err(unavailable(
                t.url,
                "no STLS and the platform's tls = \"require\"",
            ));
        }
    }
    send(&mut c, t.url, &format!("USER {user}\r\n")).await?;
    let r = line(&mut c, t.url).await?;
    if !r.starts_with("+OK") {
        return Err(BackendError::Auth(r));
    }
    send(&mut c, t.url, &format!("PASS {password}\r\n")).await?;
    let r = line(&mut c, t.url).await?;
    if !r.starts_with("+OK") {
        return Err(BackendError::Auth(r));
    }
    Ok((c, format!("{r}\r\n").into_bytes()))
}
