//! The HTTP API: one module per resource, handlers a few lines long over typed guards.

pub mod docs;
pub mod health;
pub mod history;
pub mod metrics;
pub mod openapi;
pub mod paging;
pub mod queues;
pub mod receive;
pub mod status;
pub mod stream;
pub mod tasks;
pub mod throughput;
pub mod ui;
pub mod workers;

/// Lists the routes once, for both Rocket and the API document, so that a route cannot be
/// mounted and left out of the document, or documented and not mounted.
macro_rules! every_route {
    ($($module:ident :: $handler:ident),+ $(,)?) => {
        /// Every route of the API.
        pub fn all() -> Vec<rocket::Route> {
            rocket::routes![$($module::$handler),+]
        }

        /// The document's paths: every route's `#[utoipa::path]`.
        #[derive(utoipa::OpenApi)]
        #[openapi(paths($($module::$handler),+))]
        pub struct Paths;
    };
}

every_route!(
    receive::receive,
    status::status,
    stream::stream,
    tasks::list,
    history::history,
    throughput::throughput,
    workers::workers,
    queues::queues,
    health::health,
    metrics::metrics,
    openapi::openapi_json,
    docs::docs,
    ui::ui,
);
