//! TLS for the listener: rustls with the aws-lc-rs provider.

use anyhow::Context;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert)
            .with_context(|| format!("smtp.tls_cert: cannot open {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("smtp.tls_cert: {} is not PEM", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key)
            .with_context(|| format!("smtp.tls_key: cannot open {}", key.display()))?,
    ))
    .with_context(|| format!("smtp.tls_key: {} is not PEM", key.display()))?
    .with_context(|| format!("smtp.tls_key: no private key in {}", key.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("smtp.tls_cert and smtp.tls_key do not form a usable certificate")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
