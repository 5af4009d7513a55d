//! TLS termination on the data-plane listeners: a certificate chain and key loaded from PEM
//! files, served through a resolver whose certificate a reload replaces without touching
//! the listening socket or the connections already open.
//!
//! The protocol versions (TLS 1.2 and 1.3 only) and ALPN (`h2`, then `http/1.1`) are set
//! where the listener is built (`server`); this module owns the key material.

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files a TLS listener serves its certificate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate chain with its private key, checked to belong together.
#[derive(Clone)]
pub struct LoadedCert(pub Arc<CertifiedKey>);

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoadedCert({} certificates)", self.0.cert.len())
    }
}

impl TlsFiles {
    /// Reads and checks both files. The message names the file and what is wrong with it.
    pub fn load(&self) -> Result<LoadedCert, String> {
        let certs = read_certs(&self.cert)?;
        let key = read_key(&self.key)?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{}: unusable private key: {e}", self.key.display()))?;
        let ck = CertifiedKey::new(certs, signing);
        ck.keys_match().map_err(|e| {
            format!(
                "{} and {} do not belong together: {e}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        Ok(LoadedCert(Arc::new(ck)))
    }
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, String> {
    std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM `-----BEGIN CERTIFICATE-----`)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))?
        .ok_or_else(|| {
            format!(
                "{}: no private key found (expected PEM `-----BEGIN PRIVATE KEY-----`, RSA or EC)",
                path.display()
            )
        })
}

/// Hands every handshake the current certificate; [`CertResolver::replace`] swaps it for
/// the handshakes that follow.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertResolver")
    }
}

impl CertResolver {
    pub fn new(cert: &LoadedCert) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            current: ArcSwap::new(cert.0.clone()),
        })
    }

    pub fn replace(&self, cert: &LoadedCert) {
        self.current.store(cert.0.clone());
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
