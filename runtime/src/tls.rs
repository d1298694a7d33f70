//! TLS for `amqps://` brokers and `rediss://` brokers and result backends, over rustls.
//!
//! What to trust comes from Celery's settings (`broker_use_ssl`, `redis_backend_use_ssl`) and,
//! as Celery's Redis backend reads them, from the URL's `ssl_*` query parameters, which win over
//! the settings. The system's roots are always trusted, plus the `ca_certs` file when given, so
//! a private CA can be added without losing the public ones. `CERT_NONE` turns verification off
//! and says so loudly on every connect.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::SslOptions;
use crate::error::{Error, Result};
use crate::urls::{is_tls_url, redact_url};

/// The URL query parameters of Celery's `rediss://` URLs, each one key of `SslOptions`.
const QUERY_KEYS: [&str; 4] = [
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
];

/// `url` without its `ssl_*` parameters, and the TLS settings: `settings` overridden by those
/// parameters. A URL without any is returned as it is.
pub(crate) fn split_url(url: &str, settings: Option<&SslOptions>) -> Result<(String, SslOptions)> {
    let mut options = settings.cloned().unwrap_or_default();
    let Ok(mut parsed) = url::Url::parse(url) else {
        return Ok((url.to_string(), options));
    };
    let (ours, kept): (Vec<_>, Vec<_>) = parsed
        .query_pairs()
        .into_owned()
        .partition(|(key, _)| QUERY_KEYS.contains(&key.as_str()));
    if ours.is_empty() {
        return Ok((url.to_string(), options));
    }
    for (key, value) in ours {
        match key.as_str() {
            "ssl_cert_reqs" => {
                options.cert_reqs = serde_json::from_value(value.clone().into()).map_err(|_| {
                    Error::Config(format!(
                        "ssl_cert_reqs={value} in {}: expected CERT_REQUIRED, CERT_OPTIONAL or CERT_NONE",
                        redact_url(url)
                    ))
                })?;
            }
            "ssl_ca_certs" => options.ca_certs = Some(PathBuf::from(value)),
            "ssl_certfile" => options.certfile = Some(PathBuf::from(value)),
            _ => options.keyfile = Some(PathBuf::from(value)),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok((parsed.to_string(), options))
}

/// Says, on every connect, that `url`'s server is not verified.
fn warn_unverified(url: &str) {
    tracing::warn!(
        url = %redact_url(url),
        "TLS certificate verification is OFF (cert_reqs = CERT_NONE): anyone on the network \
         path can read and change this traffic; use it for tests only"
    );
}

/// Whether the failed connect `error` will fail again however often it is retried: not the
/// server being unreachable (refused, timed out, dropped) but, say, a refused certificate.
pub(crate) fn lasting(error: &redis::RedisError) -> bool {
    !(error.is_connection_refusal() || error.is_timeout() || error.is_connection_dropped())
}

/// The rustls client configuration `options` describe, for lapin.
pub(crate) fn client_config(url: &str, options: &SslOptions) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = if options.verifies() {
        builder.with_root_certificates(roots(options.ca_certs.as_deref())?)
    } else {
        warn_unverified(url);
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
    };
    match identity(options)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Tls(format!("certfile/keyfile: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A Redis client for `url`: over TLS, as `settings` and the URL's `ssl_*` parameters say, when
/// it is `rediss://`.
pub(crate) fn redis_open(url: &str, settings: Option<&SslOptions>) -> Result<redis::Client> {
    if !is_tls_url(url) {
        return Ok(redis::Client::open(url)?);
    }
    let (url, options) = split_url(url, settings)?;
    use redis::IntoConnectionInfo as _;
    redis_client(url.as_str().into_connection_info()?, &options)
}

/// A Redis client for the TLS server `info` (a `rediss://` URL's, or a master a sentinel
/// named) with `options`.
pub(crate) fn redis_client(
    mut info: redis::ConnectionInfo,
    options: &SslOptions,
) -> Result<redis::Client> {
    if !options.verifies() {
        warn_unverified(&format!("rediss://{}", info.addr));
        if let redis::ConnectionAddr::TcpTls { insecure, .. } = &mut info.addr {
            *insecure = true;
        }
    }
    // Given a root file, redis trusts it alone, as the AMQP side ([`roots`]) does.
    let root_cert = match &options.ca_certs {
        Some(path) => {
            let pem = read(path, "ca_certs")?;
            ca_certificates(path, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&options.certfile, &options.keyfile) {
        (Some(certfile), Some(keyfile)) => Some(redis::ClientTlsConfig {
            client_cert: read(certfile, "certfile")?,
            client_key: read(keyfile, "keyfile")?,
        }),
        _ => None,
    };
    Ok(redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )?)
}

/// The certificates of `ca_certs` alone when it is given (a private broker's CA: a certificate
/// any public CA signed is not the broker's, as py-amqp trusts it), else the system's roots.
/// The Redis side is given the same file alone ([`redis_client`]), so one `ca_certs` means one
/// thing on both brokers.
fn roots(ca_certs: Option<&Path>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    if ca_certs.is_none() {
        // Unparsable system certificates are skipped, as every TLS client does.
        let _ = store.add_parsable_certificates(native_roots());
    }
    if let Some(path) = ca_certs {
        let pem = read(path, "ca_certs")?;
        for cert in ca_certificates(path, &pem)? {
            store
                .add(cert)
                .map_err(|e| Error::Tls(format!("ca_certs {}: {e}", path.display())))?;
        }
    }
    Ok(store)
}

/// The system's trusted roots; none (with a warning) when they cannot be read, so that every
/// certificate is then refused with a reason rather than the start failing.
fn native_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot read the system's TLS roots; set ca_certs to trust a CA");
        Vec::new()
    })
}

/// The certificates of the PEM file `path` holds (`pem`); at least one.
fn ca_certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("ca_certs {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "ca_certs {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The client certificate chain and key, when `certfile` and `keyfile` are set.
fn identity(
    options: &SslOptions,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
    let (Some(certfile), Some(keyfile)) = (&options.certfile, &options.keyfile) else {
        return Ok(None);
    };
    let chain = rustls_pemfile::certs(&mut BufReader::new(&read(certfile, "certfile")?[..]))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("certfile {}: {e}", certfile.display())))?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(&read(keyfile, "keyfile")?[..]))
        .map_err(|e| Error::Tls(format!("keyfile {}: {e}", keyfile.display())))?
        .ok_or_else(|| {
            Error::Tls(format!(
                "keyfile {} holds no private key",
                keyfile.display()
            ))
        })?;
    Ok(Some((chain, key)))
}

fn read(path: &Path, setting: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Tls(format!("cannot read {setting} {}: {e}", path.display())))
}

/// `CERT_NONE`: any certificate is accepted, though the handshake's signatures are still
/// checked against it (so the session is at least with whoever holds that certificate's key).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CertReqs;

    #[test]
    fn query_parameters_override_the_settings_and_leave_the_url() {
        let settings = SslOptions {
            ca_certs: Some("/etc/ca.pem".into()),
            ..SslOptions::default()
        };
        let (url, options) = split_url(
            "rediss://:pw@127.0.0.1:6380/2?ssl_cert_reqs=CERT_NONE&protocol=resp3&ssl_ca_certs=%2Ftmp%2Fca.pem",
            Some(&settings),
        )
        .unwrap();
        assert_eq!(url, "rediss://:pw@127.0.0.1:6380/2?protocol=resp3");
        assert_eq!(options.cert_reqs, CertReqs::None);
        assert_eq!(options.ca_certs.as_deref(), Some(Path::new("/tmp/ca.pem")));

        let (url, options) =
            split_url("rediss://127.0.0.1:6380/0?ssl_cert_reqs=required", None).unwrap();
        assert_eq!(url, "rediss://127.0.0.1:6380/0");
        assert_eq!(options.cert_reqs, CertReqs::Required);

        let plain = "amqps://guest:guest@127.0.0.1:5671//";
        assert_eq!(
            split_url(plain, Some(&settings)).unwrap(),
            (plain.to_string(), settings)
        );

        let err = split_url("rediss://h/0?ssl_cert_reqs=maybe", None).unwrap_err();
        assert!(err.to_string().contains("ssl_cert_reqs=maybe"), "{err}");
    }

    #[test]
    fn unreadable_or_empty_ca_files_are_named() {
        let missing = SslOptions {
            ca_certs: Some("/nonexistent/ca.pem".into()),
            ..SslOptions::default()
        };
        let err = client_config("amqps://h//", &missing).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read ca_certs /nonexistent/ca.pem"),
            "{err}"
        );
        let err = redis_open("rediss://h/0", Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");

        let empty = std::env::temp_dir().join(format!("rcelery-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let options = SslOptions {
            ca_certs: Some(empty.clone()),
            ..SslOptions::default()
        };
        let err = client_config("amqps://h//", &options).unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn a_given_ca_certs_is_trusted_alone() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let path = std::env::temp_dir().join(format!("rcelery-ca-{}.pem", std::process::id()));
        std::fs::write(&path, ca.pem()).unwrap();
        let with_ca = roots(Some(&path));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            with_ca.unwrap().len(),
            1,
            "the CA file's one certificate, no system root"
        );
    }
}
