//! What a worker node knows about its own work: the requests it holds (reserved, scheduled,
//! active), totals per task name, and the ids revoked by remote control. Read by the control
//! commands and the heartbeat; written by the dispatcher.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::events::timestamp;
use crate::metrics::WorkerMetrics;
use crate::protocol::repr::{repr, repr_args};
use crate::protocol::TaskRequest;
use crate::stamps::RevokedStamps;

/// Revoked ids kept at most, as Celery's `CELERY_WORKER_REVOKES_MAX`.
const REVOKES_MAX: usize = 50_000;

/// Where a held request is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Prefetched, waiting for a slot.
    Reserved,
    /// Waiting for its ETA.
    Scheduled(DateTime<Utc>),
    /// Running since this epoch time.
    Active(f64),
}

struct Held {
    request: TaskRequest,
    queue: String,
    phase: Phase,
    acknowledged: bool,
    terminate: CancellationToken,
}

/// The node's bookkeeping, shared between dispatcher, control and heartbeat.
pub struct WorkerState {
    hostname: String,
    metrics: Arc<WorkerMetrics>,
    started: Instant,
    held: Mutex<HashMap<String, Held>>,
    totals: Mutex<BTreeMap<String, u64>>,
    processed: AtomicU64,
    revoked: Mutex<(VecDeque<String>, HashSet<String>)>,
    revoked_stamps: Mutex<RevokedStamps>,
}

impl WorkerState {
    /// Empty state for node `hostname`, counting what it holds in `metrics`.
    pub fn new(hostname: &str, metrics: Arc<WorkerMetrics>) -> Self {
        Self {
            hostname: hostname.to_string(),
            metrics,
            started: Instant::now(),
            held: Mutex::new(HashMap::new()),
            totals: Mutex::new(BTreeMap::new()),
            processed: AtomicU64::new(0),
            revoked: Mutex::new((VecDeque::new(), HashSet::new())),
            revoked_stamps: Mutex::new(RevokedStamps::default()),
        }
    }

    /// Starts holding `request`; the token is cancelled when it is revoked before it runs, or
    /// with `terminate` while it runs.
    pub fn hold(&self, request: &TaskRequest, queue: &str) -> CancellationToken {
        let phase = match request.eta {
            Some(eta) if eta > Utc::now() => Phase::Scheduled(eta),
            _ => Phase::Reserved,
        };
        let terminate = CancellationToken::new();
        let held = Held {
            request: request.clone(),
            queue: queue.to_string(),
            phase,
            acknowledged: false,
            terminate: terminate.clone(),
        };
        let replaced = self
            .held
            .lock()
            .expect("state lock")
            .insert(request.id.clone(), held);
        // The same task id delivered twice at once: the newer message replaces the older here.
        if let Some(older) = replaced {
            self.metrics.let_go(matches!(older.phase, Phase::Active(_)));
        }
        self.metrics.held();
        terminate
    }

    /// Marks a held request as running (and whether its message is acked).
    pub fn activate(&self, id: &str, acknowledged: bool) {
        if let Some(held) = self.held.lock().expect("state lock").get_mut(id) {
            if !matches!(held.phase, Phase::Active(_)) {
                self.metrics.started();
            }
            held.phase = Phase::Active(timestamp());
            held.acknowledged = acknowledged;
        }
    }

    /// Stops holding a request; counts it when it ran.
    pub fn release(&self, id: &str) {
        let held = self.held.lock().expect("state lock").remove(id);
        if let Some(held) = &held {
            self.metrics.let_go(matches!(held.phase, Phase::Active(_)));
        }
        if let Some(Held {
            phase: Phase::Active(_),
            request,
            ..
        }) = held
        {
            *self
                .totals
                .lock()
                .expect("state lock")
                .entry(request.task)
                .or_default() += 1;
            self.processed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tasks running now.
    pub fn active_count(&self) -> usize {
        self.held
            .lock()
            .expect("state lock")
            .values()
            .filter(|h| matches!(h.phase, Phase::Active(_)))
            .count()
    }

    /// Tasks run to an end since start.
    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Runs per task name since start.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.totals.lock().expect("state lock").clone()
    }

    /// Seconds since start.
    pub fn uptime(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Request infos of held requests in phases `filter` selects, as `inspect` shows them.
    pub fn infos(&self, filter: impl Fn(&Phase) -> bool, safe: bool) -> Vec<(Phase, Value)> {
        let held = self.held.lock().expect("state lock");
        held.values()
            .filter(|h| filter(&h.phase))
            .map(|h| (h.phase.clone(), self.info(h, safe)))
            .collect()
    }

    /// `query_task`: the phase and info of each held id among `ids`.
    pub fn query(&self, ids: &[String]) -> Value {
        let held = self.held.lock().expect("state lock");
        let found = ids.iter().filter_map(|id| {
            let h = held.get(id)?;
            let phase = match h.phase {
                Phase::Active(_) => "active",
                Phase::Reserved => "reserved",
                Phase::Scheduled(_) => "scheduled",
            };
            Some((id.clone(), json!([phase, self.info(h, false)])))
        });
        Value::Object(found.collect())
    }

    fn info(&self, held: &Held, safe: bool) -> Value {
        let request = &held.request;
        let (args, kwargs) = if safe {
            (
                json!(repr_args(&request.args)),
                json!(repr(&Value::Object(request.kwargs.clone()))),
            )
        } else {
            (json!(request.args), json!(request.kwargs))
        };
        let (time_start, worker_pid) = match held.phase {
            Phase::Active(started) => (json!(started), json!(std::process::id())),
            _ => (Value::Null, Value::Null),
        };
        json!({
            "id": request.id,
            "name": request.task,
            "args": args,
            "kwargs": kwargs,
            "type": request.task,
            "hostname": self.hostname,
            "time_start": time_start,
            "acknowledged": held.acknowledged,
            "delivery_info": {
                "exchange": "",
                "routing_key": held.queue,
                "priority": request.properties.priority,
                "redelivered": request.redelivered,
            },
            "worker_pid": worker_pid,
        })
    }

    /// Whether task `id` is running on this node.
    pub fn is_active(&self, id: &str) -> bool {
        let held = self.held.lock().expect("state lock");
        held.get(id)
            .is_some_and(|h| matches!(h.phase, Phase::Active(_)))
    }

    /// Records `ids` as revoked; those held and not running yet are let go, those running are
    /// terminated when `terminate`.
    /// Returns the ids that were running and got the signal.
    pub fn revoke(&self, ids: &[String], terminate: bool) -> Vec<String> {
        let mut revoked = self.revoked.lock().expect("state lock");
        for id in ids {
            if revoked.1.insert(id.clone()) {
                revoked.0.push_back(id.clone());
            }
            while revoked.0.len() > REVOKES_MAX {
                if let Some(oldest) = revoked.0.pop_front() {
                    revoked.1.remove(&oldest);
                }
            }
        }
        drop(revoked);
        let held = self.held.lock().expect("state lock");
        ids.iter()
            .filter_map(|id| {
                let held = held.get(id)?;
                let running = matches!(held.phase, Phase::Active(_));
                // One not running yet is let go at once (and settled REVOKED), not at its ETA
                // or its turn: a revoke frees what a 10-year countdown holds.
                if running && !terminate {
                    return None;
                }
                held.terminate.cancel();
                running.then(|| id.clone())
            })
            .collect()
    }

    /// Revokes the stamp values `headers` names (`revoke_by_stamped_headers`); with `terminate`
    /// also stops the running tasks stamped with one of them. Returns the stamps of the tasks
    /// it stopped.
    pub fn revoke_stamps(
        &self,
        headers: &serde_json::Map<String, Value>,
        terminate: bool,
    ) -> Vec<(String, Value)> {
        self.revoked_stamps
            .lock()
            .expect("state lock")
            .revoke(headers);
        if !terminate {
            return Vec::new();
        }
        let mut named = RevokedStamps::default();
        named.revoke(headers);
        let held = self.held.lock().expect("state lock");
        held.values()
            .filter(|h| matches!(h.phase, Phase::Active(_)))
            .flat_map(|h| {
                let found = named.matches(&h.request);
                if !found.is_empty() {
                    h.terminate.cancel();
                }
                found
            })
            .collect()
    }

    /// The first of the request's stamps that is revoked, as `(header, value)`.
    pub fn revoked_stamp(&self, request: &TaskRequest) -> Option<(String, Value)> {
        let revoked = self.revoked_stamps.lock().expect("state lock");
        revoked.matches(request).into_iter().next()
    }

    /// Whether `id` was revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked.lock().expect("state lock").1.contains(id)
    }

    /// Revoked ids, oldest first.
    pub fn revoked(&self) -> Vec<String> {
        self.revoked
            .lock()
            .expect("state lock")
            .0
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn request(name: &str) -> TaskRequest {
        TaskRequest::new(name, vec![json!(1)], Map::new())
    }

    #[test]
    fn requests_move_from_reserved_to_active_to_counted() {
        let state = WorkerState::new("w@h", Arc::default());
        let add = request("tasks.add");
        state.hold(&add, "celery");
        assert_eq!(state.infos(|p| *p == Phase::Reserved, false).len(), 1);
        state.activate(&add.id, true);
        let active = state.infos(|p| matches!(p, Phase::Active(_)), true);
        assert_eq!(active[0].1["args"], json!("(1,)"));
        assert_eq!(active[0].1["acknowledged"], json!(true));
        assert_eq!(state.active_count(), 1);
        state.release(&add.id);
        assert_eq!((state.active_count(), state.processed()), (0, 1));
        assert_eq!(state.totals().get("tasks.add"), Some(&1));
    }

    #[test]
    fn revoke_terminates_only_running_requests_lets_waiting_ones_go_and_is_bounded() {
        let state = WorkerState::new("w@h", Arc::default());
        let running = request("tasks.sleep");
        let waiting = request("tasks.sleep");
        let running_token = state.hold(&running, "celery");
        let waiting_token = state.hold(&waiting, "celery");
        state.activate(&running.id, true);
        let ids = vec![running.id.clone(), waiting.id.clone()];
        // Without `terminate` a running task goes on; a waiting one is let go at once.
        assert_eq!(state.revoke(&ids, false), Vec::<String>::new());
        assert!(!running_token.is_cancelled() && waiting_token.is_cancelled());
        assert_eq!(state.revoke(&ids, true), vec![running.id.clone()]);
        assert!(running_token.is_cancelled());
        assert!(state.is_revoked(&waiting.id));
        let many: Vec<String> = (0..REVOKES_MAX + 10).map(|i| i.to_string()).collect();
        state.revoke(&many, false);
        assert_eq!(state.revoked().len(), REVOKES_MAX);
        assert!(!state.is_revoked(&running.id));
    }
}
