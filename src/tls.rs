//! TLS material built from PEM files into rustls configurations: the acceptor for clients
//! (patroxy's certificate, ALPN `postgresql`) and the connector for PostgreSQL servers
//! (`server_tls`, with libpq's sslmode meanings), and the SSLRequest exchange that opens TLS
//! to a server. Files are read on a blocking thread, never on the runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::config::{Config, ServerAuthMethod, ServerTlsConfig, ServerTlsMode, TlsConfig};
use crate::stream::Stream;

/// The ALPN protocol of PostgreSQL 17's direct TLS (`sslnegotiation=direct`).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", .path.display())]
    Pem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    #[error("reading TLS files: {0}")]
    Join(String),
}

/// TLS material loaded from the files the configuration names, shared by every listener.
#[derive(Clone)]
pub struct TlsMaterial {
    pub acceptor: Option<TlsAcceptor>,
    pub server: ServerTls,
}

impl TlsMaterial {
    /// Reads and checks every certificate and key `config` names, on a blocking thread: a
    /// slow disk must not stall the sessions sharing the runtime.
    pub async fn load(config: &Config) -> Result<TlsMaterial, TlsError> {
        let (client, server) = (config.tls.clone(), config.server_tls.clone());
        tokio::task::spawn_blocking(move || {
            Ok(TlsMaterial {
                acceptor: acceptor(&client)?,
                server: connector(&server)?,
            })
        })
        .await
        .map_err(|e| TlsError::Join(e.to_string()))?
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    match certs.is_empty() {
        true => Err(TlsError::NoCertificate(path.to_owned())),
        false => Ok(certs),
    }
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

/// The acceptor for clients, or `None` when `[tls]` has no certificate.
pub fn acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let rustls_err = |source| TlsError::Rustls {
        what: "tls",
        source,
    };
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_no_client_auth()
        .with_single_cert(certificates(cert)?, private_key(key)?)
        .map_err(rustls_err)?;
    // Clients that offer ALPN must offer this one; direct TLS requires it (checked after the
    // handshake, since a client may also offer no ALPN at all).
    server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// How patroxy opens server connections: the mode and, unless it is `disable`, a connector.
#[derive(Clone)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    pub connector: Option<TlsConnector>,
    /// `server_tls.require_auth`; empty: what the mode allows by default.
    pub require_auth: Vec<ServerAuthMethod>,
}

impl ServerTls {
    pub fn disabled() -> ServerTls {
        ServerTls {
            mode: ServerTlsMode::Disable,
            connector: None,
            require_auth: Vec::new(),
        }
    }

    /// Whether patroxy answers `method` on this leg; `secret_is_md5`: what patroxy holds
    /// is an md5 secret, not a password (sending md5 then gives nothing more away).
    pub fn answers(&self, method: ServerAuthMethod, secret_is_md5: bool) -> bool {
        if !self.require_auth.is_empty() {
            return self.require_auth.contains(&method);
        }
        let verified = matches!(
            self.mode,
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull
        );
        match method {
            ServerAuthMethod::Scram => true,
            ServerAuthMethod::Md5 => secret_is_md5 || verified,
            ServerAuthMethod::Password => verified,
            ServerAuthMethod::None => true,
        }
    }
}

pub fn connector(config: &ServerTlsConfig) -> Result<ServerTls, TlsError> {
    let rustls_err = |source| TlsError::Rustls {
        what: "server_tls",
        source,
    };
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match config.mode {
        ServerTlsMode::Disable => {
            return Ok(ServerTls {
                require_auth: config.require_auth.clone(),
                ..ServerTls::disabled()
            })
        }
        ServerTlsMode::Prefer | ServerTlsMode::Require => Arc::new(Lenient {
            chain: None,
            algorithms: provider.signature_verification_algorithms,
        }),
        ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            if let Some(ca) = &config.ca_file {
                for cert in certificates(ca)? {
                    roots.add(cert).map_err(rustls_err)?;
                }
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(roots.into(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Rustls {
                        what: "server_tls.ca_file",
                        source: rustls::Error::General(e.to_string()),
                    })?;
            match config.mode {
                ServerTlsMode::VerifyFull => webpki,
                _ => Arc::new(Lenient {
                    chain: Some(webpki),
                    algorithms: provider.signature_verification_algorithms,
                }),
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let client = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(rustls_err)?,
        _ => builder.with_no_client_auth(),
    };
    Ok(ServerTls {
        mode: config.mode,
        connector: Some(TlsConnector::from(Arc::new(client))),
        require_auth: config.require_auth.clone(),
    })
}

/// The name a server certificate is checked against (and sent as SNI).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} as a TLS name: {e}"))
}

/// The SSLRequest a client sends to ask a server for TLS.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Opens TLS to a server as `server_tls` says: an SSLRequest, then a handshake on `S`.
pub async fn open(mut tcp: TcpStream, tls: &ServerTls, host: &str) -> Result<Stream, String> {
    let Some(connector) = &tls.connector else {
        return Ok(Stream::Plain(tcp));
    };
    let mut answer = [0u8; 1];
    let asked = async {
        tcp.write_all(&SSL_REQUEST).await?;
        tcp.read_exact(&mut answer).await
    };
    asked.await.map_err(|e| format!("asking for TLS: {e}"))?;
    match answer[0] {
        b'S' => {
            let name = server_name(host)?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok(Stream::Tls(Box::new(TlsStream::Client(tls))))
        }
        b'N' if tls.mode == ServerTlsMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(format!(
            "the server does not accept TLS, and server_tls.mode is {:?}",
            tls.mode
        )),
        other => Err(format!(
            "unexpected answer {:?} to SSLRequest",
            other as char
        )),
    }
}

/// The server certificate checks below verify-full: none for `prefer` and `require`
/// (encryption without authentication, as in libpq), the chain to the CA but not the name for
/// `verify-ca`. Handshake signatures are checked in every case, so the handshake is sound.
#[derive(Debug)]
struct Lenient {
    /// `verify-ca`'s chain check; `None` checks nothing.
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
