//! `amqps://` and `rediss://` against TLS listeners of the test's own, with a throwaway CA:
//! a TLS-terminating proxy in front of the local RabbitMQ (which is shared, so never
//! reconfigured), and a `redis-server` of its own listening with TLS only. Each listener is
//! gone when its test ends, passed or failed.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{unique_queue, within};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use runtime::backend::RedisBackend;
use runtime::broker::{self, Broker};
use runtime::config::{CeleryConfig, CertReqs, SslOptions, TransportOptions};
use runtime::protocol::result::{state, ResultMeta};
use runtime::protocol::TaskRequest;
use serde_json::{json, Map};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// A CA, and a server certificate it signed for `localhost` and `127.0.0.1`, as PEM files.
struct Pki {
    dir: TempDir,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own, so that another test CA is another issuer, not a forger of this one.
        let name = format!("rcelery test CA {}", uuid::Uuid::new_v4().simple());
        ca.distinguished_name.push(DnType::CommonName, name);
        let ca = ca.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server.signed_by(&server_key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Self {
            dir,
            server_chain: vec![server.der().clone()],
            server_key: server_key.serialize_der(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `broker_use_ssl` / `redis_backend_use_ssl` trusting this CA.
    fn trusting(&self) -> SslOptions {
        SslOptions {
            ca_certs: Some(self.path("ca.pem")),
            ..SslOptions::default()
        }
    }
}

/// TLS on a free port, in front of the local RabbitMQ; stops when dropped.
struct AmqpsProxy {
    port: u16,
    accepting: tokio::task::JoinHandle<()>,
}

impl AmqpsProxy {
    async fn start(pki: &Pki) -> Self {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone()));
        let config = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.server_chain.clone(), key)
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = rabbitmq_address();
        let accepting = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    // A refused handshake (the wrong-CA tests) just ends this connection.
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Self { port, accepting }
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}//", self.port)
    }
}

impl Drop for AmqpsProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every proxied connection.
        self.accepting.abort();
    }
}

/// Host and port of the local RabbitMQ the proxy forwards to (from `TEST_AMQP_URL`).
fn rabbitmq_address() -> SocketAddr {
    let url = url::Url::parse(&common::amqp_url()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    SocketAddr::new(host.parse().unwrap(), url.port().unwrap_or(5672))
}

/// A `redis-server` of the test's own, TLS only, in a temporary directory; killed when dropped.
struct RedisTls {
    port: u16,
    server: Child,
}

impl RedisTls {
    /// `None` (the test then skips, saying why) when `redis-server` is not installed.
    fn start(pki: &Pki) -> Option<Self> {
        let port = free_port();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(pki.path("server.pem"))
            .arg("--tls-key-file")
            .arg(pki.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(pki.path("ca.pem"))
            .arg("--dir")
            .arg(pki.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server = match command.spawn() {
            Ok(server) => server,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "SKIPPED: redis-server is not installed (apt-get install redis-server, or \
                     `make services`), so there is no TLS Redis to test rediss:// against"
                );
                return None;
            }
            Err(error) => panic!("cannot start redis-server: {error}"),
        };
        let mut redis = Self { port, server };
        redis.wait_listening();
        Some(redis)
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdTcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(status) = self.server.try_wait().unwrap() {
                panic!("redis-server --tls-port exited with {status}: is it built with TLS?");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, db: u8) -> String {
        format!("rediss://127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for RedisTls {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn round_trip(broker: &dyn Broker) {
    let queue = unique_queue("tls");
    let sent = TaskRequest::new("tasks.add", vec![json!(2), json!(3)], Map::new());
    broker.publish(&queue, &sent.encode()).await.unwrap();
    let mut deliveries = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let delivery = within(10, "the message back over TLS", deliveries.recv())
        .await
        .expect("consumer stopped");
    let received = TaskRequest::decode(&delivery.message.unwrap()).unwrap();
    assert_eq!((&received.id, &received.args), (&sent.id, &sent.args));
    delivery.settle.ack().await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

async fn store_and_read(backend: &RedisBackend) {
    let id = uuid::Uuid::new_v4().to_string();
    let meta = ResultMeta::new(&id, state::SUCCESS, json!(5), Utc::now());
    assert!(backend.store(&meta).await.unwrap());
    assert_eq!(backend.get(&id).await.unwrap(), Some(meta));
}

/// Checks that a connect failed, and for the certificate.
fn refused<T>(what: &str, result: runtime::error::Result<T>) {
    let Err(error) = result else {
        panic!("{what}: connected though the server's certificate is not trusted");
    };
    let message = error.to_string();
    assert!(
        message.contains("invalid peer certificate: UnknownIssuer"),
        "{what}: refused, but not for the certificate: {message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn amqps_publishes_and_consumes_through_a_tls_listener() {
    let pki = Pki::new();
    let proxy = AmqpsProxy::start(&pki).await;
    let config = CeleryConfig::from_sources(
        &format!(
            "broker_url = \"{}\"\nbroker_use_ssl = {{ ca_certs = \"{}\" }}",
            proxy.url(),
            pki.path("ca.pem").display()
        ),
        Vec::new(),
    )
    .unwrap();
    let broker = broker::connect_with(
        &config.broker_url,
        &config.broker_transport_options,
        config.broker_use_ssl.as_ref(),
    )
    .await
    .unwrap();
    round_trip(broker.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_broker_and_backend_work_through_a_tls_redis() {
    let pki = Pki::new();
    let Some(redis) = RedisTls::start(&pki) else {
        return;
    };
    let broker = broker::connect_with(
        &redis.url(0),
        &TransportOptions::default(),
        Some(&pki.trusting()),
    )
    .await
    .unwrap();
    round_trip(broker.as_ref()).await;

    // Celery's URL form for the backend: the settings ride on the URL's query.
    let url = format!(
        "{}?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={}",
        redis.url(1),
        pki.path("ca.pem").display()
    );
    let backend = RedisBackend::connect(&url, 600, None).await.unwrap();
    store_and_read(&backend).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_signed_by_an_untrusted_ca_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let proxy = AmqpsProxy::start(&pki).await;
    for (what, ssl) in [
        ("another CA", Some(other.trusting())),
        ("system roots only", None),
    ] {
        let result =
            broker::connect_with(&proxy.url(), &TransportOptions::default(), ssl.as_ref()).await;
        refused(&format!("amqps, {what}"), result);
    }
    let Some(redis) = RedisTls::start(&pki) else {
        return;
    };
    for (what, ssl) in [
        ("another CA", Some(other.trusting())),
        ("system roots only", None),
    ] {
        let result =
            broker::connect_with(&redis.url(0), &TransportOptions::default(), ssl.as_ref()).await;
        refused(&format!("rediss broker, {what}"), result);
        let url = redis.url(1);
        let connect = RedisBackend::connect(&url, 600, ssl.as_ref());
        let result = within(10, "the backend's refusal", connect).await;
        refused(&format!("rediss backend, {what}"), result);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cert_none_connects_without_verifying() {
    let pki = Pki::new();
    let unverified = SslOptions {
        cert_reqs: CertReqs::None,
        ..SslOptions::default()
    };
    let proxy = AmqpsProxy::start(&pki).await;
    let broker = broker::connect_with(
        &proxy.url(),
        &TransportOptions::default(),
        Some(&unverified),
    )
    .await
    .unwrap();
    round_trip(broker.as_ref()).await;
    let Some(redis) = RedisTls::start(&pki) else {
        return;
    };
    let backend = RedisBackend::connect(&format!("{}?ssl_cert_reqs=none", redis.url(1)), 600, None)
        .await
        .unwrap();
    store_and_read(&backend).await;
}
