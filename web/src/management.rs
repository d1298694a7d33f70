//! RabbitMQ's management API (`broker_api`), for what AMQP itself does not tell about a queue:
//! how many messages are delivered and not yet acknowledged, and the rates at which messages
//! are published to it and acknowledged. RabbitMQ samples these every few seconds, so they lag
//! the queue by as much.

use std::time::Duration;

use runtime::broker::QueueDepth;
use serde::Deserialize;
use url::Url;

use crate::error::Error;

/// How long one call may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A queue as the management API reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    pub depth: QueueDepth,
    /// Messages published to the queue per second, recently.
    pub published_per_second: f64,
    /// Messages acknowledged per second, recently.
    pub acked_per_second: f64,
}

/// The API of one RabbitMQ, for the virtual host of the broker URL.
pub struct ManagementApi {
    http: reqwest::Client,
    /// The API's address, without the credentials (sent as a header instead).
    base: Url,
    credentials: Option<(String, Option<String>)>,
    vhost: String,
}

#[derive(Deserialize)]
struct Queue {
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
    consumers: Option<u64>,
    #[serde(default)]
    message_stats: MessageStats,
}

#[derive(Deserialize, Default)]
struct MessageStats {
    publish_details: Option<Rate>,
    ack_details: Option<Rate>,
}

#[derive(Deserialize)]
struct Rate {
    rate: f64,
}

impl ManagementApi {
    /// The API at `broker_api` (credentials in the URL), for the virtual host `broker_url` names
    /// (`amqp://host//` and `amqp://host/` are `/`, as in kombu).
    pub fn new(broker_api: &str, broker_url: &str) -> Result<Self, Error> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            Error::Runtime(runtime::Error::Config(format!("{what}: {e}")))
        };
        let mut base = Url::parse(broker_api).map_err(|e| invalid("broker_api", &e))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let credentials = (!base.username().is_empty()).then(|| {
            (
                base.username().to_string(),
                base.password().map(str::to_owned),
            )
        });
        // Credentials both in the URL and in a header would be two Authorization headers,
        // which RabbitMQ refuses.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        // Every node of a failover list serves the same virtual host: the first URL names it.
        let first = runtime::urls::failover_urls(broker_url)
            .into_iter()
            .next()
            .unwrap_or_default();
        let broker = Url::parse(&first).map_err(|e| invalid("broker_url", &e))?;
        // The URL's path is the virtual host, percent-encoded (`/my%2Fvhost` is `my/vhost`).
        let vhost = match broker.path() {
            "" | "/" | "//" => "/".to_string(),
            path => percent_encoding::percent_decode_str(path.trim_start_matches('/'))
                .decode_utf8_lossy()
                .into_owned(),
        };
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| invalid("broker_api client", &e))?;
        Ok(Self {
            http,
            base,
            credentials,
            vhost,
        })
    }

    /// `queue`'s counts and rates; `None` when the virtual host has no such queue.
    pub async fn queue(&self, queue: &str) -> Result<Option<QueueStats>, Error> {
        let unavailable =
            |e: &dyn std::fmt::Display| Error::BrokerUnavailable(format!("management API: {e}"));
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| unavailable(&"broker_api cannot be a base URL"))?
            .pop_if_empty()
            .extend(["queues", &self.vhost, queue]);
        let mut request = self.http.get(url);
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, password.as_deref());
        }
        let response = request.send().await.map_err(|e| unavailable(&e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let found: Queue = response
            .error_for_status()
            .map_err(|e| unavailable(&e))?
            .json()
            .await
            .map_err(|e| unavailable(&e))?;
        let rate = |details: Option<Rate>| details.map_or(0.0, |d| d.rate);
        Ok(Some(QueueStats {
            depth: QueueDepth {
                ready: found.messages_ready.unwrap_or(0),
                unacked: Some(found.messages_unacknowledged.unwrap_or(0)),
                consumers: Some(found.consumers.unwrap_or(0)),
            },
            published_per_second: rate(found.message_stats.publish_details),
            acked_per_second: rate(found.message_stats.ack_details),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_virtual_host_comes_from_the_broker_url() {
        for (broker_url, vhost) in [
            ("amqp://guest:guest@127.0.0.1:5672//", "/"),
            ("amqp://127.0.0.1:5672/", "/"),
            ("amqp://127.0.0.1", "/"),
            ("amqps://u:p@rabbit:5671/prod", "prod"),
            ("amqp://rabbit/team%2Fone", "team/one"),
            ("amqp://u:p@r1:5672/prod;amqp://u:p@r2:5672/prod", "prod"),
        ] {
            let api =
                ManagementApi::new("http://guest:guest@127.0.0.1:15672/api", broker_url).unwrap();
            assert_eq!(api.vhost, vhost, "{broker_url}");
            assert_eq!(api.base.as_str(), "http://127.0.0.1:15672/api/");
            assert_eq!(
                api.credentials,
                Some(("guest".to_string(), Some("guest".to_string())))
            );
        }
        assert!(ManagementApi::new("not a url", "amqp://h//").is_err());
    }
}
