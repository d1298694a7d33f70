//! Celery's Redis result backend: `celery-task-meta-<id>` keys holding JSON result metas.
//!
//! Every write is a SET with the configured expiry plus a PUBLISH of the same text on the key's
//! channel, in one server-side script, so a Python `AsyncResult.get()` subscribed to the channel
//! wakes at once and a late reader still finds the value. A stored SUCCESS is never overwritten,
//! as Celery guarantees: a slow PROGRESS write cannot undo a finished task.

use std::sync::LazyLock;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tracing::warn;

use crate::config::SslOptions;
use crate::error::{Error, Result};
use crate::protocol::result::{state, ResultMeta};
use crate::sentinel::{Following, Sentinel};

/// Sets and publishes ARGV[1] under KEYS[1] (expiring after ARGV[2] seconds when > 0), unless
/// the key already holds a SUCCESS. Returns 1 when written.
const STORE_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

/// Deletes KEYS[1] if it still holds the token ARGV[1]: a lock or claim given back by its holder
/// only.
static DELETE_IF_HELD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// Sets KEYS[1] to the token ARGV[1] for ARGV[2] seconds unless it is set; returns nothing when
/// set, else the token holding it, in one step so the holder named is the one that refused.
static TAKE_UNLESS_HELD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"#,
    )
});

/// The key (and pub/sub channel) of a task's result.
pub fn result_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// The key of a saved group result (Celery's `GroupResult.save()`).
pub fn group_key(group_id: &str) -> String {
    format!("celery-taskset-meta-{group_id}")
}

/// A connection to the result backend. It reconnects by itself after the server drops it: the
/// command that met the broken connection fails, the next one runs on a new connection. Under
/// Sentinel it also follows the master to its new address after a failover.
#[derive(Clone)]
pub struct RedisBackend {
    connection: Following,
    store: redis::Script,
    expires: u64,
}

impl RedisBackend {
    /// The `result_backend` of `config`, connected, with its expiry, TLS and Sentinel settings;
    /// `None` when there is none.
    pub async fn of(config: &crate::CeleryConfig) -> Result<Option<Self>> {
        Self::of_expiring(config, config.result_expires).await
    }

    /// As [`RedisBackend::of`], with records kept `expires` seconds (0: for ever).
    pub async fn of_expiring(config: &crate::CeleryConfig, expires: u64) -> Result<Option<Self>> {
        let Some(url) = &config.result_backend else {
            return Ok(None);
        };
        let ssl = config.redis_backend_use_ssl.as_ref();
        let options = &config.result_backend_transport_options;
        let sentinel = crate::sentinel::of(
            url,
            "result_backend",
            options.master_name.as_deref(),
            options.sentinel_kwargs.as_ref(),
            ssl,
        )?;
        match sentinel {
            Some(sentinel) => {
                let client = sentinel.master().await?;
                Ok(Some(
                    Self::following(client, Some(sentinel), expires).await?,
                ))
            }
            None => Ok(Some(Self::connect(url, expires, ssl).await?)),
        }
    }

    /// Connects to `url`; results expire after `expires` seconds (0: never). A `rediss://` URL
    /// is reached over TLS as `ssl` (`redis_backend_use_ssl`) says.
    pub async fn connect(url: &str, expires: u64, ssl: Option<&SslOptions>) -> Result<Self> {
        let client = crate::tls::redis_open(url, ssl)?;
        // The connection manager retries a failed first connect for minutes; a refused TLS
        // handshake will not heal, so it is tried once first and reported at once.
        if crate::urls::is_tls_url(url) {
            if let Err(error) = client.get_multiplexed_async_connection().await {
                if crate::tls::lasting(&error) {
                    return Err(error.into());
                }
            }
        }
        Self::following(client, None, expires).await
    }

    async fn following(
        client: redis::Client,
        sentinel: Option<Sentinel>,
        expires: u64,
    ) -> Result<Self> {
        Ok(Self {
            connection: Following::new(client, sentinel).await?,
            store: redis::Script::new(STORE_SCRIPT),
            expires,
        })
    }

    /// A handle on the shared connection, for the backend's other records (chords).
    pub(crate) fn connection(&self) -> Following {
        self.connection.clone()
    }

    /// Takes the lock `key` for `token` for `seconds`; `Some(holder)` when another token holds
    /// it.
    pub async fn take_unless_held(
        &self,
        key: &str,
        token: &str,
        seconds: u64,
    ) -> Result<Option<String>> {
        Ok(TAKE_UNLESS_HELD
            .key(key)
            .arg(token)
            .arg(seconds)
            .invoke_async(&mut self.connection())
            .await?)
    }

    /// Gives back the lock or claim `key` if `token` still holds it.
    pub async fn delete_if_held(&self, key: &str, token: &str) -> Result<()> {
        DELETE_IF_HELD
            .key(key)
            .arg(token)
            .invoke_async::<i64>(&mut self.connection())
            .await?;
        Ok(())
    }

    /// Gives back the unique lock `name` ([`crate::unique`]) if task `task_id` still holds it,
    /// so the next send of the task may go. A failure is logged, not returned: the lock then
    /// lives until it expires, and nothing the caller could do would give it back sooner.
    pub async fn give_back_unique_lock(&self, name: &str, task_id: &str) {
        if let Err(error) = self
            .delete_if_held(&crate::unique::lock_key(name), task_id)
            .await
        {
            warn!(lock = %name, id = %task_id, %error, "cannot give back the unique lock; it expires");
        }
    }

    /// Seconds results are kept (0: for ever).
    pub(crate) fn expires(&self) -> u64 {
        self.expires
    }

    /// Writes and publishes `meta`; `false` when the task already holds SUCCESS.
    pub async fn store(&self, meta: &ResultMeta) -> Result<bool> {
        let text = serde_json::to_string(meta)?;
        let written: i64 = self
            .store
            .key(result_key(&meta.task_id))
            .arg(text)
            .arg(self.expires)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(written == 1)
    }

    /// Records that group `group_id` is made of the tasks `member_ids`, in order, as Python's
    /// `GroupResult.save()` does, so that `GroupResult.restore(group_id)` finds them. Celery
    /// stores the group as its result tuple: `[[group id, parent], [member tuples]]`, each member
    /// `[[task id, parent], null]`; these groups have no parent.
    pub async fn save_group(&self, group_id: &str, member_ids: &[String]) -> Result<()> {
        let members: Vec<Value> = member_ids
            .iter()
            .map(|id| json!([[id, null], null]))
            .collect();
        self.save_group_tuple(group_id, &json!([[group_id, null], members]))
            .await
    }

    /// Saves `tuple` as group `group_id`'s result, as [`Self::save_group`] does, for a group
    /// whose members may be groups themselves.
    pub async fn save_group_tuple(&self, group_id: &str, tuple: &Value) -> Result<()> {
        let saved = json!({ "result": tuple }).to_string();
        let mut set = redis::cmd("SET");
        set.arg(group_key(group_id)).arg(saved);
        if self.expires > 0 {
            set.arg("EX").arg(self.expires);
        }
        set.query_async::<()>(&mut self.connection.clone()).await?;
        Ok(())
    }

    /// The stored meta, or `None` while the task is PENDING (nothing stored).
    pub async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>> {
        let text: Option<String> = redis::cmd("GET")
            .arg(result_key(task_id))
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(match text {
            Some(text) => Some(serde_json::from_str(&text)?),
            None => None,
        })
    }

    /// Every result meta written from now on, by any worker, as (task id, meta). Celery publishes
    /// each state write on the key's channel, so this follows Python workers too. The stream
    /// ends when the connection is lost, or moves to a new master (Sentinel): subscribe again.
    pub async fn watch_all(&self) -> Result<impl futures::Stream<Item = (String, ResultMeta)>> {
        let moved = self.connection.moved();
        let mut pubsub = self.connection.pubsub().await?;
        pubsub.psubscribe(result_key("*")).await?;
        let prefix = result_key("");
        Ok(pubsub
            .into_on_message()
            .take_until(moved)
            .filter_map(move |message| {
                let id = message
                    .get_channel_name()
                    .strip_prefix(&prefix)
                    .map(str::to_owned);
                let meta = message
                    .get_payload::<String>()
                    .ok()
                    .and_then(|text| serde_json::from_str(&text).ok());
                futures::future::ready(id.zip(meta))
            }))
    }

    /// Waits until the task is ready (SUCCESS, FAILURE, REVOKED) and returns its meta. Subscribes
    /// first, then reads once, so a result stored in between is not missed.
    pub async fn wait(&self, task_id: &str, timeout: Duration) -> Result<ResultMeta> {
        let key = result_key(task_id);
        let mut pubsub = self.connection.pubsub().await?;
        pubsub.subscribe(&key).await?;
        if let Some(meta) = self
            .get(task_id)
            .await?
            .filter(|m| state::is_ready(&m.status))
        {
            return Ok(meta);
        }
        let mut messages = pubsub.on_message();
        let ready = async {
            while let Some(message) = messages.next().await {
                let payload: String = message.get_payload()?;
                let meta: ResultMeta = serde_json::from_str(&payload)?;
                if state::is_ready(&meta.status) {
                    return Ok(meta);
                }
            }
            Err(Error::Timeout(task_id.to_string()))
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| Error::Timeout(task_id.to_string()))?
    }
}
