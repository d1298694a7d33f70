//! `worker`: runs the Rust tasks as a Celery worker node, with `celery worker`'s options
//! ([`runtime::command::worker`]).

fn main() -> anyhow::Result<()> {
    Ok(runtime::command::worker::main(tasks::registry)?)
}
