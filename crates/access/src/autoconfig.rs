//! Client autoconfiguration: Thunderbird's autoconfig (config-v1.1.xml) and
//! Outlook's POX autodiscover. Both name the front at `public_hostname`, so a
//! client set up during the migration never needs changing again. The XML
//! is built by pure functions from `Endpoints`.

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use godwit_config::{AccessConfig, Config, SocketType};
use std::collections::HashMap;
use std::sync::Arc;

/// One server a client should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub port: u16,
    pub socket: Socket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// Implicit TLS (RFC 8314).
    Ssl,
    Starttls,
    /// No TLS at all (a front with no certificate: loopback tests only).
    Plain,
}

impl Socket {
    /// Thunderbird's socketType.
    fn thunderbird(self) -> &'static str {
        match self {
            Socket::Ssl => "SSL",
            Socket::Starttls => "STARTTLS",
            Socket::Plain => "plain",
        }
    }
}

/// What the front serves, in the order a client should prefer them:
/// implicit TLS first (RFC 8314 3.3), then STARTTLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub hostname: String,
    pub imap: Vec<Endpoint>,
    pub pop3: Vec<Endpoint>,
    pub smtp: Vec<Endpoint>,
    pub domains: Vec<String>,
}

impl Endpoints {
    pub fn from_config(config: &Config, access: &AccessConfig) -> Endpoints {
        let tls = access.cert(config).is_some();
        let clear = if tls { Socket::Starttls } else { Socket::Plain };
        let ends = |implicit: &[std::net::SocketAddr], starttls: &[std::net::SocketAddr]| {
            let mut v: Vec<Endpoint> = implicit
                .iter()
                .map(|a| Endpoint {
                    port: a.port(),
                    socket: Socket::Ssl,
                })
                .collect();
            v.extend(starttls.iter().map(|a| Endpoint {
                port: a.port(),
                socket: clear,
            }));
            v.dedup();
            v
        };
        Endpoints {
            hostname: access.public_hostname(config).to_string(),
            imap: ends(&access.imaps_listen, &access.imap_listen),
            pop3: ends(&access.pop3s_listen, &access.pop3_listen),
            smtp: access
                .submission_port
                .map(|port| Endpoint {
                    port,
                    socket: match access.submission_socket {
                        SocketType::Ssl => Socket::Ssl,
                        SocketType::Starttls => Socket::Starttls,
                    },
                })
                .into_iter()
                .collect(),
            domains: config.domains.accepted.clone(),
        }
    }

    /// The domain of `address` if it is one the gateway accepts.
    pub fn domain_of(&self, address: &str) -> Option<String> {
        let (_, d) = address.trim().rsplit_once('@')?;
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        self.domains.contains(&d).then_some(d)
    }
}

/// XML character data and attribute values (XML 1.0 2.4, 3.3.3).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

/// Thunderbird's config-v1.1.xml (the autoconfig format Mozilla documents
/// at wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat).
pub fn thunderbird(e: &Endpoints, domain: &str) -> String {
    let d = escape(domain);
    let host = escape(&e.hostname);
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<clientConfig version=\"1.1\">\n  <emailProvider id=\"{d}\">\n    <domain>{d}</domain>\n    <displayName>{d}</displayName>\n    <displayShortName>{d}</displayShortName>\n"
    );
    let server = |x: &mut String, el: &str, kind: &str, ep: &Endpoint| {
        x.push_str(&format!(
            "    <{el} type=\"{kind}\">\n      <hostname>{host}</hostname>\n      <port>{}</port>\n      <socketType>{}</socketType>\n      <authentication>password-cleartext</authentication>\n      <username>%EMAILADDRESS%</username>\n    </{el}>\n",
            ep.port,
            ep.socket.thunderbird()
        ));
    };
    for ep in &e.imap {
        server(&mut x, "incomingServer", "imap", ep);
    }
    for ep in &e.pop3 {
        server(&mut x, "incomingServer", "pop3", ep);
    }
    for ep in &e.smtp {
        server(&mut x, "outgoingServer", "smtp", ep);
    }
    x.push_str("  </emailProvider>\n</clientConfig>\n");
    x
}

/// The EMailAddress of an Outlook POX autodiscover request ([MS-OXDSCLI]
/// 2.2.3). Only this element is read, so a plain scan suffices; anything
/// unexpected simply yields no address.
pub fn pox_request_address(body: &str) -> Option<String> {
    let start = body.find("<EMailAddress>")? + "<EMailAddress>".len();
    let end = body[start..].find("</EMailAddress>")? + start;
    let a = body[start..end].trim();
    (!a.is_empty() && !a.contains(['<', '&'])).then(|| a.to_string())
}

/// The POX autodiscover response ([MS-OXDSCLI] 2.2.4): one Protocol element
/// per endpoint, Type IMAP/POP3/SMTP.
pub fn autodiscover(e: &Endpoints, address: &str) -> String {
    let host = escape(&e.hostname);
    let login = escape(address);
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006\">\n  <Response xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a\">\n    <Account>\n      <AccountType>email</AccountType>\n      <Action>settings</Action>\n",
    );
    let proto = |x: &mut String, kind: &str, ep: &Endpoint| {
        let (ssl, enc) = match ep.socket {
            Socket::Ssl => ("on", "SSL"),
            Socket::Starttls => ("on", "TLS"),
            Socket::Plain => ("off", "None"),
        };
        x.push_str(&format!(
            "      <Protocol>\n        <Type>{kind}</Type>\n        <Server>{host}</Server>\n        <Port>{}</Port>\n        <LoginName>{login}</LoginName>\n        <DomainRequired>off</DomainRequired>\n        <SPA>off</SPA>\n        <SSL>{ssl}</SSL>\n        <Encryption>{enc}</Encryption>\n        <AuthRequired>on</AuthRequired>\n      </Protocol>\n",
            ep.port
        ));
    };
    for ep in &e.imap {
        proto(&mut x, "IMAP", ep);
    }
    for ep in &e.pop3 {
        proto(&mut x, "POP3", ep);
    }
    for ep in &e.smtp {
        proto(&mut x, "SMTP", ep);
    }
    x.push_str("    </Account>\n  </Response>\n</Autodiscover>\n");
    x
}

fn xml(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn tb(State(e): State<Arc<Endpoints>>, Query(q): Query<HashMap<String, String>>) -> Response {
    // Thunderbird sends ?emailaddress=; without one, the first accepted domain.
    let domain = match q.get("emailaddress") {
        Some(a) => e.domain_of(a),
        None => e.domains.first().cloned(),
    };
    match domain {
        Some(d) => xml(thunderbird(&e, &d)),
        None => (StatusCode::NOT_FOUND, "not a domain served here\n").into_response(),
    }
}

async fn pox(State(e): State<Arc<Endpoints>>, body: String) -> Response {
    match pox_request_address(&body).filter(|a| e.domain_of(a).is_some()) {
        Some(a) => xml(autodiscover(&e, &a)),
        None => (
            StatusCode::NOT_FOUND,
            "no EMailAddress of a domain served here\n",
        )
            .into_response(),
    }
}

/// The routes, to serve on `access.http_listen` or mount elsewhere.
pub fn router(e: Endpoints) -> axum::Router {
    axum::Router::new()
        .route("/mail/config-v1.1.xml", get(tb))
        .route("/.well-known/autoconfig/mail/config-v1.1.xml", get(tb))
        .route("/autodiscover/autodiscover.xml", post(pox))
        .route("/Autodiscover/Autodiscover.xml", post(pox))
        .with_state(Arc::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Endpoints {
        Endpoints {
            hostname: "mail.example.com".into(),
            imap: vec![
                Endpoint {
                    port: 993,
                    socket: Socket::Ssl,
                },
                Endpoint {
                    port: 143,
                    socket: Socket::Starttls,
                },
            ],
            pop3: vec![Endpoint {
                port: 995,
                socket: Socket::Ssl,
            }],
            smtp: vec![Endpoint {
                port: 587,
                socket: Socket::Starttls,
            }],
            domains: vec!["example.com".into()],
        }
    }

    #[test]
    fn thunderbird_names_every_endpoint_in_order() {
        let x = thunderbird(&endpoints(), "example.com");
        let order = [
            "<port>993</port>",
            "<port>143</port>",
            "<port>995</port>",
            "<port>587</port>",
        ];
        let at: Vec<usize> = order.iter().map(|p| x.find(p).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{x}");
        assert_eq!(
            x.matches("<hostname>mail.example.com</hostname>").count(),
            4
        );
        assert!(x.contains("<outgoingServer type=\"smtp\">"));
    }

    #[test]
    fn pox_requests_and_escaping() {
        let req = r#"<?xml version="1.0"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress> alice@example.com </EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"#;
        assert_eq!(
            pox_request_address(req).as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(pox_request_address("<EMailAddress></EMailAddress>"), None);
        assert_eq!(
            pox_request_address("<EMailAddress>a&amp;b</EMailAddress>"),
            None
        );
        assert_eq!(pox_request_address("nothing"), None);
        assert_eq!(escape("a<b>&\"'\u{1}"), "a&lt;b&gt;&amp;&quot;&apos;");
        let e = endpoints();
        assert_eq!(
            e.domain_of("Bob@Example.COM").as_deref(),
            Some("example.com")
        );
        assert_eq!(e.domain_of("bob@evil.test"), None);
        assert_eq!(e.domain_of("bob"), None);
        let x = autodiscover(&e, "alice@example.com");
        assert_eq!(x.matches("<Type>").count(), 4);
        assert!(x.contains("<Encryption>TLS</Encryption>"));
    }
}
