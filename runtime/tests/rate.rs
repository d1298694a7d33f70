//! The cluster-wide rate limiter against a real Redis: several limiters, as several workers
//! each with its own connection, share one limit and together start no more than it allows.

mod common;

use std::time::{Duration, Instant};

use runtime::rate::{cluster_key, reserve_shared};

/// Most starts within any `window` among `starts` (sorted).
fn most_in_window(starts: &[Duration], window: Duration) -> usize {
    (0..starts.len())
        .map(|first| {
            starts[first..]
                .iter()
                .take_while(|start| **start - starts[first] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn limiters_of_four_workers_share_one_limit() {
    const PER_SECOND: f64 = 20.0;
    const WORKERS: usize = 4;
    let run = Duration::from_secs(3);
    let key = cluster_key(&format!("test-rate-{}", uuid::Uuid::new_v4().simple()));
    let client = redis::Client::open(common::redis_url()).unwrap();
    let began = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let key = key.clone();
        workers.spawn(async move {
            let mut starts = Vec::new();
            // Bounded: each round reserves one start, and reservations end with the run.
            while began.elapsed() < run {
                let wait = reserve_shared(&mut connection, &key, PER_SECOND)
                    .await
                    .unwrap();
                tokio::time::sleep(wait).await;
                starts.push(began.elapsed());
            }
            starts
        });
    }
    let mut starts: Vec<Duration> = Vec::new();
    while let Some(worker) = common::within(30, "the limiters", workers.join_next()).await {
        starts.extend(worker.unwrap());
    }
    starts.sort();
    // The last reservations were made before the run's end and start up to one spacing later.
    let span = starts.last().unwrap().as_secs_f64();
    // GCRA with a burst of one: n starts take at least (n - 1) spacings, whoever asks.
    let at_most = (span * PER_SECOND).floor() as usize + 1;
    assert!(
        starts.len() <= at_most,
        "{} starts in {span:.3} s at {PER_SECOND}/s",
        starts.len()
    );
    // Not starved either: four workers on their own would start four times as many.
    assert!(
        starts.len() as f64 >= run.as_secs_f64() * PER_SECOND * 0.8,
        "{} starts",
        starts.len()
    );
    // Any one-second window holds the limit plus the one burst start; one more for the
    // timers, which can wake one start late and so bring it nearer the next.
    let most = most_in_window(&starts, Duration::from_secs(1));
    assert!(
        most <= PER_SECOND as usize + 2,
        "{most} starts in one second"
    );
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut client.get_multiplexed_async_connection().await.unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_shared_time_expires_once_passed() {
    let key = cluster_key(&format!("test-rate-{}", uuid::Uuid::new_v4().simple()));
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    assert_eq!(
        reserve_shared(&mut connection, &key, 2.0).await.unwrap(),
        Duration::ZERO
    );
    let second = reserve_shared(&mut connection, &key, 2.0).await.unwrap();
    assert!(
        second > Duration::from_millis(400) && second <= Duration::from_millis(500),
        "{second:?}"
    );
    // The key lasts until its time has passed, plus a second's margin: no key is left behind.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!((1000..=2000).contains(&ttl), "{ttl} ms");
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
}
