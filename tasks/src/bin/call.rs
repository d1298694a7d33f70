//! `call`: sends a Celery task by name or a canvas, and may wait for the result
//! ([`runtime::command::call`]).

fn main() -> anyhow::Result<std::process::ExitCode> {
    Ok(runtime::command::call::main()?)
}
