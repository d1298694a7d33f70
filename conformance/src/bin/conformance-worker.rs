//! `conformance-worker`: a worker node running the ported tasks of Celery's integration suite,
//! with the product worker's options.

fn main() -> anyhow::Result<()> {
    Ok(runtime::command::worker::main(conformance::registry)?)
}
