//! TLS with rustls: a server certificate that can be reloaded while serving, optional client-certificate
//! verification (mTLS, for the internal plane), and the client side for tonic channels.
//!
//! A reload reads the files into a whole new `ServerConfig` and swaps it in atomically; connections
//! already open keep the certificate they were accepted with, new ones get the new one. A file that does
//! not parse changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up; names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or holds nothing usable.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The certificate, key or CA do not make a valid configuration together.
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The PEM files of a server's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads `files` into a server configuration offering the ALPN protocols `alpn`.
fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error(&files.key, format!("not a PEM private key: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| file_error(ca, format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| file_error(ca, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("the certificate and key do not go together: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server's TLS configuration, reloadable from its files.
pub struct ServerTls {
    /// Where the identity is read from.
    files: TlsFiles,
    /// ALPN protocols offered: `h2` for gRPC, `http/1.1` for `/metrics`.
    alpn: Vec<&'static [u8]>,
    /// What new connections are accepted with.
    config: ArcSwap<ServerConfig>,
}

/// ALPN for gRPC listeners.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1 listeners.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

impl ServerTls {
    /// Reads `files`; fails naming the file when one is missing or invalid.
    pub fn load(files: TlsFiles, alpn: &[&'static [u8]]) -> Result<Arc<ServerTls>, TlsError> {
        let config = server_config(&files, alpn)?;
        Ok(Arc::new(ServerTls {
            files,
            alpn: alpn.to_vec(),
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Reads the files again and uses them for new connections. On an error the running certificate
    /// stays. Counted by `listener` and outcome.
    pub fn reload(&self, listener: &'static str) -> Result<(), TlsError> {
        let result = server_config(&self.files, &self.alpn).map(|c| self.config.store(Arc::new(c)));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(
            ferroserve_telemetry::names::TLS_RELOADS_TOTAL,
            ferroserve_telemetry::names::LABEL_LISTENER => listener,
            ferroserve_telemetry::names::LABEL_OUTCOME => outcome
        )
        .increment(1);
        result
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the current certificate.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }
}

/// The PEM files of a client's TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CAs to trust for the server's certificate; the system's roots when unset.
    pub ca: Option<PathBuf>,
    /// A client certificate to present (mTLS), with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// tonic's client TLS settings from these files.
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| file_error(p, format!("cannot read: {e}")));
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => {
                certs(ca)?;
                config.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                certs(cert)?;
                Ok(config.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?)))
            }
            (None, None) => Ok(config),
            _ => Err(TlsError::Config(
                "a client certificate needs both its certificate and its key file".into(),
            )),
        }
    }
}

/// A tonic channel endpoint for `url`, with TLS when the URL is `https://`. Nothing connects yet.
pub fn endpoint(url: &str, tls: &ClientTlsFiles) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let config = tls.tonic_config().map_err(|e| e.to_string())?;
        endpoint.tls_config(config).map_err(|e| format!("TLS for {url}: {e}"))
    } else {
        Ok(endpoint)
    }
}
