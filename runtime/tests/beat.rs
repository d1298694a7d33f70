//! `beat` against a real Redis: a 1 s entry fires about once a second, a restart neither skips
//! nor repeats a run, and two beats started at once still send it once a second; a unique task's
//! runs are skipped while its last holds the lock, without holding up the other entries.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{redis_url, unique_queue};
use runtime::beat::Beat;
use runtime::config::TaskAnnotation;
use runtime::schedule::BeatEntry;
use runtime::{unique, CeleryConfig};
use serde_json::json;

/// Runs `beats` beats at once for `seconds`.
async fn run(config: &CeleryConfig, beats: usize, seconds: f64) {
    let mut running = Vec::new();
    for _ in 0..beats {
        let beat = Beat::new(config.clone()).await.unwrap();
        running.push(tokio::spawn(
            beat.run(tokio::time::sleep(Duration::from_secs_f64(seconds))),
        ));
    }
    for beat in running {
        beat.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_entry_fires_once_a_second_across_a_restart_and_a_rival_beat() {
    let queue = unique_queue("beat");
    let prefix = format!("test-beat-{}", uuid::Uuid::new_v4().simple());
    let entry = BeatEntry {
        task: "tasks.add".into(),
        schedule: Some(1.0),
        crontab: None,
        args: vec![json!(1), json!(2)],
        kwargs: Default::default(),
        queue: Some(queue.clone()),
        expires: None,
    };
    let config = CeleryConfig {
        broker_url: redis_url(),
        result_backend: Some(redis_url()),
        beat_schedule: BTreeMap::from([("tick".to_string(), entry)]),
        beat_key_prefix: prefix.clone(),
        ..CeleryConfig::default()
    };
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let began = Instant::now();
    run(&config, 1, 4.0).await;
    let first: usize = redis::cmd("LLEN")
        .arg(&queue)
        .query_async(&mut redis)
        .await
        .unwrap();
    // A new entry starts its schedule when first seen: runs at about 1, 2 and 3 s.
    assert!((2..=4).contains(&first), "{first} runs in the first 4 s");
    // Restarted, and by mistake twice: still one run a second, counted from the last one.
    run(&config, 2, 3.0).await;
    let elapsed = began.elapsed().as_secs_f64();
    let total: usize = redis::cmd("LLEN")
        .arg(&queue)
        .query_async(&mut redis)
        .await
        .unwrap();
    let expected = elapsed.floor() as usize - 1;
    assert!(
        total + 1 >= expected && total <= expected + 1,
        "{total} runs in {elapsed:.1} s (about {expected} expected)"
    );
    redis::cmd("DEL")
        .arg(&queue)
        .arg(format!("{prefix}.last-run"))
        .arg(format!("{prefix}.lock"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_task_s_runs_are_skipped_while_its_last_holds_the_lock_and_hold_up_no_other() {
    let (unique_queue_name, plain_queue) =
        (unique_queue("beat-unique"), unique_queue("beat-plain"));
    let prefix = format!("test-beat-{}", uuid::Uuid::new_v4().simple());
    let n = uuid::Uuid::new_v4().as_u128() as u64 >> 12;
    let every_second = |task: &str, queue: &str| BeatEntry {
        task: task.into(),
        schedule: Some(1.0),
        crontab: None,
        args: vec![json!(n)],
        kwargs: Default::default(),
        queue: Some(queue.to_string()),
        expires: None,
    };
    let annotation = TaskAnnotation {
        unique_for: Some(60.0),
        ..TaskAnnotation::default()
    };
    let config = CeleryConfig {
        broker_url: redis_url(),
        result_backend: Some(redis_url()),
        // Sent first in each round, so a refusal that ended the round would starve the other.
        beat_schedule: BTreeMap::from([
            (
                "a-unique".to_string(),
                every_second("tasks.add", &unique_queue_name),
            ),
            (
                "b-plain".to_string(),
                every_second("tasks.mul", &plain_queue),
            ),
        ]),
        task_annotations: BTreeMap::from([("tasks.add".to_string(), annotation)]),
        beat_key_prefix: prefix.clone(),
        ..CeleryConfig::default()
    };
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    run(&config, 1, 4.0).await;
    let queued = |queue: String| {
        let mut redis = redis.clone();
        async move {
            redis::cmd("LLEN")
                .arg(queue)
                .query_async::<usize>(&mut redis)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        queued(unique_queue_name.clone()).await,
        1,
        "the unique task sent once"
    );
    let plain = queued(plain_queue.clone()).await;
    assert!(
        (2..=4).contains(&plain),
        "{plain} runs of the other entry in 4 s"
    );
    let lock = unique::lock_key(&unique::lock_name(
        "tasks.add",
        &[json!(n)],
        &Default::default(),
    ));
    redis::cmd("DEL")
        .arg(&unique_queue_name)
        .arg(&plain_queue)
        .arg(lock)
        .arg(format!("{prefix}.last-run"))
        .arg(format!("{prefix}.lock"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
}
