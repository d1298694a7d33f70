//! Redis Sentinel: `sentinel://host:port;sentinel://host:port;...` URLs, read as kombu's
//! sentinel transport and Celery's `SentinelBackend` read them, and the connection that
//! follows the master they name.
//!
//! The first URL of the list carries what the Redis master needs (database number, username,
//! password); every URL names one sentinel. Sentinels are asked in order for the address of
//! `master_name`, and the address is taken only once the server there says it is a master: right
//! after a failover a sentinel may still name the old one. A connection then also listens for the
//! sentinels' `+switch-master` announcement and leaves the old master as soon as it is made,
//! because a master demoted by `SENTINEL FAILOVER` goes on taking writes, which it later drops,
//! for up to 10 s. The connections to the master are over TLS when the broker's or backend's TLS
//! settings are given, as kombu and Celery do it; the sentinels themselves are always reached in
//! plain TCP, with `sentinel_kwargs`' credentials.
//!
//! The `redis` crate's own `sentinel` module is not used: it builds master clients with
//! `Client::open`, so a private CA or a client certificate (`ca_certs`, `certfile`) could not
//! reach the master's TLS connection, and it checks the master's role over a connection built
//! the same way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, RedisError,
    RedisFuture, RedisResult, Value,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{SentinelKwargs, SslOptions};
use crate::error::{Error, Result};
use crate::urls::{is_sentinel_url, SentinelList};

/// How long one sentinel, or the master it names, may take to connect and answer: a dead
/// sentinel must not hold up asking the next one.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two looks at the sentinels when they cannot be heard or name a master that
/// is not one yet.
const RECHECK: Duration = Duration::from_millis(500);

/// Where a master is found: the sentinels, its name, and how to log in to it.
#[derive(Clone)]
pub struct Sentinel {
    /// `(host, port)` of every sentinel, in the URL's order.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels know the master by (`master_name`).
    pub master_name: String,
    /// Database number, username and password for the master (the first URL's).
    node: redis::RedisConnectionInfo,
    /// Username and password for the sentinels (`sentinel_kwargs`).
    auth: redis::RedisConnectionInfo,
    /// TLS to the master, when set.
    ssl: Option<SslOptions>,
}

impl Sentinel {
    /// Reads the sentinel list `url`; `setting` names where it came from in errors.
    pub fn parse(
        url: &str,
        setting: &str,
        master_name: Option<&str>,
        kwargs: Option<&SentinelKwargs>,
        ssl: Option<&SslOptions>,
    ) -> Result<Self> {
        let list = SentinelList::parse(url, setting, master_name)?;
        let kwargs = kwargs.cloned().unwrap_or_default();
        Ok(Self {
            sentinels: list.sentinels,
            master_name: list.master_name,
            node: redis::RedisConnectionInfo {
                db: list.db,
                username: list.username,
                password: list.password,
                ..Default::default()
            },
            auth: redis::RedisConnectionInfo {
                username: kwargs.username,
                password: kwargs.password,
                ..Default::default()
            },
            ssl: ssl.cloned(),
        })
    }

    /// The database number of the master's connections.
    pub fn db(&self) -> i64 {
        self.node.db
    }

    /// A client of the current master, asking each sentinel in turn until one names a server
    /// that answers as master.
    pub async fn master(&self) -> Result<redis::Client> {
        let mut reasons = Vec::new();
        for (host, port) in &self.sentinels {
            match self.ask(host, *port).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(reason)) => reasons.push(format!("sentinel {host}:{port} {reason}")),
                Err(error) => reasons.push(format!("sentinel {host}:{port}: {error}")),
            }
        }
        Err(Error::NoMaster {
            name: self.master_name.clone(),
            reasons: reasons.join("; "),
        })
    }

    /// A client of the sentinel at `host:port`.
    fn sentinel_client(&self, host: &str, port: u16) -> RedisResult<redis::Client> {
        redis::Client::open(ConnectionInfo {
            addr: ConnectionAddr::Tcp(host.to_string(), port),
            redis: self.auth.clone(),
        })
    }

    /// Returns once the sentinels name a master other than `from`: at once if they do already,
    /// else when one announces the move (`+switch-master`). Without this a client kept on a
    /// master that a `SENTINEL FAILOVER` demoted goes on writing to it (nothing cuts its
    /// connection) until the sentinels turn it into a replica, up to 10 s later, and that
    /// replica then drops everything written to it since the failover.
    pub async fn moved_from(&self, from: &ConnectionAddr) {
        let from = match from {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                (host.clone(), *port)
            }
            ConnectionAddr::Unix(_) => return std::future::pending().await,
        };
        loop {
            for (host, port) in &self.sentinels {
                if let Ok(Some(named)) = self.announced(host, *port, &from).await {
                    tracing::warn!(
                        master = %self.master_name,
                        from = %format!("{}:{}", from.0, from.1),
                        to = %format!("{}:{}", named.0, named.1),
                        "the sentinels moved the Redis master"
                    );
                    return;
                }
            }
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// Listens to the sentinel at `host:port` until it names a master other than `from`
    /// (`Ok(Some(that master))`); `Ok(None)` when the sentinel went away.
    async fn announced(
        &self,
        host: &str,
        port: u16,
        from: &(String, u16),
    ) -> RedisResult<Option<(String, u16)>> {
        let client = self.sentinel_client(host, port)?;
        let mut pubsub = tokio::time::timeout(ASK_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| RedisError::from((ErrorKind::IoError, "sentinel did not answer")))??;
        pubsub.subscribe("+switch-master").await?;
        // A move between finding the master and subscribing is not announced again.
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master_name)
            .query_async(&mut quick_connection(&client).await?)
            .await?;
        // A sentinel that has not heard of a move yet may name a master that is gone: only one
        // that answers as a master counts.
        if let Some(named) = named.filter(|named| named != from) {
            if self
                .role_of(&named.0, named.1)
                .await
                .is_ok_and(|role| role == "master")
            {
                return Ok(Some(named));
            }
        }
        let mut announcements = pubsub.on_message();
        while let Some(message) = announcements.next().await {
            let text: String = message.get_payload()?;
            // `<master name> <old ip> <old port> <new ip> <new port>`
            let fields: Vec<&str> = text.split(' ').collect();
            if let [name, _, _, ip, port] = fields[..] {
                let named = (ip.to_string(), port.parse().unwrap_or_default());
                if name == self.master_name && &named != from {
                    return Ok(Some(named));
                }
            }
        }
        Ok(None)
    }

    /// The master the sentinel at `host:port` names, once it says it is one; `Ok(Err(why))`
    /// when the sentinel answered but named no usable master.
    async fn ask(
        &self,
        host: &str,
        port: u16,
    ) -> Result<std::result::Result<redis::Client, String>> {
        let mut connection = quick_connection(&self.sentinel_client(host, port)?).await?;
        let address: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master_name)
            .query_async(&mut connection)
            .await?;
        let Some((master_host, master_port)) = address else {
            return Ok(Err(format!("knows no master named {:?}", self.master_name)));
        };
        Ok(match self.role_of(&master_host, master_port).await {
            Ok(role) if role == "master" => Ok(self.node_client(master_host, master_port)?),
            Ok(_) => Err(format!(
                "names {master_host}:{master_port}, which is not (or no longer) a master"
            )),
            Err(error) => Err(format!(
                "names {master_host}:{master_port}, which does not answer: {error}"
            )),
        })
    }

    /// What the Redis server at `host:port` says it is (`master`, `slave`), asked with the
    /// master's credentials.
    async fn role_of(&self, host: &str, port: u16) -> Result<String> {
        let client = self.node_client(host.to_string(), port)?;
        let role: Vec<Value> = redis::cmd("ROLE")
            .query_async(&mut quick_connection(&client).await?)
            .await?;
        Ok(match role.first() {
            Some(Value::BulkString(role)) => String::from_utf8_lossy(role).into_owned(),
            _ => String::new(),
        })
    }

    /// A client of the Redis server at `host:port` with the master's database and credentials.
    fn node_client(&self, host: String, port: u16) -> Result<redis::Client> {
        let Some(ssl) = &self.ssl else {
            return Ok(redis::Client::open(ConnectionInfo {
                addr: ConnectionAddr::Tcp(host, port),
                redis: self.node.clone(),
            })?);
        };
        let info = ConnectionInfo {
            addr: ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            redis: self.node.clone(),
        };
        crate::tls::redis_client(info, ssl)
    }
}

/// Without the credentials.
impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("db", &self.node.db)
            .finish_non_exhaustive()
    }
}

/// A percent-encoded URL part as text.
/// A connection to `client` that gives up after [`ASK_TIMEOUT`].
async fn quick_connection(client: &redis::Client) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(ASK_TIMEOUT)
        .set_response_timeout(ASK_TIMEOUT);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The sentinels of `url` when it is a sentinel list (see [`Sentinel::parse`]), else `None`.
pub fn of(
    url: &str,
    setting: &str,
    master_name: Option<&str>,
    kwargs: Option<&SentinelKwargs>,
    ssl: Option<&SslOptions>,
) -> Result<Option<Sentinel>> {
    is_sentinel_url(url)
        .then(|| Sentinel::parse(url, setting, master_name, kwargs, ssl))
        .transpose()
}

/// A client of the Redis server `url` names: for a sentinel list, of its current master.
pub(crate) async fn open(
    url: &str,
    sentinel: Option<&Sentinel>,
    ssl: Option<&SslOptions>,
) -> Result<redis::Client> {
    match sentinel {
        Some(sentinel) => sentinel.master().await,
        None => crate::tls::redis_open(url, ssl),
    }
}

/// Whether `error` may mean the master moved: its connection broke, or it now refuses writes
/// as a replica.
fn master_may_have_moved(error: &RedisError) -> bool {
    error.kind() == ErrorKind::ReadOnly
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

/// Whether `error` says the command was refused unrun (by a master turned replica), so that
/// sending it again cannot run it twice.
fn unrun(error: &RedisError) -> bool {
    error.kind() == ErrorKind::ReadOnly
}

/// The server a [`Following`] connection talks to now.
struct Node {
    client: redis::Client,
    connection: ConnectionManager,
    /// Bumped at each move, so that commands failing together move it once.
    generation: u64,
}

/// A connection that reconnects by itself and, under Sentinel, follows the master. It moves
/// when the sentinels announce a new master (`+switch-master`), and when a command fails as a
/// moved master would (connection lost, `READONLY`) and the sentinels name another. The command
/// that failed still fails (it may have run), except after `READONLY`, which says it did not
/// run: it is then sent to the new master.
#[derive(Clone)]
pub struct Following {
    shared: Arc<Shared>,
    /// Stops the announcement watch when the last clone goes.
    _watching: Option<Arc<DropGuard>>,
}

/// What the clones of a [`Following`] share.
struct Shared {
    sentinel: Option<Arc<Sentinel>>,
    node: Mutex<Arc<Node>>,
    /// One move at a time.
    moving: tokio::sync::Mutex<()>,
    /// The generation of the current node, for those who must know when it moves.
    moves: tokio::sync::watch::Sender<u64>,
}

impl Following {
    /// Connects to `client`'s server, following the master of `sentinel` when given.
    pub(crate) async fn new(client: redis::Client, sentinel: Option<Sentinel>) -> Result<Self> {
        let connection = ConnectionManager::new(client.clone()).await?;
        let sentinel = sentinel.map(Arc::new);
        let shared = Arc::new(Shared {
            sentinel: sentinel.clone(),
            node: Mutex::new(Arc::new(Node {
                client,
                connection,
                generation: 0,
            })),
            moving: tokio::sync::Mutex::new(()),
            moves: tokio::sync::watch::Sender::new(0),
        });
        let watching = sentinel.map(|sentinel| Arc::new(watch(&shared, sentinel)));
        Ok(Self {
            shared,
            _watching: watching,
        })
    }

    fn current(&self) -> Arc<Node> {
        self.shared.current()
    }

    /// Resolves when the connection moves to another master from the one it is on now: a
    /// subscription to the old master then hears nothing more of what is written.
    pub(crate) fn moved(&self) -> impl std::future::Future<Output = ()> {
        let mut moves = self.shared.moves.subscribe();
        async move {
            let _ = moves.changed().await;
        }
    }

    /// A subscription connection to the current server; under Sentinel, to the master the
    /// sentinels name now if the current one cannot be reached.
    pub(crate) async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        let node = self.current();
        Ok(match node.client.get_async_pubsub().await {
            Err(error) if self.shared.moved_after(&error, node.generation).await => {
                self.current().client.get_async_pubsub().await?
            }
            subscribed => subscribed?,
        })
    }
}

/// Follows the announcements of `sentinel` for `shared`'s connection until it is dropped.
fn watch(shared: &Arc<Shared>, sentinel: Arc<Sentinel>) -> DropGuard {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let shared = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            let Some(node) = shared.upgrade().map(|shared| shared.current()) else {
                break;
            };
            tokio::select! {
                () = stopped.cancelled() => break,
                () = sentinel.moved_from(&node.client.get_connection_info().addr) => {}
            }
            let Some(shared) = shared.upgrade() else {
                break;
            };
            match shared.follow(node.generation).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(reason) => tracing::warn!(%reason, "cannot find the Redis master yet"),
            }
            // The sentinels disagree with what the master says of itself: mid-failover.
            tokio::time::sleep(RECHECK).await;
        }
    });
    stop.drop_guard()
}

impl Shared {
    fn current(&self) -> Arc<Node> {
        self.node.lock().expect("node lock").clone()
    }

    /// Asks the sentinels where the master is and moves there, unless another command already
    /// moved since generation `seen`. `true` when it moved.
    async fn follow(&self, seen: u64) -> Result<bool> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(false);
        };
        let _moving = self.moving.lock().await;
        let node = self.current();
        if node.generation != seen {
            return Ok(true);
        }
        let client = sentinel.master().await?;
        if client.get_connection_info().addr == node.client.get_connection_info().addr {
            return Ok(false);
        }
        tracing::warn!(
            master = %sentinel.master_name,
            from = %node.client.get_connection_info().addr,
            to = %client.get_connection_info().addr,
            "the Redis master moved; following it"
        );
        let connection = ConnectionManager::new(client.clone()).await?;
        *self.node.lock().expect("node lock") = Arc::new(Node {
            client,
            connection,
            generation: seen + 1,
        });
        self.moves.send_replace(seen + 1);
        Ok(true)
    }

    /// After `error` on generation `seen`: whether the connection moved to another master.
    async fn moved_after(&self, error: &RedisError, seen: u64) -> bool {
        if self.sentinel.is_none() || !master_may_have_moved(error) {
            return false;
        }
        match self.follow(seen).await {
            Ok(moved) => moved,
            Err(reason) => {
                tracing::warn!(%reason, "cannot find the Redis master yet");
                false
            }
        }
    }
}

impl ConnectionLike for Following {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let node = self.current();
            match node.connection.clone().req_packed_command(cmd).await {
                Err(error)
                    if self.shared.moved_after(&error, node.generation).await && unrun(&error) =>
                {
                    self.current()
                        .connection
                        .clone()
                        .req_packed_command(cmd)
                        .await
                }
                answer => answer,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let node = self.current();
            let sent = node
                .connection
                .clone()
                .req_packed_commands(cmd, offset, count)
                .await;
            match sent {
                Err(error)
                    if self.shared.moved_after(&error, node.generation).await && unrun(&error) =>
                {
                    self.current()
                        .connection
                        .clone()
                        .req_packed_commands(cmd, offset, count)
                        .await
                }
                answer => answer,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.current().connection.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::urls::DEFAULT_SENTINEL_PORT;

    fn parse(url: &str, master: Option<&str>) -> Result<Sentinel> {
        Sentinel::parse(url, "broker_url", master, None, None)
    }

    #[test]
    fn lists_read_as_kombu_and_celery_read_them() {
        let sentinel = parse(
            "sentinel://:s%40cret@10.0.0.1:26380/3;sentinel://10.0.0.2;sentinel://[::1]:26381/3",
            Some("mymaster"),
        )
        .unwrap();
        assert_eq!(
            sentinel.sentinels,
            [
                ("10.0.0.1".to_string(), 26380),
                ("10.0.0.2".to_string(), DEFAULT_SENTINEL_PORT),
                ("::1".to_string(), 26381),
            ]
        );
        assert_eq!(sentinel.master_name, "mymaster");
        assert_eq!(sentinel.db(), 3);
        assert_eq!(sentinel.node.password.as_deref(), Some("s@cret"));
        assert_eq!(sentinel.node.username, None);
        assert_eq!(
            (sentinel.auth.username, sentinel.auth.password),
            (None, None)
        );

        let kwargs = SentinelKwargs {
            username: None,
            password: Some("guard".into()),
        };
        let sentinel = Sentinel::parse(
            "sentinel://app:pw@h:1/;sentinel://h:2/5",
            "result_backend",
            Some("m"),
            Some(&kwargs),
            None,
        )
        .unwrap();
        // Only the first URL's database and credentials count.
        assert_eq!(sentinel.db(), 0);
        assert_eq!(sentinel.node.username.as_deref(), Some("app"));
        assert_eq!(sentinel.auth.password.as_deref(), Some("guard"));
        let shown = format!("{sentinel:?}");
        assert!(!shown.contains("pw") && !shown.contains("guard"), "{shown}");
    }

    #[test]
    fn bad_lists_name_the_problem() {
        let err = parse("sentinel://h:26379", None).unwrap_err();
        assert!(err.to_string().contains("no master_name"), "{err}");
        let err = parse("sentinel://h:26379", Some("")).unwrap_err();
        assert!(err.to_string().contains("no master_name"), "{err}");
        let err = parse("sentinel://h:1;redis://h:6379", Some("m")).unwrap_err();
        assert!(err.to_string().contains("not redis://"), "{err}");
        let err = parse("sentinel://:pw@h:1/x", Some("m")).unwrap_err();
        assert!(err.to_string().contains("\"x\" is not a number"), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
        let err = parse("sentinel://h:1/0?ssl_cert_reqs=none", Some("m")).unwrap_err();
        assert!(err.to_string().contains("no query parameters"), "{err}");
        let err = parse("sentinel://h:1;", Some("m")).unwrap_err();
        assert!(err.to_string().contains("\"\""), "{err}");
    }

    #[test]
    fn moves_are_suspected_on_broken_connections_and_readonly_only() {
        let readonly = RedisError::from((ErrorKind::ReadOnly, "READONLY"));
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let script = RedisError::from((ErrorKind::ResponseError, "ERR script"));
        assert!(master_may_have_moved(&readonly));
        assert!(master_may_have_moved(&dropped));
        assert!(!master_may_have_moved(&script));
    }
}
