//! Broker and backend URLs read as text, with no I/O and nothing above them imported: which
//! transport a URL names, whether it asks for TLS or is a Sentinel list, a failover list split
//! into whole URLs, and a URL fit for a log (its password masked). The settings check them and
//! the transports use them, so they live below both.

use crate::error::{Error, Result};

/// Which transport a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// `amqp://`, `amqps://`, `pyamqp://`.
    Amqp,
    /// `redis://`, `rediss://`, `sentinel://` (a list of Redis sentinels).
    Redis,
}

impl BrokerKind {
    /// The transport for `url`, or an error naming the (redacted) URL.
    pub fn of(url: &str) -> Result<Self> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        match scheme {
            "amqp" | "amqps" | "pyamqp" => Ok(Self::Amqp),
            "redis" | "rediss" | "sentinel" => Ok(Self::Redis),
            _ => Err(Error::UnsupportedUrl(redact_url(url))),
        }
    }
}

/// Whether `url` asks for TLS (`amqps://`, `rediss://`).
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("amqps://") || url.starts_with("rediss://")
}

/// Whether `url` is a list of sentinels.
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("sentinel://")
}

/// The port a sentinel listens on when its URL names none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// What a `sentinel://` list says, read without asking anyone: the sentinels, the master's
/// name (from the transport options) and how to log in to the master (the first URL's
/// database and credentials, as kombu and Celery read them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelList {
    /// `(host, port)` of every sentinel, in the list's order.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels know the master by (`master_name`).
    pub master_name: String,
    /// The master's database number.
    pub db: i64,
    /// The master's user name, percent-decoded.
    pub username: Option<String>,
    /// The master's password, percent-decoded.
    pub password: Option<String>,
}

impl SentinelList {
    /// Reads the sentinel list `url`; `setting` names where it came from in errors.
    pub fn parse(url: &str, setting: &str, master_name: Option<&str>) -> Result<Self> {
        let invalid = |why: String| Error::Config(format!("{setting} {}: {why}", redact_url(url)));
        let master_name = master_name.filter(|name| !name.is_empty()).ok_or_else(|| {
            Error::Config(format!(
                "{setting} is a sentinel:// URL but its transport options have no master_name \
                 (the name the sentinels know the Redis master by)"
            ))
        })?;
        let mut list = Self {
            sentinels: Vec::new(),
            master_name: master_name.to_string(),
            db: 0,
            username: None,
            password: None,
        };
        for (index, chunk) in url.split(';').map(str::trim).enumerate() {
            let parsed = url::Url::parse(chunk).map_err(|e| invalid(format!("{chunk:?}: {e}")))?;
            if parsed.scheme() != "sentinel" {
                return Err(invalid(format!(
                    "every URL of the list must be sentinel://, not {}://",
                    parsed.scheme()
                )));
            }
            if parsed.query().is_some() {
                return Err(invalid(
                    "sentinel URLs take no query parameters; TLS to the master is set by \
                     broker_use_ssl / redis_backend_use_ssl"
                        .into(),
                ));
            }
            let host = match parsed.host() {
                Some(url::Host::Domain(name)) if !name.is_empty() => name.to_string(),
                Some(url::Host::Ipv4(address)) => address.to_string(),
                Some(url::Host::Ipv6(address)) => address.to_string(),
                _ => return Err(invalid(format!("{chunk:?} names no host"))),
            };
            list.sentinels
                .push((host, parsed.port().unwrap_or(DEFAULT_SENTINEL_PORT)));
            if index == 0 {
                list.db = match parsed.path().trim_matches('/') {
                    "" => 0,
                    db => db
                        .parse()
                        .map_err(|_| invalid(format!("database {db:?} is not a number")))?,
                };
                list.username = Some(decoded(parsed.username())).filter(|u| !u.is_empty());
                list.password = parsed.password().map(decoded);
            }
        }
        Ok(list)
    }
}

fn decoded(part: &str) -> String {
    percent_encoding::percent_decode_str(part)
        .decode_utf8_lossy()
        .into_owned()
}

/// The URLs of `list`, each whole (hosts completed from the first URL); empty entries are
/// skipped. A Sentinel list is one URL: its sentinels are tried by the Redis transport, which
/// asks them for the one master.
pub fn failover_urls(list: &str) -> Vec<String> {
    if is_sentinel_url(list) {
        return vec![list.trim().to_string()];
    }
    let mut entries = list.split(';').map(str::trim).filter(|e| !e.is_empty());
    let Some(first) = entries.next() else {
        return Vec::new();
    };
    let mut urls = vec![first.to_string()];
    urls.extend(entries.map(|entry| {
        if entry.contains("://") {
            entry.to_string()
        } else {
            with_host(first, entry)
        }
    }));
    urls
}

/// `template` with its host (and port, when `host` has one) replaced by `host`. Left as the
/// bare entry when `template` cannot take it, so that the connect names what is wrong.
fn with_host(template: &str, host: &str) -> String {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => match port.parse::<u16>() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        None => (host, None),
    };
    let Ok(mut url) = url::Url::parse(template) else {
        return host.to_string();
    };
    if url.set_host(Some(name)).is_err() {
        return host.to_string();
    }
    if port.is_some() && url.set_port(port).is_err() {
        return host.to_string();
    }
    url.to_string()
}

/// What [`redact_url`] shows for a URL it cannot read.
pub const UNREADABLE_URL: &str = "<unparseable URL>";

/// `scheme://user:secret@host` → `scheme://user:********@host`, each URL of a `;`-separated
/// failover list alike; URLs without a password unchanged. Fails closed: what does not parse
/// as a URL is shown as [`UNREADABLE_URL`] (it may be a DSN with a password in another form),
/// unless it is a failover list's bare `host[:port]`, which has no room for one.
pub fn redact_url(url: &str) -> String {
    url.split(';')
        .map(|one| match url::Url::parse(one.trim()) {
            Ok(mut parsed) if parsed.password().is_some() => {
                if parsed.set_password(Some("********")).is_err() {
                    return UNREADABLE_URL.to_string();
                }
                parsed.to_string()
            }
            Ok(_) => one.to_string(),
            Err(_) if is_bare_host(one.trim()) => one.to_string(),
            Err(_) => UNREADABLE_URL.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// `host`, `host:port`, `[v6]:port`: nothing but a host's and a port's characters.
fn is_bare_host(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_redact_url_cannot_parse_is_never_shown_as_given() {
        for dsn in [
            "host=db user=app password=s3cret",
            "postgres://app:s3cret@db:notaport/rcelery",
            "amqp://app:s3cret@[::1/vhost",
            "",
        ] {
            assert_eq!(redact_url(dsn), UNREADABLE_URL, "{dsn}");
        }
        assert_eq!(
            redact_url("amqp://app:s3cret@a:5672//;b:5673;odd stuff s3cret"),
            format!("amqp://app:********@a:5672//;b:5673;{UNREADABLE_URL}")
        );
    }

    #[test]
    fn the_list_splits_at_semicolons_and_bare_hosts_take_the_first_urls_rest() {
        assert_eq!(
            failover_urls("amqp://guest:pw@127.0.0.1:5701//; amqp://u:p@h2:5702/v;;h3:5703;h4"),
            [
                "amqp://guest:pw@127.0.0.1:5701//",
                "amqp://u:p@h2:5702/v",
                "amqp://guest:pw@h3:5703//",
                "amqp://guest:pw@h4:5701//",
            ]
        );
        assert_eq!(
            failover_urls("redis://127.0.0.1:6379/0"),
            ["redis://127.0.0.1:6379/0"]
        );
        assert!(failover_urls(" ; ").is_empty());
    }

    #[test]
    fn a_sentinel_list_is_one_url_whose_sentinels_find_one_master() {
        let list = "sentinel://:pw@127.0.0.1:26379/2;sentinel://127.0.0.1:26380/2";
        assert_eq!(failover_urls(list), [list]);
    }
}
