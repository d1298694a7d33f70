//! `loadgen`: the Rust side of `make bench`'s load. Prints one JSON object per run.
//!
//! - `publish`: sends `tasks.add` messages through our client, to fill a queue before a worker
//!   drains it and to measure the client's publish rate. `--in-flight 1`: a plain loop, as
//!   Python's `apply_async` loop, each send awaited and its confirmation awaited in the
//!   background, all of them by a flush at the end; more: that many `send_task`s (each awaiting
//!   its confirmation) at once.
//! - `ceiling`: the broker's own ceiling for our transport layer, with no task logic: publishes
//!   messages of the same size as a `tasks.add` call, then consumes and acks them with the
//!   worker's prefetch, and times both.

use std::time::Instant;

use clap::{Parser, Subcommand};
use futures::{stream, StreamExt, TryStreamExt};
use runtime::broker;
use runtime::client::{Client, SendOptions};
use runtime::config::TransportOptions;
use runtime::protocol::TaskRequest;
use runtime::CeleryConfig;
use serde_json::{json, Map};

#[derive(Parser)]
struct Args {
    /// Broker URL (`amqp://...` or `redis://...`).
    #[arg(long)]
    broker_url: String,
    /// Queue to fill or drain.
    #[arg(long)]
    queue: String,
    /// Messages.
    #[arg(long)]
    count: usize,
    /// Publishes awaited at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send `tasks.add(i, i)` messages through the client.
    Publish {
        /// Mark them to store no result.
        #[arg(long)]
        ignore_result: bool,
    },
    /// Publish then consume raw messages through the transport layer.
    Ceiling {
        /// Unacked messages held at once while consuming.
        #[arg(long, default_value_t = 32)]
        prefetch: u16,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let report = match args.command {
        Command::Publish { ignore_result } => publish(&args, ignore_result).await?,
        Command::Ceiling { prefetch } => ceiling(&args, prefetch).await?,
    };
    println!("{report}");
    Ok(())
}

async fn publish(args: &Args, ignore_result: bool) -> anyhow::Result<serde_json::Value> {
    let config = CeleryConfig {
        broker_url: args.broker_url.clone(),
        ..CeleryConfig::default()
    };
    let client = Client::connect(config).await?;
    let options = SendOptions {
        queue: Some(args.queue.clone()),
        ignore_result,
        ..SendOptions::default()
    };
    let add = |i: usize| (vec![json!(i), json!(i)], Map::new(), options.clone());
    let began = Instant::now();
    if args.in_flight <= 1 {
        for i in 0..args.count {
            let (numbers, kwargs, options) = add(i);
            // The confirmation comes in the background; the flush reports a refusal.
            client
                .send_task_pipelined("tasks.add", numbers, kwargs, options)
                .await?;
        }
        client.flush().await?;
    } else {
        stream::iter(0..args.count)
            .map(|i| {
                let (numbers, kwargs, options) = add(i);
                client.send_task("tasks.add", numbers, kwargs, options)
            })
            .buffer_unordered(args.in_flight)
            .try_for_each(|_| async { Ok(()) })
            .await?;
    }
    let seconds = began.elapsed().as_secs_f64();
    client.close().await?;
    Ok(
        json!({"published": args.count, "seconds": seconds, "per_second": args.count as f64 / seconds}),
    )
}

async fn ceiling(args: &Args, prefetch: u16) -> anyhow::Result<serde_json::Value> {
    let broker = broker::connect_with(&args.broker_url, &TransportOptions::default(), None).await?;
    let message = TaskRequest::new("tasks.add", vec![json!(1), json!(1)], Map::new()).encode();
    let began = Instant::now();
    stream::iter(0..args.count)
        .map(|_| broker.publish(&args.queue, &message))
        .buffer_unordered(args.in_flight.max(1))
        .try_for_each(|()| async { Ok(()) })
        .await?;
    let published = began.elapsed().as_secs_f64();
    let mut deliveries = broker
        .consume(std::slice::from_ref(&args.queue), prefetch)
        .await?;
    let began = Instant::now();
    // Acked concurrently, as the worker does; the prefetch bounds how many are open.
    let mut acks = tokio::task::JoinSet::new();
    for _ in 0..args.count {
        let delivery = deliveries
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the consumer stopped"))?;
        acks.spawn(delivery.settle.ack());
        while let Some(done) = acks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    let consumed = began.elapsed().as_secs_f64();
    drop(deliveries);
    broker.delete_queue(&args.queue).await?;
    broker.close().await?;
    Ok(json!({
        "messages": args.count,
        "body_bytes": message.body.len(),
        "published_per_second": args.count as f64 / published,
        "consumed_per_second": args.count as f64 / consumed,
    }))
}
