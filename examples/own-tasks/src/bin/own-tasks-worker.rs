//! A worker node running this crate's tasks, with `celery worker`'s options.

fn main() -> anyhow::Result<()> {
    Ok(runtime::command::worker::main(own_tasks::registry)?)
}
