//! Who the node is: its name, with Celery's placeholders expanded, and the rusty-celery app
//! handle its tasks are given.

use std::sync::Arc;

use celery::Celery;

use crate::config::CeleryConfig;
use crate::error::{Error, Result};
use crate::urls::{is_sentinel_url, is_tls_url, BrokerKind};

/// Expands Celery's node-name placeholders: `%h` host name, `%n` its first label, `%d` the rest.
pub fn expand_hostname(template: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let (name, domain) = host.split_once('.').unwrap_or((&host, ""));
    template
        .replace("%h", &host)
        .replace("%n", name)
        .replace("%d", domain)
}

/// Builds the rusty-celery app handle that its `Request::new` requires. It is never used to send
/// or receive: we point it at a Redis URL when there is one, since the crate's Redis transport
/// connects but declares nothing, whereas its AMQP transport declares the default queue. The
/// crate speaks neither `amqps://` nor `rediss://` nor failover lists (whose first node may be
/// the one down) nor Sentinel lists, so without a plain URL it is given a local placeholder
/// instead (see [`placeholder_redis`]).
pub async fn app_handle(config: &CeleryConfig) -> Result<Arc<Celery>> {
    let plain: Vec<&String> = [Some(&config.broker_url), config.result_backend.as_ref()]
        .into_iter()
        .flatten()
        .filter(|url| !is_tls_url(url) && !url.contains(';') && !is_sentinel_url(url))
        .collect();
    let url = match plain
        .iter()
        .find(|url| BrokerKind::of(url).ok() == Some(BrokerKind::Redis))
        .or(plain.first())
    {
        Some(url) => url.to_string(),
        None => placeholder_redis().await?,
    };
    let app = celery::CeleryBuilder::new("rcelery", &url)
        .default_queue(&config.task_default_queue)
        .build()
        .await
        .map_err(|e| Error::Config(format!("cannot build the task app handle: {e}")))?;
    Ok(Arc::new(app))
}

/// A `redis://` URL of a local listener that accepts connections and holds them, never
/// answering: enough for the crate's Redis transport, which sends nothing when it connects to
/// database 0 without a password, and is never asked for anything after.
/// One per process: a worker made again after a lost connection reuses it.
async fn placeholder_redis() -> Result<String> {
    static PLACEHOLDER: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    PLACEHOLDER
        .get_or_try_init(|| async {
            let failed =
                |e: std::io::Error| Error::Config(format!("cannot build the task app handle: {e}"));
            let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                .await
                .map_err(failed)?;
            let port = listener.local_addr().map_err(failed)?.port();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    // Held until the handle hangs up, then closed.
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                    });
                }
            });
            Ok(format!("redis://127.0.0.1:{port}/0"))
        })
        .await
        .cloned()
}
