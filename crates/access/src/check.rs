//! `godwit check access ADDRESS`: logs in through the front as the user,
//! finds which platform answered (by comparing the INBOX the front shows
//! with each platform's own), compares that with the routing map, and asks
//! the autoconfig endpoints whether they name the front.

use crate::backend::{self, BackendError, Target};
use crate::conn::Conn;
use crate::imap;
use godwit_config::{Config, MailScheme, MailUrl, TlsPolicy};
use godwit_route::SharedRoutes;
use godwit_store::Store;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// What an INBOX looks like from outside: enough to tell two platforms'
/// copies of one mailbox apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub uidvalidity: Option<String>,
    pub exists: Option<u32>,
    pub uidnext: Option<String>,
    /// The Message-ID of the newest message.
    pub newest: Option<String>,
}

/// Reads a whole response to `tag`, literals included, as text.
async fn response(c: &mut Conn, tag: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let Some(mut l) = c.read_line(1 << 20).await? else {
            anyhow::bail!("the server closed the connection");
        };
        while let Some(lit) = imap::trailing_literal(&l) {
            l.extend_from_slice(b"\r\n");
            l.extend(c.read_exact(lit.len).await?);
            l.extend(c.read_line(1 << 20).await?.unwrap_or_default());
        }
        let text = String::from_utf8_lossy(&l).into_owned();
        out.push_str(&text);
        out.push('\n');
        if text.starts_with(&format!("{tag} ")) {
            return Ok(out);
        }
    }
}

fn code_value(text: &str, code: &str) -> Option<String> {
    let at = text.find(&format!("[{code} "))? + code.len() + 2;
    Some(text[at..].split(']').next()?.to_string())
}

/// Pure: the fingerprint in a SELECT and FETCH transcript.
pub fn fingerprint(select: &str, fetch: &str) -> Fingerprint {
    let exists = select
        .lines()
        .find_map(|l| l.strip_prefix("* ")?.strip_suffix(" EXISTS")?.parse().ok());
    let newest = fetch.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("message-id")
            .then(|| v.trim().to_string())
    });
    Fingerprint {
        uidvalidity: code_value(select, "UIDVALIDITY"),
        exists,
        uidnext: code_value(select, "UIDNEXT"),
        newest,
    }
}

async fn inbox(mut c: Conn) -> anyhow::Result<Fingerprint> {
    c.write(b"C1 SELECT INBOX\r\n").await?;
    let select = response(&mut c, "C1").await?;
    c.write(b"C2 FETCH * (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n")
        .await?;
    let fetch = response(&mut c, "C2").await?;
    let _ = c.write(b"C3 LOGOUT\r\n").await;
    Ok(fingerprint(&select, &fetch))
}

fn loopback(a: &SocketAddr) -> String {
    if a.ip().is_unspecified() {
        "127.0.0.1".into()
    } else {
        a.ip().to_string()
    }
}

async fn http(addr: &SocketAddr, req: String) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((loopback(addr).as_str(), addr.port())),
    )
    .await??;
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// Runs the check; returns the text to print and whether all agreed.
pub async fn run(
    config: &Config,
    store: &Store,
    address: &str,
    creds: impl Fn(&str) -> Option<Credentials>,
) -> anyhow::Result<(String, bool)> {
    let ac = config
        .access
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no [access] section in the configuration"))?;
    let routes = SharedRoutes::new(godwit_route::load(store, config).await?);
    let mut out = String::new();
    let mut ok = true;
    let expected = match crate::login_platform(config, &routes, store, address).await {
        Ok(p) => p,
        Err(reason) => {
            writeln!(out, "{address}: the front refuses this login ({reason})")?;
            return Ok((out, false));
        }
    };
    writeln!(out, "routing map: {address} logs in at {expected}")?;
    let Some(c) = creds(&expected) else {
        anyhow::bail!("no password for {address}: give --password, or list it in [sync] accounts");
    };
    let insecure = godwit_tls::client_config(true);
    // The front itself, as a client would reach it.
    let (listen, scheme) = match (ac.imap_listen.first(), ac.imaps_listen.first()) {
        (Some(a), _) => (a, MailScheme::Imap),
        (None, Some(a)) => (a, MailScheme::Imaps),
        _ => anyhow::bail!("access.imap_listen and access.imaps_listen are both empty"),
    };
    let front_url = MailUrl {
        scheme,
        host: loopback(listen),
        port: listen.port(),
    };
    let target = |url, tls| Target {
        url,
        tls,
        client_tls: insecure.clone(),
        timeout: ac.backend_timeout,
    };
    let front = match backend::imap_login(
        &target(&front_url, TlsPolicy::Opportunistic),
        &c.user,
        &c.password,
        "C0",
    )
    .await
    {
        Ok((conn, _)) => inbox(conn).await?,
        Err(BackendError::Auth(r)) => {
            writeln!(
                out,
                "front {}:{}: login refused: {r}",
                front_url.host, front_url.port
            )?;
            return Ok((out, false));
        }
        Err(BackendError::Unavailable(r)) => {
            writeln!(out, "front: {r}")?;
            return Ok((out, false));
        }
    };
    let mut answered = Vec::new();
    for (name, p) in &config.platforms {
        let Some(url) = &p.imap else { continue };
        let Some(pc) = creds(name) else { continue };
        let t = Target {
            client_tls: godwit_tls::client_config(p.tls_insecure),
            ..target(url, p.tls)
        };
        match backend::imap_login(&t, &pc.user, &pc.password, "C0").await {
            Ok((conn, _)) => {
                let f = inbox(conn).await?;
                if f == front {
                    answered.push(name.clone());
                }
            }
            Err(e) => writeln!(out, "platform {name}: cannot compare ({e:?})")?,
        }
    }
    match answered.as_slice() {
        [one] if *one == expected => writeln!(out, "front: answered by {one}, as routed")?,
        [one] => {
            ok = false;
            writeln!(
                out,
                "front: answered by {one}, but the routing map says {expected}"
            )?
        }
        [] => {
            ok = false;
            writeln!(out, "front: its INBOX matches no platform's")?
        }
        many => writeln!(
            out,
            "front: INBOX identical on {} (cannot tell apart)",
            many.join(", ")
        )?,
    }
    // Autoconfig: does it name the front?
    let endpoints = crate::autoconfig::Endpoints::from_config(config, ac);
    if let Some(http_addr) = ac.http_listen.first() {
        let want_host = format!("<hostname>{}</hostname>", endpoints.hostname);
        let want_port = endpoints
            .imap
            .first()
            .map(|e| format!("<port>{}</port>", e.port));
        let tb = http(
            http_addr,
            format!("GET /mail/config-v1.1.xml?emailaddress={address} HTTP/1.0\r\nHost: autoconfig\r\n\r\n"),
        )
        .await?;
        let tb_ok = tb.contains(&want_host) && want_port.as_ref().is_none_or(|p| tb.contains(p));
        let body = format!(
            "<Autodiscover><Request><EMailAddress>{address}</EMailAddress></Request></Autodiscover>"
        );
        let pox = http(
            http_addr,
            format!("POST /autodiscover/autodiscover.xml HTTP/1.0\r\nHost: autodiscover\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        )
        .await?;
        let pox_ok = pox.contains(&format!("<Server>{}</Server>", endpoints.hostname));
        ok &= tb_ok && pox_ok;
        let say = |b: bool| {
            if b {
                "names the front"
            } else {
                "does NOT name the front"
            }
        };
        writeln!(out, "autoconfig (Thunderbird): {}", say(tb_ok))?;
        writeln!(out, "autodiscover (Outlook): {}", say(pox_ok))?;
    } else {
        writeln!(out, "autoconfig: access.http_listen is not set")?;
    }
    Ok((out, ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let select = "* FLAGS (\\Seen)\n* 2 EXISTS\n* 0 RECENT\n* OK [UIDVALIDITY 1764580000] UIDs valid\n* OK [UIDNEXT 3] Predicted next UID\nC1 OK [READ-WRITE] Select completed.\n";
        let fetch = "* 2 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {25}\r\nMessage-ID: <b@test>\r\n\r\n)\nC2 OK Fetch completed.\n";
        assert_eq!(
            fingerprint(select, fetch),
            Fingerprint {
                uidvalidity: Some("1764580000".into()),
                exists: Some(2),
                uidnext: Some("3".into()),
                newest: Some("<b@test>".into()),
            }
        );
        assert_eq!(fingerprint("", "").exists, None);
    }
}
