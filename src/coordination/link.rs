//! Where a coordinator's Redis is and how to reach it: one node (a
//! `ConnectionManager`, which reconnects by itself) or a Redis Cluster (the
//! crate's cluster client, which follows MOVED/ASK redirections, slot
//! migrations and failovers), over TCP or TLS (rustls; the system's roots,
//! or the CA given as `tls.ca`). Either way one RESP3 link carries commands
//! and the pub/sub channel, and hands pushes to one handler.
//!
//! Pub/sub on a cluster: a script's `PUBLISH` on the slot's node reaches
//! subscribers on every node (the cluster bus forwards it), so each
//! instance keeps its one subscription, wherever the client placed it.
//! Sharded pub/sub would not spare that forwarding here: `invalidate` must
//! reach every instance for any user, so each would subscribe to a channel
//! in every slot. Announcements are one per refresh, which the bus carries
//! at no real cost.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    ProtocolVersion, PushInfo, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

use super::tls::{self, CaVerifier, Problem, TlsNode};
use crate::engine::{EngineError, SecretString};

/// Where Redis is, as the options say.
#[derive(Debug)]
pub enum Endpoint {
    /// `url`: one node.
    Node(SecretString),
    /// `cluster`: some nodes of a Redis Cluster (the rest are discovered).
    Cluster(Vec<SecretString>),
}

/// Hears every push (pub/sub messages) on the link.
pub type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

/// A parsed endpoint, not yet connected. Holds the password: never printed.
pub enum Target {
    Node {
        client: Client,
        push: PushHandler,
    },
    /// One node over TLS verified against `tls.ca` (`tls.rs`).
    Tls(Arc<TlsNode>),
    Cluster(ClusterClient),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Node { .. } => "Target::Node(..)",
            Target::Tls(_) => "Target::Tls(..)",
            Target::Cluster(_) => "Target::Cluster(..)",
        })
    }
}

/// A connected link. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub enum Link {
    Node(ConnectionManager),
    Tls(Arc<TlsNode>),
    Cluster(ClusterConnection),
}

/// How the cluster client retries a command the cluster asked to retry
/// (TRYAGAIN while a slot migrates, CLUSTERDOWN during a failover): quickly
/// and a few times, since each call must end within `OP_TIMEOUT`.
const CLUSTER_RETRIES: u32 = 6;
const CLUSTER_RETRY_MIN_MS: u64 = 10;
const CLUSTER_RETRY_MAX_MS: u64 = 150;

const URL_FORMAT: &str = "redis[s]://[user:password@]host[:port][/db] or redis+unix:///path";

impl Target {
    /// Parses the endpoint; `ca` (PEM) replaces the system's roots for TLS.
    /// Errors name the option, never its value.
    pub fn new(
        endpoint: &Endpoint,
        ca: Option<&[u8]>,
        timeout: Duration,
        push: PushHandler,
    ) -> Result<Self, EngineError> {
        let certs = ca.map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        });
        if let Some(pem) = ca {
            if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(EngineError::invalid_argument(
                    "options.redis.tls.ca",
                    "must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
                ));
            }
        }
        match endpoint {
            Endpoint::Node(url) => {
                let name = "options.redis.url";
                let info = parse(url, name, "")?;
                if let Some(pem) = ca {
                    need_tls(&info, name)?;
                    let verifier = tls::certificates(pem)
                        .and_then(CaVerifier::new)
                        .ok_or_else(bad_ca)?;
                    return Ok(Target::Tls(Arc::new(TlsNode::new(
                        info, verifier, timeout, push,
                    ))));
                }
                let client = Client::open(info).map_err(|_| bad_ca())?;
                Ok(Target::Node { client, push })
            }
            Endpoint::Cluster(urls) => {
                let name = "options.redis.cluster";
                if urls.is_empty() {
                    return Err(EngineError::invalid_argument(
                        name,
                        "must list at least one node",
                    ));
                }
                let mut nodes = Vec::with_capacity(urls.len());
                for (i, url) in urls.iter().enumerate() {
                    let info = parse(url, name, &format!("entry {i} "))?;
                    if matches!(info.addr(), ConnectionAddr::Unix(_)) {
                        return Err(EngineError::invalid_argument(
                            name,
                            format!("entry {i} must be a TCP address: a cluster announces its nodes as host:port"),
                        ));
                    }
                    if certs.is_some() {
                        need_tls(&info, name)?;
                    }
                    nodes.push(info);
                }
                let mut b = ClusterClientBuilder::new(nodes)
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(CLUSTER_RETRY_MIN_MS)
                    .max_retry_wait(CLUSTER_RETRY_MAX_MS)
                    .push_sender(move |info| {
                        push(info);
                        Ok::<(), Infallible>(())
                    });
                if let Some(certs) = certs {
                    b = b.certs(certs);
                }
                // The builder's complaints are about mismatched nodes or a bad CA.
                b.build().map_err(|e| {
                    if e.kind() == ErrorKind::InvalidClientConfig {
                        EngineError::invalid_argument(
                            name,
                            "nodes must share one user, password, database and scheme (redis:// or rediss://)",
                        )
                    } else {
                        bad_ca()
                    }
                })
                .map(Target::Cluster)
            }
        }
    }

    /// Connects. A node connects lazily, on its first command, with `node`'s
    /// settings; a cluster asks for its slot map now.
    pub async fn connect(&self, node: ConnectionManagerConfig) -> RedisResult<Link> {
        match self {
            Target::Node { client, push } => {
                let push = push.clone();
                let config = node.set_push_sender(move |info| {
                    push(info);
                    Ok::<(), Infallible>(())
                });
                ConnectionManager::new_lazy_with_config(client.clone(), config).map(Link::Node)
            }
            Target::Tls(node) => Ok(Link::Tls(node.clone())),
            Target::Cluster(client) => client.get_async_connection().await.map(Link::Cluster),
        }
    }
}

fn parse(url: &SecretString, name: &'static str, at: &str) -> Result<ConnectionInfo, EngineError> {
    let info = url.expose().into_connection_info().map_err(|_| {
        // The usual cause: a password holding a character the URL syntax
        // uses. Said without repeating any of the URL.
        let u = url.expose();
        let hint = if (u.starts_with("redis://") || u.starts_with("rediss://")) && u.contains('@') {
            "; a user name or password holding @ : / ? # or % must be URL-encoded (encodeURIComponent)"
        } else {
            ""
        };
        EngineError::invalid_argument(
            name,
            format!("{at}is not a valid Redis URL ({URL_FORMAT}){hint}"),
        )
    })?;
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(EngineError::invalid_argument(
            name,
            format!("{at}asks for #insecure (no certificate check), which this build does not do: give the server's CA certificate as redis.tls.ca"),
        ));
    }
    // RESP3: subscriptions and commands share the one connection.
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    // No Nagle: a command written while another's bytes are unacknowledged
    // (many refreshes in flight) goes out at once, not after an ACK.
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Ok(info.set_redis_settings(settings).set_tcp_settings(tcp))
}

fn need_tls(info: &ConnectionInfo, name: &'static str) -> Result<(), EngineError> {
    match info.addr() {
        ConnectionAddr::TcpTls { .. } => Ok(()),
        _ => Err(EngineError::invalid_argument(
            "options.redis.tls",
            format!("applies to TLS only: {name} must use rediss://"),
        )),
    }
}

fn bad_ca() -> EngineError {
    EngineError::invalid_argument(
        "options.redis.tls.ca",
        "could not be read as PEM certificates",
    )
}

impl Link {
    pub async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self {
            Link::Node(m) => m.clone().subscribe(channel).await,
            Link::Tls(n) => n.subscribe(channel).await,
            Link::Cluster(c) => c.clone().subscribe(channel).await,
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Node(m) => m.req_packed_command(cmd),
            Link::Tls(n) => n.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Node(m) => m.req_packed_commands(pipeline, offset, count),
            Link::Tls(n) => n.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Node(m) => m.get_db(),
            Link::Tls(n) => n.db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// What went wrong, for a message an operator can act on: a certificate, a
/// TLS handshake, credentials, a refused or closed connection, or else the
/// error's category. Never the URL, a user name or a password (the server's
/// and the crate's own words are read, not repeated).
pub fn describe(e: &RedisError) -> String {
    if let Some(tls) = rustls_error(e) {
        return match tls {
            rustls::Error::InvalidCertificate(c) => certificate(&certificate_problem(c)),
            _ => "the TLS handshake with Redis failed (is that port TLS? a plaintext port needs redis://)".to_owned(),
        };
    }
    let code = e.code();
    if e.kind() == ErrorKind::AuthenticationFailed || matches!(code, Some("WRONGPASS" | "NOAUTH")) {
        return CREDENTIALS.to_owned();
    }
    if code == Some("NOPERM") {
        return PERMISSION.to_owned();
    }
    // A cluster's first connection keeps only the text of the error behind it.
    if let Some(m) = e.detail().and_then(from_text) {
        return m;
    }
    use std::io::ErrorKind as Io;
    match io_kind(e) {
        Some(Io::ConnectionRefused) => "Redis refused the connection".to_owned(),
        Some(Io::UnexpectedEof | Io::ConnectionReset | Io::ConnectionAborted | Io::BrokenPipe) => {
            "Redis closed the connection (is that port TLS-only? it needs rediss://)".to_owned()
        }
        _ => format!("Redis call failed ({})", e.category()),
    }
}

const CREDENTIALS: &str = "Redis refused the credentials (wrong user name or password)";
const PERMISSION: &str =
    "the Redis user lacks a permission the coordination needs (see docs/redis.md for the ACL)";

fn certificate(problem: &str) -> String {
    let advice = if problem == UNKNOWN_ISSUER {
        "; a private CA, or the server's own self-signed certificate, goes in redis.tls.ca"
    } else {
        ""
    };
    format!("the Redis server's TLS certificate did not verify ({problem}){advice}")
}

const UNKNOWN_ISSUER: &str = "not issued by a trusted CA";
const CA_AS_SERVER: &str =
    "a CA certificate (CA:TRUE) presented as the server's own; give that very certificate as redis.tls.ca";

/// [`describe`] from an error's text, for errors that kept nothing else.
fn from_text(text: &str) -> Option<String> {
    if text.contains("invalid peer certificate") {
        let problem = [
            ("UnknownIssuer", UNKNOWN_ISSUER),
            ("CaUsedAsEndEntity", CA_AS_SERVER),
            ("NotValidForName", "not issued for this host name"),
            ("Expired", "expired"),
            ("NotValidYet", "not valid yet"),
            ("Revoked", "revoked"),
            ("BadSignature", "bad signature"),
        ]
        .iter()
        .find(|(k, _)| text.contains(k))
        .map_or("rejected", |(_, p)| p);
        return Some(certificate(problem));
    }
    if text.contains("WRONGPASS") || text.contains("NOAUTH") {
        return Some(CREDENTIALS.to_owned());
    }
    if text.contains("NOPERM") {
        return Some(PERMISSION.to_owned());
    }
    if text.contains("Connection refused") {
        return Some("Redis refused the connection".to_owned());
    }
    None
}

fn certificate_problem(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match c {
        C::UnknownIssuer => UNKNOWN_ISSUER.to_owned(),
        // The names a certificate holds are public (any client sees them).
        C::NotValidForNameContext { presented, .. } if presented.is_empty() => {
            "not issued for this host name: it names no host (subjectAltName), which TLS clients check".to_owned()
        }
        C::NotValidForNameContext { presented, .. } => format!(
            "not issued for this host name: it names {}",
            presented
                .iter()
                .map(|n| bare_name(n))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        C::NotValidForName => "not issued for this host name".to_owned(),
        C::Expired | C::ExpiredContext { .. } => "expired".to_owned(),
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".to_owned(),
        C::Revoked => "revoked".to_owned(),
        C::BadSignature => "bad signature".to_owned(),
        C::Other(rustls::OtherError(inner)) => {
            if let Some(p) = inner.downcast_ref::<Problem>() {
                p.to_string()
            } else if matches!(
                inner.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) {
                CA_AS_SERVER.to_owned()
            } else {
                "rejected".to_owned()
            }
        }
        _ => "rejected".to_owned(),
    }
}

/// A name as WebPKI reports it (`DnsName("redis.internal")`) as written
/// in the certificate (`redis.internal`).
fn bare_name(n: &str) -> &str {
    let inner = match (n.find('('), n.rfind(')')) {
        (Some(a), Some(b)) if a < b => &n[a + 1..b],
        _ => n,
    };
    inner.trim_matches('"')
}

/// The kind of the I/O error behind `e`, if any.
fn io_kind(e: &RedisError) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = io_inside(err) {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

fn io_inside<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return Some(io);
    }
    let shared = err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()?;
    shared.downcast_ref::<std::io::Error>()
}

/// The rustls error behind `e`, if any. It arrives inside an I/O error,
/// which the crate keeps behind an `Arc<dyn Error>`: look through both.
fn rustls_error(e: &RedisError) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = rustls_inside(err) {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

fn rustls_inside<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = err.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        // io::Error's `source` skips the error it wraps: look at it directly.
        let inner: &(dyn std::error::Error + 'static) = io.get_ref()?;
        return rustls_inside(inner);
    }
    if let Some(shared) = err.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
        let inner: &(dyn std::error::Error + 'static) = &**shared;
        return rustls_inside(inner);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn io_error(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::from(kind))
    }

    #[test]
    fn a_password_that_breaks_the_url_is_named_without_being_repeated() {
        let push: PushHandler = Arc::new(|_| {});
        for url in [
            "redis://:p@ss/w0rd@127.0.0.1:6379",
            "redis://ttm:s3cr#t@host:6379",
        ] {
            let Err(e) = Target::new(
                &Endpoint::Node(url.into()),
                None,
                Duration::from_secs(1),
                push.clone(),
            ) else {
                panic!("{url} parsed")
            };
            let m = e.to_string();
            assert!(
                m.contains("must be URL-encoded (encodeURIComponent)"),
                "{m}"
            );
            assert!(!m.contains("w0rd") && !m.contains("s3cr"), "{m}");
        }
    }

    #[test]
    fn certificate_problems_read_as_an_operator_would_say_them() {
        let names = |presented: &[&str]| {
            certificate_problem(&rustls::CertificateError::NotValidForNameContext {
                expected: rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                presented: presented.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert_eq!(
            names(&["DnsName(\"redis.internal\")", "IpAddress(10.0.0.1)"]),
            "not issued for this host name: it names redis.internal, 10.0.0.1"
        );
        assert!(names(&[]).contains("it names no host (subjectAltName)"));
        let other = |p: Problem| {
            certificate_problem(&rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(p),
            )))
        };
        assert!(other(Problem::SelfSignedNotGiven).starts_with("self-signed"));
        let ca = rustls::CertificateError::Other(rustls::OtherError(Arc::new(
            webpki::Error::CaUsedAsEndEntity,
        )));
        assert!(certificate_problem(&ca).starts_with("a CA certificate (CA:TRUE)"));
    }

    #[test]
    fn describe_names_the_problem_and_repeats_nothing() {
        let cert = RedisError::from(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(
            describe(&cert).contains("TLS certificate did not verify (not issued by a trusted CA)")
        );
        let handshake = RedisError::from(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        ));
        assert!(describe(&handshake).contains("TLS handshake"));
        assert_eq!(
            describe(&io_error(io::ErrorKind::ConnectionRefused)),
            "Redis refused the connection"
        );
        assert!(describe(&io_error(io::ErrorKind::UnexpectedEof)).contains("closed the connection"));
        // What a cluster's first connection reports: only the text survives.
        let text = |detail: &str| {
            describe(&RedisError::from((
                ErrorKind::Io,
                "Failed to create initial connections",
                detail.to_owned(),
            )))
        };
        for (detail, says) in [
            (
                "WRONGPASS invalid username-password pair (hunter2)",
                CREDENTIALS,
            ),
            ("NOPERM this user has no permissions (hunter2)", PERMISSION),
            (
                "invalid peer certificate: NotValidForName (hunter2)",
                "not issued for this host name",
            ),
            (
                "Connection refused (os error 111) hunter2",
                "Redis refused the connection",
            ),
            ("something else hunter2", "Redis call failed (I/O error)"),
        ] {
            let d = text(detail);
            assert!(d.contains(says) && !d.contains("hunter2"), "{d}");
        }
    }
}
