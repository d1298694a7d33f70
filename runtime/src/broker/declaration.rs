//! How a queue and its exchange are declared on RabbitMQ, and how to learn how someone else
//! declared them, without I/O.
//!
//! RabbitMQ refuses a declaration that differs from the existing queue's or exchange's
//! (`PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received
//! none but current is the value 'quorum' of type 'longstr'`), naming one difference at a time
//! with the value it holds. [`Declaration::learn`] takes that value over, so declaring again
//! converges on the declaration as it stands, in one round trip per difference. AMQP itself
//! has no way to read a queue's arguments; this way needs no management API, and the worker
//! ends up knowing each queue's real arguments (quorum or not, for QoS and `active_queues`).

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Map, Value};

use crate::config::{CeleryConfig, QueueType};

/// The settings that shape what we declare: the type of each queue and exchange we create,
/// and whether quorum queues get native delayed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    default_queue: String,
    default_queue_type: QueueType,
    default_exchange_type: String,
    create_missing_queue_type: QueueType,
    create_missing_queue_exchange_type: String,
    /// The type of the delay queues, where quorum queues are looked for
    /// (`worker_detect_quorum_queues`); `None` where they are not.
    pub native_delayed_delivery: Option<QueueType>,
}

impl Topology {
    /// As `config` sets it.
    pub fn of(config: &CeleryConfig) -> Self {
        Self {
            default_queue: config.task_default_queue.clone(),
            default_queue_type: config.task_default_queue_type,
            default_exchange_type: config.task_default_exchange_type.clone(),
            create_missing_queue_type: config.task_create_missing_queue_type,
            create_missing_queue_exchange_type: config
                .task_create_missing_queue_exchange_type
                .clone()
                .unwrap_or_else(|| "direct".into()),
            native_delayed_delivery: config
                .worker_detect_quorum_queues
                .then_some(config.broker_native_delayed_delivery_queue_type),
        }
    }

    /// How we declare `queue` when it does not exist yet.
    pub fn declaration(&self, queue: &str) -> Declaration {
        let (queue_type, exchange_type) = match queue == self.default_queue {
            true => (self.default_queue_type, &self.default_exchange_type),
            false => (
                self.create_missing_queue_type,
                &self.create_missing_queue_exchange_type,
            ),
        };
        Declaration {
            exchange_type: exchange_type.clone(),
            ..Declaration::celery(queue_type)
        }
    }

    /// Whether messages for a queue declared as `declaration` wait out their ETA in the
    /// broker's delay queues: a quorum queue (the case Celery sets delayed delivery up for)
    /// behind an exchange that routes on the routing key's tail (not a direct one).
    pub fn delays_natively(&self, declaration: &Declaration) -> bool {
        self.native_delayed_delivery.is_some()
            && declaration.is_quorum()
            && declaration.exchange_type != "direct"
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::of(&CeleryConfig::default())
    }
}

/// What a queue, its exchange and the binding between them are declared with.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    /// The queue survives a broker restart.
    pub durable: bool,
    /// The queue goes when its last consumer does.
    pub auto_delete: bool,
    /// `x-queue-type`, `x-max-priority`, `x-message-ttl`, ... as the broker holds them.
    pub arguments: FieldTable,
    /// The type of the exchange of the queue's own name (`direct` as Celery makes it).
    pub exchange_type: String,
    /// The exchange survives a broker restart.
    pub exchange_durable: bool,
}

impl Declaration {
    /// A durable queue of `queue_type` behind a direct exchange, as Celery declares one.
    pub fn celery(queue_type: QueueType) -> Self {
        let mut arguments = FieldTable::default();
        if queue_type == QueueType::Quorum {
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        Self {
            durable: true,
            auto_delete: false,
            arguments,
            exchange_type: "direct".into(),
            exchange_durable: true,
        }
    }

    /// A durable classic queue behind a direct exchange, as [`Declaration::celery`], that goes
    /// `expires_ms` after its last consumer (`x-expires`): a named subscription's queue.
    pub fn expiring(expires_ms: u32) -> Self {
        let mut declaration = Self::celery(QueueType::Classic);
        declaration.arguments.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongUInt(expires_ms),
        );
        declaration
    }

    /// Whether the queue is a quorum queue (which refuses global QoS and keeps messages on a
    /// majority of a cluster's nodes).
    pub fn is_quorum(&self) -> bool {
        matches!(
            self.arguments.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(kind)) if kind.as_bytes() == b"quorum"
        )
    }

    /// The arguments as JSON, as `inspect active_queues` reports `queue_arguments` (`None`
    /// when there are none, as Celery shows a queue declared without).
    pub fn arguments_json(&self) -> Option<Map<String, Value>> {
        crate::protocol::amqp::table_to_json(&self.arguments)
            .filter(|arguments| !arguments.is_empty())
    }

    /// Takes over what a refusal says the existing queue or exchange holds. `false` when the
    /// refusal is not about a difference this can mend, or names what is already held (the
    /// caller then stops: declaring again would be refused again).
    pub fn learn(&mut self, refusal: &str) -> bool {
        let Some(difference) = Difference::parse(refusal) else {
            return false;
        };
        match (difference.object, difference.name.as_str()) {
            (Object::Exchange, "type") => {
                let Current::Word(kind) = difference.current else {
                    return false;
                };
                std::mem::replace(&mut self.exchange_type, kind) != self.exchange_type
            }
            (Object::Exchange, "durable") => {
                learn_flag(&mut self.exchange_durable, &difference.current)
            }
            (Object::Queue, "durable") => learn_flag(&mut self.durable, &difference.current),
            (Object::Queue, "auto_delete") => {
                learn_flag(&mut self.auto_delete, &difference.current)
            }
            (Object::Queue, name) if name.starts_with("x-") => {
                let key = ShortString::from(name);
                let held = self.arguments.inner().get(&key).cloned();
                let value = match difference.current {
                    Current::None => {
                        self.arguments = without(&self.arguments, name);
                        return held.is_some();
                    }
                    Current::Value(value) => value,
                    // `x-queue-type` is shown as a bare word when both sides set it.
                    Current::Word(word) => AMQPValue::LongString(LongString::from(word)),
                };
                let changed = held.as_ref() != Some(&value);
                self.arguments.insert(key, value);
                changed
            }
            _ => false,
        }
    }
}

fn learn_flag(flag: &mut bool, current: &Current) -> bool {
    let held = match current {
        Current::Word(word) if word == "true" => true,
        Current::Word(word) if word == "false" => false,
        _ => return false,
    };
    std::mem::replace(flag, held) != held
}

fn without(table: &FieldTable, name: &str) -> FieldTable {
    let mut kept = FieldTable::default();
    for (key, value) in table.inner() {
        if key.as_str() != name {
            kept.insert(key.clone(), value.clone());
        }
    }
    kept
}

/// Which kind of object a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    Queue,
    Exchange,
}

/// What the existing object holds for the differing field.
#[derive(Debug, Clone, PartialEq)]
enum Current {
    /// The argument is not set.
    None,
    /// A typed argument value (`the value '5' of type 'signedint'`).
    Value(AMQPValue),
    /// A bare word: a flag's `true`/`false`, an exchange's type.
    Word(String),
}

/// One difference named by a `PRECONDITION_FAILED` refusal.
#[derive(Debug, Clone, PartialEq)]
struct Difference {
    object: Object,
    name: String,
    current: Current,
}

impl Difference {
    fn parse(refusal: &str) -> Option<Self> {
        let rest = refusal.split_once("inequivalent arg '")?.1;
        let (name, rest) = rest.split_once("' for ")?;
        let object = if rest.starts_with("queue ") {
            Object::Queue
        } else if rest.starts_with("exchange ") {
            Object::Exchange
        } else {
            return None;
        };
        let current = rest.rsplit_once(" but current is ")?.1.trim_end();
        let current = if current == "none" {
            Current::None
        } else if let Some(typed) = current.strip_prefix("the value '") {
            let (value, kind) = typed.rsplit_once("' of type '")?;
            Current::Value(typed_value(value, kind.strip_suffix('\'')?)?)
        } else {
            Current::Word(current.strip_prefix('\'')?.strip_suffix('\'')?.to_string())
        };
        Some(Self {
            object,
            name: name.to_string(),
            current,
        })
    }
}

/// A value as RabbitMQ prints it with its field type's name. Tables and arrays are not
/// readable back from the text: an argument of those types cannot be learnt.
fn typed_value(text: &str, kind: &str) -> Option<AMQPValue> {
    Some(match kind {
        "longstr" => AMQPValue::LongString(LongString::from(text)),
        "bool" => AMQPValue::Boolean(text.parse().ok()?),
        "byte" => AMQPValue::ShortShortInt(text.parse().ok()?),
        "unsignedbyte" => AMQPValue::ShortShortUInt(text.parse().ok()?),
        "short" => AMQPValue::ShortInt(text.parse().ok()?),
        "unsignedshort" => AMQPValue::ShortUInt(text.parse().ok()?),
        "signedint" => AMQPValue::LongInt(text.parse().ok()?),
        "unsignedint" => AMQPValue::LongUInt(text.parse().ok()?),
        "long" => AMQPValue::LongLongInt(text.parse().ok()?),
        "timestamp" => AMQPValue::Timestamp(text.parse().ok()?),
        "float" => AMQPValue::Float(text.parse().ok()?),
        "double" => AMQPValue::Double(text.parse().ok()?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(detail: &str) -> String {
        format!("PRECONDITION_FAILED - inequivalent arg {detail}")
    }

    #[test]
    fn the_default_queue_and_missing_ones_follow_their_settings() {
        let config = CeleryConfig {
            task_default_queue_type: QueueType::Quorum,
            task_default_exchange_type: "topic".into(),
            ..CeleryConfig::default()
        };
        let topology = Topology::of(&config);
        let default = topology.declaration("celery");
        assert!(default.is_quorum() && default.exchange_type == "topic");
        assert!(topology.delays_natively(&default));
        let missing = topology.declaration("other");
        assert!(!missing.is_quorum() && missing.exchange_type == "direct");
        assert!(!topology.delays_natively(&missing));
        let undetected = Topology::of(&CeleryConfig {
            worker_detect_quorum_queues: false,
            ..config
        });
        assert!(!undetected.delays_natively(&default));
    }

    #[test]
    fn learns_a_quorum_queue_declared_by_someone_else() {
        let mut declaration = Declaration::celery(QueueType::Classic);
        assert!(!declaration.is_quorum());
        assert!(declaration.learn(&refusal(
            "'x-queue-type' for queue 'q' in vhost '/': received none but current is the value 'quorum' of type 'longstr'"
        )));
        assert!(declaration.is_quorum());
        assert_eq!(
            declaration.arguments_json(),
            serde_json::json!({"x-queue-type": "quorum"})
                .as_object()
                .cloned()
        );
    }

    #[test]
    fn learns_a_queue_type_shown_as_a_bare_word() {
        let mut declaration = Declaration::celery(QueueType::Classic);
        declaration.arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        assert!(declaration.learn(&refusal(
            "'x-queue-type' for queue 'q' in vhost '/': received 'classic' but current is 'quorum'"
        )));
        assert!(declaration.is_quorum());
    }

    #[test]
    fn learns_typed_values_and_drops_what_the_queue_lacks() {
        let mut declaration = Declaration::celery(QueueType::Quorum);
        assert!(declaration.learn(&refusal(
            "'x-message-ttl' for queue 'q' in vhost '/': received none but current is the value '60000' of type 'signedint'"
        )));
        assert!(declaration.learn(&refusal(
            "'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none"
        )));
        assert_eq!(
            declaration.arguments.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongInt(60000))
        );
        assert!(!declaration.is_quorum());
        assert_eq!(declaration.arguments.inner().len(), 1);
    }

    #[test]
    fn learns_flags_and_the_exchange_type() {
        let mut declaration = Declaration::celery(QueueType::Classic);
        assert!(declaration.learn(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'"
        ));
        assert!(!declaration.durable);
        assert!(declaration.learn(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'q' in vhost '/': received 'direct' but current is 'topic'"
        ));
        assert_eq!(declaration.exchange_type, "topic");
        assert!(declaration.learn(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'q' in vhost '/': received 'true' but current is 'false'"
        ));
        assert!(!declaration.exchange_durable && !declaration.durable);
    }

    #[test]
    fn stops_where_nothing_can_be_learnt() {
        let mut declaration = Declaration::celery(QueueType::Classic);
        // Already holds what the refusal names: declaring again would be refused again.
        assert!(!declaration.learn(&refusal(
            "'x-queue-type' for queue 'q' in vhost '/': received none but current is none"
        )));
        // A table cannot be read back from the text.
        assert!(!declaration.learn(&refusal(
            "'x-args' for queue 'q' in vhost '/': received none but current is the value '[{<<\"a\">>,long,1}]' of type 'table'"
        )));
        assert!(!declaration.learn("NOT_FOUND - no queue 'q' in vhost '/'"));
        assert!(!declaration.learn(&refusal(
            "'exclusive' for queue 'q' in vhost '/': received 'true' but current is 'false'"
        )));
        assert_eq!(declaration, Declaration::celery(QueueType::Classic));
    }
}
