//! TLS to one Redis node whose certificate is checked against `tls.ca`.
//!
//! [`CaVerifier`] is rustls's WebPKI verifier over the certificates given,
//! with one addition: a certificate given in `tls.ca` that the server
//! presents as its own is accepted as it is (pinned), in date and for the
//! host name. That is how a self-signed certificate made the usual way
//! (`openssl req -x509`, which marks it `CA:TRUE`) works, as it does with
//! `redis-cli --cacert` and Node's `tls.connect({ ca })`; the certificate is
//! the trust anchor, so pinning it is as safe as trusting a CA. A failure
//! says why, in terms an operator can act on ([`Problem`]).
//!
//! The redis crate builds its own rustls configuration from a root store
//! and takes no verifier, so [`TlsNode`] makes the connection itself: a TCP
//! stream, the TLS handshake with the verifier, then the crate's
//! multiplexed connection over that stream. It reconnects on the first call
//! after the connection failed, and subscribes again to the channels it
//! carried (what the crate's `ConnectionManager` does for plain nodes; the
//! breaker and probe in `connection.rs` drive both the same way).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, RedisError,
    RedisFuture, RedisResult, Value,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, DigitallySignedStruct, Error as TlsError, OtherError, RootCertStore,
    SignatureScheme,
};

use super::link::PushHandler;

/// Why a certificate did not verify, where rustls's own words would not say
/// (carried in `CertificateError::Other`, read by `link::describe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("self-signed, and not the certificate given in redis.tls.ca")]
    SelfSignedNotGiven,
    #[error("a CA certificate (CA:TRUE) presented as the server's own: give the server one its CA issued (CA:FALSE), or give that very certificate as redis.tls.ca")]
    CaAsServerCertificate,
}

impl From<Problem> for TlsError {
    fn from(p: Problem) -> Self {
        TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(p))))
    }
}

/// The PEM certificates of `tls.ca`, or `None` when there are none.
pub fn certificates(pem: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    (!certs.is_empty()).then_some(certs)
}

/// Verifies a server's certificate against the certificates of `tls.ca`.
#[derive(Debug)]
pub struct CaVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    given: Vec<CertificateDer<'static>>,
}

impl CaVerifier {
    /// `None` when `given` holds no certificate WebPKI can use as an anchor.
    pub fn new(given: Vec<CertificateDer<'static>>) -> Option<Self> {
        let mut roots = RootCertStore::empty();
        for c in &given {
            roots.add(c.clone()).ok()?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .ok()?;
        Some(Self { webpki, given })
    }

    fn is_given(&self, cert: &CertificateDer<'_>) -> bool {
        self.given.iter().any(|c| c.as_ref() == cert.as_ref())
    }
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let err = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => return Ok(verified),
            Err(e) => e,
        };
        if is_ca_used_as_end_entity(&err) {
            if !self.is_given(end_entity) {
                return Err(if is_self_signed(end_entity) {
                    Problem::SelfSignedNotGiven
                } else {
                    Problem::CaAsServerCertificate
                }
                .into());
            }
            // Pinned. WebPKI checks an end entity's validity period before
            // its basic constraints, so this error says the certificate is in
            // date (an expired one fails as expired: a test holds this); the
            // host name is checked here, as for any certificate.
            let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| err.clone())?;
            return match cert.verify_is_valid_for_subject_name(server_name) {
                Ok(()) => Ok(ServerCertVerified::assertion()),
                Err(webpki::Error::CertNotValidForName(c)) => Err(TlsError::InvalidCertificate(
                    CertificateError::NotValidForNameContext {
                        expected: c.expected,
                        presented: c.presented,
                    },
                )),
                Err(_) => Err(CertificateError::NotValidForName.into()),
            };
        }
        if matches!(
            err,
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer)
        ) && intermediates.is_empty()
            && is_self_signed(end_entity)
        {
            return Err(Problem::SelfSignedNotGiven.into());
        }
        Err(err)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Whether WebPKI refused a certificate for being a CA's (`CA:TRUE`).
pub fn is_ca_used_as_end_entity(e: &TlsError) -> bool {
    match e {
        TlsError::InvalidCertificate(CertificateError::Other(OtherError(inner))) => matches!(
            inner.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

/// Issued by itself (its issuer is its subject).
fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| c.issuer() == c.subject())
}

/// One node over TLS, verified by a [`CaVerifier`]; connects on first use
/// and again after a failure. Cheap to share (`Arc`).
pub struct TlsNode {
    info: ConnectionInfo,
    host: String,
    port: u16,
    connector: tokio_rustls::TlsConnector,
    config: AsyncConnectionConfig,
    timeout: Duration,
    /// The live connection and its generation (so a failure seen on an
    /// older one does not drop a newer one).
    current: parking_lot::Mutex<Option<(u64, MultiplexedConnection)>>,
    made: std::sync::atomic::AtomicU64,
    /// Held while connecting, so concurrent calls make one connection.
    connecting: tokio::sync::Mutex<()>,
    /// Channels to subscribe to again on each new connection.
    channels: parking_lot::Mutex<Vec<String>>,
}

impl TlsNode {
    /// `info` must be a `rediss://` address (the caller checked).
    pub fn new(
        info: ConnectionInfo,
        verifier: CaVerifier,
        timeout: Duration,
        push: PushHandler,
    ) -> Self {
        let (host, port) = match info.addr() {
            ConnectionAddr::TcpTls { host, port, .. } | ConnectionAddr::Tcp(host, port) => {
                (host.clone(), *port)
            }
            _ => (String::new(), 0),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            });
        // The safe defaults always build with ring; keep the type total.
        let tls = tls.unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth()
        });
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            // Every call has its own budget (`Connection::run`).
            .set_response_timeout(None)
            .set_push_sender(move |info| {
                push(info);
                Ok::<(), Infallible>(())
            });
        Self {
            info,
            host,
            port,
            connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            config,
            timeout,
            current: parking_lot::Mutex::new(None),
            made: std::sync::atomic::AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            channels: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The live connection, made if there is none.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = &*self.current.lock() {
            return Ok(c.clone());
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = &*self.current.lock() {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        let generation = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.current.lock() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    async fn connect(&self) -> RedisResult<MultiplexedConnection> {
        let name = ServerName::try_from(self.host.clone()).map_err(|_| {
            RedisError::from((ErrorKind::InvalidClientConfig, "not a TLS server name"))
        })?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        // No Nagle, as for plain nodes (`link::parse`).
        tcp.set_nodelay(true)?;
        let stream = self.connector.connect(name, tcp).await?;
        let (mut conn, driver) = MultiplexedConnection::new_with_config(
            self.info.redis_settings(),
            stream,
            self.config.clone(),
        )
        .await?;
        tokio::spawn(driver);
        let channels = self.channels.lock().clone();
        for channel in channels {
            conn.subscribe(channel).await?;
        }
        Ok(conn)
    }

    /// After `e` on connection `generation`: forget it if `e` says it is gone.
    fn failed(&self, generation: u64, e: &RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
            let mut current = self.current.lock();
            if matches!(&*current, Some((g, _)) if *g == generation) {
                *current = None;
            }
        }
    }

    pub async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        {
            let mut channels = self.channels.lock();
            if !channels.iter().any(|c| c == channel) {
                channels.push(channel.to_owned());
            }
        }
        let (generation, mut conn) = self.connection().await?;
        let r = conn.subscribe(channel).await;
        if let Err(e) = &r {
            self.failed(generation, e);
        }
        r
    }

    pub fn db(&self) -> i64 {
        self.info.redis_settings().db()
    }

    pub fn req_packed_command<'a>(self: &'a Arc<Self>, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let r = conn.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.failed(generation, e);
            }
            r
        })
    }

    pub fn req_packed_commands<'a>(
        self: &'a Arc<Self>,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let r = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &r {
                self.failed(generation, e);
            }
            r
        })
    }
}
