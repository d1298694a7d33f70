//! `beat`: sends the periodic tasks of `beat_schedule` on time, like `celery beat`
//! ([`runtime::command::beat`]).

fn main() -> anyhow::Result<()> {
    Ok(runtime::command::beat::main()?)
}
