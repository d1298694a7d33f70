//! `ceiling`: the true ceiling of consuming on this machine, with nothing of ours in it. Each
//! subcommand drains a queue that `loadgen publish` filled with real `tasks.add` messages, using
//! only the broker's client crate, the way our transport uses the broker, and prints one JSON
//! object: messages, their average size, and the rate.
//!
//! - `amqp`: a bare `lapin` consumer: one channel, per-consumer prefetch, each message acked on
//!   its own (no `multiple`), the acks in flight at once: the client's plain use (our transport
//!   coalesces its acks, so it can beat this).
//! - `redis`: a bare `redis` client loop doing what our Redis transport does with the server: a
//!   Lua script pops up to the free prefetch slots (at most 64) and records each message as
//!   unacked (kombu's `unacked` hash and `unacked_index` sorted set) in the same step; an ack
//!   removes both records in one MULTI/EXEC, each message's on its own (kombu's way; our
//!   transport drops many messages' records in one).
//!
//! The script and the envelope reading here are written for this bench on purpose, not taken
//! from the runtime crate: the point is a baseline our code is not part of.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Parser)]
struct Args {
    /// Broker URL (`amqp://...` for `amqp`, `redis://...` for `redis`).
    #[arg(long)]
    broker_url: String,
    /// A queue holding at least `count` messages.
    #[arg(long)]
    queue: String,
    /// Messages to consume and ack.
    #[arg(long)]
    count: usize,
    /// Unacked messages held at once (our worker's: concurrency × prefetch multiplier).
    #[arg(long, default_value_t = 32)]
    prefetch: u16,
    #[command(subcommand)]
    broker: Broker,
}

#[derive(Subcommand)]
enum Broker {
    /// A bare lapin consumer.
    Amqp,
    /// A bare redis-crate take-and-ack loop.
    Redis,
}

/// What one drain measured.
struct Drained {
    seconds: f64,
    /// The bytes of all messages as the broker held them: AMQP bodies, Redis envelopes.
    message_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let drained = match args.broker {
        Broker::Amqp => amqp(&args).await?,
        Broker::Redis => redis_loop(&args).await?,
    };
    let report = json!({
        "messages": args.count,
        "message_bytes": drained.message_bytes / args.count.max(1),
        "seconds": drained.seconds,
        "consumed_per_second": args.count as f64 / drained.seconds,
    });
    println!("{report}");
    Ok(())
}

async fn amqp(args: &Args) -> anyhow::Result<Drained> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(&args.broker_url, properties).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            &args.queue,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let began = Instant::now();
    let mut message_bytes = 0;
    // Each ack awaited apart from the loop (as our worker settles): awaiting it in the loop
    // waits for lapin's I/O loop to send it, which held the rate at about 3/4 of this here.
    let mut acks = JoinSet::new();
    for _ in 0..args.count {
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow!("the consumer ended"))??;
        message_bytes += delivery.data.len();
        acks.spawn(async move { delivery.ack(BasicAckOptions::default()).await });
        while let Some(acked) = acks.try_join_next() {
            acked??;
        }
    }
    while let Some(acked) = acks.join_next().await {
        acked??;
    }
    let seconds = began.elapsed().as_secs_f64();
    connection.close(200, "done").await?;
    Ok(Drained {
        seconds,
        message_bytes,
    })
}

/// Pops up to ARGV[2] messages from the list KEYS[3] and records each in the hash KEYS[1] (by
/// delivery tag: the envelope, its exchange and routing key) and the sorted set KEYS[2] (scored
/// ARGV[1]). Returns the envelopes taken.
const TAKE: &str = r#"
local taken = {}
for n = 1, tonumber(ARGV[2]) do
  local raw = redis.call('RPOP', KEYS[3])
  if not raw then break end
  local properties = cjson.decode(raw)['properties']
  local info = properties['delivery_info']
  local tag = properties['delivery_tag']
  redis.call('HSET', KEYS[1], tag,
    '[' .. raw .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
  redis.call('ZADD', KEYS[2], ARGV[1], tag)
  taken[n] = raw
end
return taken
"#;

/// The most one take asks for, as our transport.
const TAKE_AT_ONCE: usize = 64;
const UNACKED: &str = "unacked";
const UNACKED_INDEX: &str = "unacked_index";

/// The one field of a kombu envelope an ack needs.
#[derive(Deserialize)]
struct Envelope {
    properties: Properties,
}

#[derive(Deserialize)]
struct Properties {
    delivery_tag: String,
}

async fn redis_loop(args: &Args) -> anyhow::Result<Drained> {
    let client = redis::Client::open(args.broker_url.as_str())?;
    let connection = client.get_multiplexed_async_connection().await?;
    let take = redis::Script::new(TAKE);
    let slots = Arc::new(Semaphore::new(usize::from(args.prefetch).max(1)));
    let mut acks = JoinSet::new();
    let began = Instant::now();
    let (mut taken, mut message_bytes) = (0, 0);
    while taken < args.count {
        // As many messages as there are free slots, waiting for one when none is.
        let mut free = vec![slots.clone().acquire_owned().await?];
        while free.len() < TAKE_AT_ONCE.min(args.count - taken) {
            match slots.clone().try_acquire_owned() {
                Ok(slot) => free.push(slot),
                Err(_) => break,
            }
        }
        let popped: Vec<Vec<u8>> = take
            .key(UNACKED)
            .key(UNACKED_INDEX)
            .key(&args.queue)
            .arg(epoch_seconds())
            .arg(free.len())
            .invoke_async(&mut connection.clone())
            .await?;
        if popped.is_empty() {
            anyhow::bail!("{} ran out after {taken} messages", args.queue);
        }
        taken += popped.len();
        for (raw, slot) in popped.into_iter().zip(free) {
            message_bytes += raw.len();
            let tag = serde_json::from_slice::<Envelope>(&raw)
                .context("an envelope without a delivery tag")?
                .properties
                .delivery_tag;
            let mut connection = connection.clone();
            acks.spawn(async move {
                let acked = redis::pipe()
                    .atomic()
                    .zrem(UNACKED_INDEX, &tag)
                    .hdel(UNACKED, &tag)
                    .query_async::<()>(&mut connection)
                    .await;
                drop(slot);
                acked
            });
        }
        while let Some(acked) = acks.try_join_next() {
            acked??;
        }
    }
    while let Some(acked) = acks.join_next().await {
        acked??;
    }
    Ok(Drained {
        seconds: began.elapsed().as_secs_f64(),
        message_bytes,
    })
}

/// Seconds since the epoch, as kombu scores `unacked_index`.
fn epoch_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
