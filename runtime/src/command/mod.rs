//! The commands a deployment runs, each whole behind one function its binary calls, so that a
//! crate with tasks of its own gets Celery's command line in a few lines:
//!
//! ```no_run
//! fn main() -> Result<(), runtime::Error> {
//!     runtime::command::worker::main(|| runtime::registry::Registry::new())
//! }
//! ```
//!
//! - [`worker`]: runs the tasks of a registry as a worker node (`celery worker`).
//! - [`beat`]: sends the periodic tasks of `beat_schedule` (`celery beat`).
//! - [`call`]: sends a task or a canvas by name and may wait for its result (`celery call`).

pub mod beat;
pub mod call;
pub mod worker;
