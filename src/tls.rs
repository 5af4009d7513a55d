//! TLS on both sides.
//!
//! Uses nothing of the crate (a leaf: the config holds its types).
//!
//! Listeners: a certificate chain and key loaded from PEM files, served through a resolver
//! whose certificate a reload replaces without touching the listening socket or the
//! connections already open. The protocol versions (TLS 1.2 and 1.3 only) and ALPN (`h2`,
//! then `http/1.1`) are set where the listener is built (`server`).
//!
//! Backends (`https://` URLs): the client configuration the gateway's own background
//! requests use ([`BackendTls`]); proxied requests go through Pingora's connector, given
//! the same CA file (`upstream.ca_file`) and verification setting.

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

/// Which of a listener's TLS files a problem is with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPart {
    Cert,
    Key,
    /// Both read, but they do not belong together.
    Pair,
}

/// What is wrong with a listener's TLS files; the message names the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TlsFileError {
    pub part: TlsPart,
    pub message: String,
}

impl TlsFiles {
    /// Reads and checks both files. The error says which, and what is wrong with it.
    pub fn load(&self) -> Result<LoadedCert, TlsFileError> {
        let at = |part| move |message| TlsFileError { part, message };
        let certs = read_certs(&self.cert).map_err(at(TlsPart::Cert))?;
        let key = read_key(&self.key).map_err(at(TlsPart::Key))?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{}: unusable private key: {e}", self.key.display()))
            .map_err(at(TlsPart::Key))?;
        let ck = CertifiedKey::new(certs, signing);
        ck.keys_match()
            .map_err(|e| {
                format!(
                    "{} and {} do not belong together: {e}",
                    self.cert.display(),
                    self.key.display()
                )
            })
            .map_err(at(TlsPart::Pair))?;
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

/// How the gateway speaks TLS to one `https://` backend.
#[derive(Clone)]
pub struct BackendTls {
    /// The URL's host name: sent as SNI and checked against the certificate.
    pub sni: String,
    /// Whether the backend's certificate is verified (`backends[].tls_verify`).
    pub verify: bool,
    /// For the background requests (health, discovery, metrics, probes).
    pub client: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .finish()
    }
}

/// The CA file is the same for every backend and needs a restart to change, so two
/// settings are the same when their name and verification agree.
impl PartialEq for BackendTls {
    fn eq(&self, other: &BackendTls) -> bool {
        self.sni == other.sni && self.verify == other.verify
    }
}

/// The client configuration for backends: trusting `ca_file` if given, else the system's
/// roots (as Pingora's connector does); without `verify`, trusting any certificate.
pub fn client_config(
    ca_file: Option<&Path>,
    verify: bool,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS client: {e}"))?;
    let config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for c in read_certs(path)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().unwrap_or_default() {
                    let _ = roots.add(c);
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `tls_verify: false`: the connection is encrypted, but the backend is not authenticated.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
