//! RabbitMQ's native delayed delivery as Celery 5.5+ lays it out, without I/O: the topology to
//! declare and the routing key of a delayed message.
//!
//! A delay of up to 2^28 - 1 seconds is written as 28 binary digits in front of the routing
//! key (`0.0. ... .1.1.<routing key>`) and published to the topic exchange `celery_delayed_27`.
//! Level `n` is an exchange and a queue of its own: a message whose digit `n` is 1 waits in
//! queue `celery_delayed_n` for 2^n s (its message TTL) and is dead-lettered to level `n - 1`;
//! one whose digit is 0 passes straight down through an exchange-to-exchange binding. Below
//! level 0 the exchange `celery_delayed_delivery` hands it to the exchange of its destination
//! queue, which must route on the routing key's tail (a topic exchange: a direct one never
//! matches the digits). Nothing waits unacked in a worker, so RabbitMQ's `consumer_timeout`
//! never cuts a long countdown short.
//!
//! The names, arguments and binding keys are Celery's, so a Python worker and ours share one
//! topology: [`topology`] lists what to declare, the caller declares it.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::config::QueueType;

/// Digits of a delay: the longest is 2^28 - 1 seconds (about 8.5 years).
pub const LEVELS: u32 = 28;

/// The exchange a delayed message is published to.
pub const ENTRY_EXCHANGE: &str = "celery_delayed_27";

/// The exchange that hands a message whose delay is over to its destination's exchange.
pub const DELIVERY_EXCHANGE: &str = "celery_delayed_delivery";

/// The exchange and the queue of one level.
pub fn level_name(level: u32) -> String {
    format!("celery_delayed_{level}")
}

/// One thing to declare.
#[derive(Debug, Clone, PartialEq)]
pub enum Declare {
    /// A durable topic exchange.
    Exchange(String),
    /// A durable queue with these arguments.
    Queue {
        /// Its name.
        name: String,
        /// Its type, TTL and dead-lettering.
        arguments: FieldTable,
    },
    /// `queue` receives what `exchange` routes with `key`.
    BindQueue {
        /// The queue.
        queue: String,
        /// The exchange.
        exchange: String,
        /// The binding key.
        key: String,
    },
    /// `destination` receives what `source` routes with `key`.
    BindExchange {
        /// The exchange receiving.
        destination: String,
        /// The exchange routing.
        source: String,
        /// The binding key.
        key: String,
    },
}

/// Everything native delayed delivery needs, in an order RabbitMQ accepts (an exchange before
/// what is bound to it), with the delay queues of type `queue_type`.
pub fn topology(queue_type: QueueType) -> Vec<Declare> {
    let mut steps = Vec::new();
    // Level n's queue takes the messages whose digit n (counted from the right) is 1.
    for level in (0..LEVELS).rev() {
        let name = level_name(level);
        let dead_letter = match level {
            0 => DELIVERY_EXCHANGE.to_string(),
            _ => level_name(level - 1),
        };
        steps.push(Declare::Exchange(name.clone()));
        steps.push(Declare::Queue {
            name: name.clone(),
            arguments: level_arguments(level, queue_type, &dead_letter),
        });
        steps.push(Declare::BindQueue {
            queue: name.clone(),
            exchange: name,
            key: digit_key(level, "1"),
        });
    }
    // A 0 passes straight to the next level down (declared above, as the level's exchange).
    for level in (1..LEVELS).rev() {
        steps.push(Declare::BindExchange {
            destination: level_name(level - 1),
            source: level_name(level),
            key: digit_key(level, "0"),
        });
    }
    steps.push(Declare::Exchange(DELIVERY_EXCHANGE.to_string()));
    // Whatever leaves level 0 by its exchange has waited all it had to.
    steps.push(Declare::BindExchange {
        destination: DELIVERY_EXCHANGE.to_string(),
        source: level_name(0),
        key: digit_key(0, "0"),
    });
    steps
}

/// The bindings that bring a message whose delay is over back to `queue` through `exchange`
/// (which must be a topic exchange), routed by `routing_key`.
pub fn destination(queue: &str, exchange: &str, routing_key: &str) -> [Declare; 2] {
    // A key that already starts with a wildcard matches the digits itself.
    let key = match routing_key.starts_with('#') {
        true => routing_key.to_string(),
        false => format!("#.{routing_key}"),
    };
    [
        Declare::BindExchange {
            destination: exchange.to_string(),
            source: DELIVERY_EXCHANGE.to_string(),
            key: key.clone(),
        },
        Declare::BindQueue {
            queue: queue.to_string(),
            exchange: exchange.to_string(),
            key,
        },
    ]
}

/// The routing key of a message to be delivered with `routing_key` in `seconds` (whole seconds,
/// at least 1, less than 2^28), after any delay digits it already carries (a retried message
/// keeps its delivery's routing key) are taken off. `None` when the delay cannot be written.
pub fn routing_key(seconds: u64, routing_key: &str) -> Option<String> {
    if seconds == 0 || seconds >= 1 << LEVELS {
        return None;
    }
    let mut key = String::with_capacity(2 * LEVELS as usize + routing_key.len());
    for level in (0..LEVELS).rev() {
        key.push(if seconds >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(without_delay(routing_key));
    Some(key)
}

/// `routing_key` without a leading run of 28 delay digits.
fn without_delay(routing_key: &str) -> &str {
    let mut rest = routing_key;
    for _ in 0..LEVELS {
        match rest.as_bytes() {
            [b'0' | b'1', b'.', ..] => rest = &rest[2..],
            _ => return routing_key,
        }
    }
    rest
}

/// The binding key that matches digit `level` being `digit`: one `*` per digit before it.
fn digit_key(level: u32, digit: &str) -> String {
    let mut key = "*.".repeat((LEVELS - 1 - level) as usize);
    key.push_str(digit);
    key.push_str(".#");
    key
}

fn level_arguments(level: u32, queue_type: QueueType, dead_letter: &str) -> FieldTable {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut arguments = FieldTable::default();
    let kind = match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    arguments.insert(ShortString::from("x-queue-type"), text(kind));
    arguments.insert(ShortString::from("x-overflow"), text("reject-publish"));
    // py-amqp sends an int that fits 32 bits as a signed 32-bit field: the same type here, so
    // a Python worker's declaration of the same queue is equivalent to ours.
    let ttl_ms = (1i64 << level) * 1000;
    let ttl = i32::try_from(ttl_ms).map_or(AMQPValue::LongLongInt(ttl_ms), AMQPValue::LongInt);
    arguments.insert(ShortString::from("x-message-ttl"), ttl);
    arguments.insert(
        ShortString::from("x-dead-letter-exchange"),
        text(dead_letter),
    );
    if queue_type == QueueType::Quorum {
        // A message is never lost between two levels, even when a node fails.
        arguments.insert(
            ShortString::from("x-dead-letter-strategy"),
            text("at-least-once"),
        );
    }
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_are_28_digits_then_the_key() {
        assert_eq!(
            routing_key(5, "q").unwrap(),
            format!("{}1.0.1.q", "0.".repeat(25))
        );
        let longest = routing_key((1 << 28) - 1, "a.b").unwrap();
        assert_eq!(longest, format!("{}a.b", "1.".repeat(28)));
        assert_eq!(routing_key(0, "q"), None);
        assert_eq!(routing_key(1 << 28, "q"), None);
    }

    #[test]
    fn a_delayed_key_is_delayed_afresh_not_twice() {
        let once = routing_key(3, "q").unwrap();
        let again = routing_key(4, &once).unwrap();
        assert_eq!(again, routing_key(4, "q").unwrap());
        // Fewer than 28 digits are part of the key itself.
        assert_eq!(routing_key(1, "1.0.q").unwrap().matches('.').count(), 30);
    }

    #[test]
    fn every_level_waits_its_power_of_two_and_falls_to_the_next() {
        let steps = topology(QueueType::Quorum);
        let queues: Vec<_> = steps
            .iter()
            .filter_map(|step| match step {
                Declare::Queue { name, arguments } => Some((name.clone(), arguments.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(queues.len(), 28);
        let (name, arguments) = &queues[27];
        assert_eq!(name, "celery_delayed_0");
        let get = |key: &str| arguments.inner().get(key).cloned();
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongInt(1000)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("celery_delayed_delivery".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        let (name, arguments) = &queues[0];
        assert_eq!(name, "celery_delayed_27");
        assert_eq!(
            arguments.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt((1 << 27) * 1000))
        );
        assert!(topology(QueueType::Classic).iter().all(|step| !matches!(
            step, Declare::Queue { arguments, .. } if arguments.inner().contains_key("x-dead-letter-strategy")
        )));
    }

    #[test]
    fn binding_keys_pick_one_digit_each() {
        let steps = topology(QueueType::Quorum);
        assert!(steps.contains(&Declare::BindQueue {
            queue: "celery_delayed_27".into(),
            exchange: "celery_delayed_27".into(),
            key: "1.#".into(),
        }));
        assert!(steps.contains(&Declare::BindExchange {
            destination: "celery_delayed_26".into(),
            source: "celery_delayed_27".into(),
            key: "0.#".into(),
        }));
        assert!(steps.contains(&Declare::BindQueue {
            queue: "celery_delayed_0".into(),
            exchange: "celery_delayed_0".into(),
            key: format!("{}1.#", "*.".repeat(27)),
        }));
        assert_eq!(
            steps.last(),
            Some(&Declare::BindExchange {
                destination: DELIVERY_EXCHANGE.into(),
                source: "celery_delayed_0".into(),
                key: format!("{}0.#", "*.".repeat(27)),
            })
        );
        let [to_exchange, to_queue] = destination("q", "q", "q");
        assert!(matches!(to_exchange, Declare::BindExchange { key, .. } if key == "#.q"));
        assert!(matches!(to_queue, Declare::BindQueue { key, .. } if key == "#.q"));
    }
}
