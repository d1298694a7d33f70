//! `print_unicode`: a task that logs and prints text beyond ASCII.

use celery::task::TaskResult;
use runtime::registry::Registry;

pub(crate) fn register(registry: Registry) -> Registry {
    registry.task::<print_unicode>()
}

/// Logs `log_message` as a warning and prints `print_message`, returning nothing.
#[celery::task(name = "t.integration.tasks.print_unicode")]
pub fn print_unicode(log_message: Option<String>, print_message: Option<String>) -> TaskResult<()> {
    let log_message = log_message.unwrap_or_else(|| "håå®ƒ valmuefrø".into());
    tracing::warn!("{log_message}");
    println!("{}", print_message.as_deref().unwrap_or("hiöäüß"));
    Ok(())
}
