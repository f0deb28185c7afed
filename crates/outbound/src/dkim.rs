//! DKIM (RFC 6376) for mail leaving godwit: keys loaded from `[[dkim]]`,
//! the key chosen by the header From domain (or a parent: relaxed DMARC
//! alignment, RFC 7489 3.1.1), relaxed/relaxed canonicalization, the RFC 6376
//! 5.4.1 recommended headers that are present, and From oversigned. Signing
//! happens once per delivery attempt on the way out; the spool keeps the
//! original, so a retry signs again with a fresh `t=`; the body is hashed as
//! it is read from the spool, never held whole. A signature a
//! platform already added stays where it is (ours goes on top).

use base64::Engine as _;
use godwit_config::DkimConfig;
use mail_auth::common::crypto::{Algorithm, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("dkim key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("dkim signing for {domain}: {message}")]
    Sign { domain: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

impl KeyAlgorithm {
    /// The `k=` tag (RFC 6376 3.6.1, RFC 8463).
    pub fn tag(&self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa => "rsa",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }
}

/// One configured key.
pub struct LoadedKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    /// RSA: the SubjectPublicKeyInfo DER; Ed25519: the 32 raw bytes (RFC 8463 4.2).
    pub public_key: Vec<u8>,
    /// RSA modulus bits (0 for Ed25519).
    pub bits: usize,
    key: DkimKey,
}

impl LoadedKey {
    /// The TXT record to publish at `selector._domainkey.domain`.
    pub fn txt_record(&self) -> String {
        txt_record(self.algorithm, &self.public_key)
    }

    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }
}

/// `v=DKIM1; k=...; p=...` (RFC 6376 3.6.1).
pub fn txt_record(alg: KeyAlgorithm, public_key: &[u8]) -> String {
    format!(
        "v=DKIM1; k={}; p={}",
        alg.tag(),
        base64::engine::general_purpose::STANDARD.encode(public_key)
    )
}

/// Keys by signing domain.
#[derive(Default)]
pub struct DkimKeys {
    keys: Vec<LoadedKey>,
}

/// mail-auth's signer takes its key by value; this lends it one we keep.
struct KeyRef<'a>(&'a DkimKey);

impl SigningKey for KeyRef<'_> {
    type Hasher = Sha256;
    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }
    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// RFC 6376 5.4.1: the header fields a signature should cover.
pub const RECOMMENDED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// The `h=` list for a message whose header names are `present`: the
/// recommended fields it has, and From once more so that a From added in
/// transit breaks the signature (oversigning, RFC 6376 8.15).
pub fn headers_to_sign(present: &[String]) -> Vec<String> {
    let mut h: Vec<String> = RECOMMENDED_HEADERS
        .iter()
        .filter(|r| present.iter().any(|p| p.eq_ignore_ascii_case(r)))
        .map(|s| s.to_string())
        .collect();
    h.push("From".into());
    h
}

/// Which of `domains` signs for header From domain `from`: the same domain,
/// else the closest parent (relaxed alignment, RFC 7489 3.1.1: d=example.com
/// aligns with From: a@mail.example.com). None: the message goes unsigned.
pub fn choose_key<'a>(from: &str, domains: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    let from = from.trim_end_matches('.').to_ascii_lowercase();
    domains
        .into_iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            (from == d || from.ends_with(&format!(".{d}"))).then_some((d.len(), i))
        })
        .max()
        .map(|(_, i)| i)
}

/// The header names of a message, in order, and the domain of its (first)
/// header From address.
pub fn header_facts(message: &[u8]) -> (Vec<String>, Option<String>) {
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
        return (Vec::new(), None);
    };
    let names = parsed
        .headers()
        .iter()
        .map(|h| h.name.as_str().to_string())
        .collect();
    let from = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address.as_deref())
        .and_then(|a| a.rsplit_once('@'))
        .map(|(_, d)| d.to_ascii_lowercase());
    (names, from)
}

/// Parses a PEM private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
fn load_key(path: &Path, pem: &[u8]) -> Result<(DkimKey, KeyAlgorithm, Vec<u8>, usize), DkimError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let err = |m: String| DkimError::Key {
        path: path.to_path_buf(),
        message: m,
    };
    let der = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| err(format!("not a PEM private key: {e}")))?;
    let rsa = match &der {
        PrivateKeyDer::Pkcs1(d) => Some(aws_lc_rs::rsa::KeyPair::from_der(d.secret_pkcs1_der())),
        PrivateKeyDer::Pkcs8(d) => aws_lc_rs::rsa::KeyPair::from_pkcs8(d.secret_pkcs8_der())
            .ok()
            .map(Ok),
        _ => return Err(err("only RSA and Ed25519 keys sign DKIM here".into())),
    };
    if let Some(rsa) = rsa {
        let pair = rsa.map_err(|e| err(format!("RSA key rejected: {e}")))?;
        let bits = pair.public_modulus_len() * 8;
        if bits < 2048 {
            // RFC 8301 3.2: signers must use at least 1024 bits; current
            // practice and the contract: 2048 or more.
            return Err(err(format!(
                "RSA key of {bits} bits: use 2048 bits or more"
            )));
        }
        let spki = pair
            .public_key()
            .as_der()
            .map_err(|e| err(format!("public key: {e}")))?
            .as_ref()
            .to_vec();
        let key =
            RsaKey::<Sha256>::from_key_der(der.clone_key()).map_err(|e| err(e.to_string()))?;
        return Ok((DkimKey::Rsa(key), KeyAlgorithm::Rsa, spki, bits));
    }
    let PrivateKeyDer::Pkcs8(d) = &der else {
        unreachable!()
    };
    let pair =
        aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(d.secret_pkcs8_der())
            .map_err(|e| err(format!("neither an RSA nor an Ed25519 key: {e}")))?;
    let public = pair.public_key().as_ref().to_vec();
    let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(d.secret_pkcs8_der())
        .map_err(|e| err(e.to_string()))?;
    Ok((DkimKey::Ed25519(key), KeyAlgorithm::Ed25519, public, 0))
}

/// A signature made for one message.
#[derive(Debug, Clone)]
pub struct Signed {
    /// `DKIM-Signature: ...\r\n`, folded, to put before the message.
    pub header: String,
    pub domain: String,
    pub selector: String,
}

impl DkimKeys {
    pub fn load(config: &[DkimConfig]) -> Result<DkimKeys, DkimError> {
        let mut keys = Vec::new();
        for c in config {
            let pem = std::fs::read(&c.key).map_err(|e| DkimError::Key {
                path: c.key.clone(),
                message: e.to_string(),
            })?;
            let (key, algorithm, public_key, bits) = load_key(&c.key, &pem)?;
            keys.push(LoadedKey {
                domain: c.domain.trim_end_matches('.').to_ascii_lowercase(),
                selector: c.selector.clone(),
                algorithm,
                public_key,
                bits,
                key,
            });
        }
        Ok(DkimKeys { keys })
    }

    pub fn keys(&self) -> &[LoadedKey] {
        &self.keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key that signs mail whose header From is in `from_domain`.
    pub fn key_for(&self, from_domain: &str) -> Option<&LoadedKey> {
        choose_key(from_domain, self.keys.iter().map(|k| k.domain.as_str())).map(|i| &self.keys[i])
    }

    /// Signs `message` with the key for its header From domain; None when
    /// no key covers it (the message leaves unsigned, as it came).
    pub fn sign(&self, message: &[u8]) -> Result<Option<Signed>, DkimError> {
        self.sign_reader(&mut &message[..])
    }

    /// Signs the message read from `source`, in chunks: only the header
    /// section is held whole (the key and the signed header list depend on
    /// it); the body goes through the hash as it is read (RFC 6376 3.7: the
    /// body hash is computed over the canonicalized body, front to back), so
    /// a 50 MB message costs one chunk of memory, not 50 MB per attempt.
    pub fn sign_reader(&self, source: &mut impl Read) -> Result<Option<Signed>, DkimError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let read_err = |e: std::io::Error| DkimError::Sign {
            domain: "(reading the message)".into(),
            message: e.to_string(),
        };
        let mut chunk = vec![0u8; SIGN_CHUNK];
        let mut head = Vec::new();
        // The header section ends at the first empty line (RFC 5322 2.1);
        // each read looks only at what is new (and the 3 bytes before it).
        let mut scanned = 0;
        while header_end(&head, scanned).is_none() {
            scanned = head.len().saturating_sub(3);
            let n = source.read(&mut chunk).map_err(read_err)?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let (names, from) = header_facts(&head);
        let Some(key) = from.as_deref().and_then(|d| self.key_for(d)) else {
            return Ok(None);
        };
        let signer = DkimSigner::from_key(KeyRef(&key.key))
            .domain(key.domain.clone())
            .selector(key.selector.clone())
            .headers(headers_to_sign(&names))
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        let mut stream = signer.sign_streaming();
        stream.write(&head);
        drop(head);
        loop {
            let n = source.read(&mut chunk).map_err(read_err)?;
            if n == 0 {
                break;
            }
            stream.write(&chunk[..n]);
        }
        let sig = stream.finish().map_err(|e| DkimError::Sign {
            domain: key.domain.clone(),
            message: e.to_string(),
        })?;
        Ok(Some(Signed {
            header: sig.to_header(),
            domain: key.domain.clone(),
            selector: key.selector.clone(),
        }))
    }
}

/// How much of a message the signer reads at a time.
const SIGN_CHUNK: usize = 64 * 1024;

/// Whether the header section of `message` has ended (its empty line has
/// arrived), looking from `from` on.
fn header_end(message: &[u8], from: usize) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(2);
    }
    message[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

/// A new key pair: the private key as PEM (PKCS#8) and the TXT record.
pub fn generate(alg: KeyAlgorithm) -> Result<(String, String), String> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let (der, public) = match alg {
        KeyAlgorithm::Rsa => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|e| format!("RSA key generation: {e}"))?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der = pair.as_der().map_err(|e| e.to_string())?;
            let spki: aws_lc_rs::encoding::PublicKeyX509Der =
                pair.public_key().as_der().map_err(|e| e.to_string())?;
            (der.as_ref().to_vec(), spki.as_ref().to_vec())
        }
        KeyAlgorithm::Ed25519 => {
            let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .map_err(|e| format!("Ed25519 key generation: {e}"))?;
            let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
                .map_err(|e| e.to_string())?;
            (doc.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
        }
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, txt_record(alg, &public)))
}

/// Writes a private key readable by its owner only (0600), refusing to
/// replace an existing file: a DKIM key in DNS must never be lost by accident.
pub fn write_private_key(path: &Path, pem: &str) -> Result<(), DkimError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| DkimError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    f.write_all(pem.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_end_table() {
        for (msg, from, want) in [
            (&b""[..], 0, None),
            (b"\r\nbody", 0, Some(2)),
            (b"A: b\r\n\r\nbody", 0, Some(8)),
            (b"A: b\r\n\r\nbody", 3, Some(8)),
            (b"A: b\r\nC: d\r\n", 0, None),
            (b"A: b\r\n", 0, None),
        ] {
            assert_eq!(
                header_end(msg, from),
                want,
                "{:?} from {from}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    /// Read a byte at a time or in one piece, the signature is the one
    /// mail-auth makes over the whole message at once (same `t=` second
    /// aside: compared with `t=` and `b=` removed, the body hash `bh=` and
    /// the signed header list `h=` must be equal).
    #[test]
    fn signing_in_chunks_equals_signing_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, _) = generate(KeyAlgorithm::Ed25519).unwrap();
        let path = dir.path().join("k.pem");
        write_private_key(&path, &pem).unwrap();
        let keys = DkimKeys::load(&[DkimConfig {
            domain: "example.com".into(),
            selector: "s1".into(),
            key: path,
        }])
        .unwrap();
        let mut msg = b"From: a@example.com\r\nSubject: x\r\n\r\n".to_vec();
        for i in 0..20_000 {
            msg.extend_from_slice(format!("line {i}  with  spaces \t\r\n").as_bytes());
        }
        msg.extend_from_slice(b"\r\n\r\n");
        let strip = |h: &str| -> Vec<String> {
            h.replace("\r\n", "")
                .split(';')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.starts_with("t=") && !t.starts_with("b="))
                .collect()
        };
        let whole = DkimSigner::from_key(KeyRef(&keys.keys[0].key))
            .domain("example.com")
            .selector("s1")
            .headers(["From", "Subject", "From"])
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed)
            .sign(&msg)
            .unwrap()
            .to_header();
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for got in [
            keys.sign(&msg).unwrap().unwrap().header,
            keys.sign_reader(&mut Trickle(&msg))
                .unwrap()
                .unwrap()
                .header,
        ] {
            assert_eq!(strip(&got), strip(&whole), "{got}");
        }
    }

    #[test]
    fn key_choice_table() {
        let domains = ["example.com", "mail.example.com", "other.org"];
        for (from, want) in [
            ("example.com", Some(0)),
            ("EXAMPLE.com.", Some(0)),
            ("mail.example.com", Some(1)),
            ("a.mail.example.com", Some(1)),
            ("sub.example.com", Some(0)),
            ("badexample.com", None),
            ("other.org", Some(2)),
            ("example.net", None),
        ] {
            assert_eq!(choose_key(from, domains), want, "{from}");
        }
    }

    #[test]
    fn signed_headers_are_the_present_recommended_ones_and_from_twice() {
        let present: Vec<String> = ["Received", "from", "To", "Subject", "X-Mailer", "Date"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            headers_to_sign(&present),
            ["From", "Subject", "Date", "To", "From"]
        );
    }

    #[test]
    fn generated_keys_load_sign_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [KeyAlgorithm::Rsa, KeyAlgorithm::Ed25519] {
            let (pem, txt) = generate(alg).unwrap();
            assert!(
                txt.starts_with(&format!("v=DKIM1; k={}; p=", alg.tag())),
                "{txt}"
            );
            let path = dir.path().join(format!("{}.pem", alg.tag()));
            write_private_key(&path, &pem).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert!(
                write_private_key(&path, &pem).is_err(),
                "never overwrites a key"
            );
            let keys = DkimKeys::load(&[DkimConfig {
                domain: "example.com".into(),
                selector: "s1".into(),
                key: path,
            }])
            .unwrap();
            assert_eq!(keys.keys()[0].txt_record(), txt);
            let msg =
                b"From: A <a@mail.example.com>\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n";
            let s = keys.sign(msg).unwrap().unwrap();
            assert!(
                s.header.starts_with("DKIM-Signature: v=1; a="),
                "{}",
                s.header
            );
            assert!(s.header.contains("c=relaxed/relaxed"), "{}", s.header);
            assert!(s.header.contains("d=example.com"), "{}", s.header);
            let unsigned = b"From: a@example.org\r\n\r\nbody\r\n";
            assert!(keys.sign(unsigned).unwrap().is_none());
        }
    }
}
