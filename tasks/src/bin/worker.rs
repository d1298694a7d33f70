//! `worker`: runs the Rust tasks as a Celery worker node (`celery worker` options).

fn main() -> anyhow::Result<()> {
    Ok(runtime::node::main(tasks::registry)?)
}
