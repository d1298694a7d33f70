//! What a queue name may be so that both brokers and Celery take it: AMQP's short-string
//! length, the characters every transport and kombu's Redis key layout leave alone, and the names
//! RabbitMQ and kombu keep for themselves. Pure: the settings, the web app and the brokers all
//! check names here before any I/O.

/// Longest queue name, exchange name or routing key AMQP can carry (a short string).
pub const MAX_NAME_BYTES: usize = super::amqp::SHORT_STRING_MAX;

/// What a queue name may hold besides ASCII letters and digits (last, `-` may close a regular
/// expression's character class as it is).
pub const QUEUE_NAME_PUNCTUATION: &str = "._:@-";

/// Why `name` cannot name a queue for both brokers and Celery, or `None` when it can: it must
/// be 1 to [`MAX_NAME_BYTES`] bytes of letters, digits and `.` `_` `-` `:` `@`, must not take
/// RabbitMQ's reserved `amq.` prefix, and must not be one of kombu's own Redis keys (`unacked`,
/// `unacked_index`, `unacked_mutex`, `_kombu.*`), where a queue's list would meet another type.
pub fn queue_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Some(format!("a queue name has 1 to {MAX_NAME_BYTES} bytes"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || QUEUE_NAME_PUNCTUATION.contains(*c)))
    {
        return Some(format!(
            "a queue name has letters, digits and . _ - : @ only, not {bad:?}"
        ));
    }
    if name.starts_with("amq.") {
        return Some("the amq. prefix is RabbitMQ's own".into());
    }
    if matches!(name, "unacked" | "unacked_index" | "unacked_mutex") || name.starts_with("_kombu.")
    {
        return Some(format!("{name} is a key of kombu's own on Redis"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_follow_celerys_and_both_brokers_rules() {
        for good in ["celery", "interop-1a2b-events", "tasks.heavy", "host:1@x_y"] {
            assert_eq!(queue_name_problem(good), None, "{good}");
        }
        let long = "q".repeat(MAX_NAME_BYTES + 1);
        for bad in [
            "",
            &long,
            "amq.x",
            "unacked",
            "_kombu.binding.celery",
            "a b",
            "q\u{6}\u{16}3",
            "é",
        ] {
            assert!(queue_name_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(queue_name_problem(&long[1..]), None);
    }
}
