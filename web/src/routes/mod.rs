//! The HTTP API: one module per resource, handlers a few lines long over typed guards.

pub mod docs;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod queues;
pub mod receive;
pub mod status;
pub mod stream;
pub mod tasks;

/// Every route of the API.
pub fn all() -> Vec<rocket::Route> {
    rocket::routes![
        receive::receive,
        status::status,
        stream::stream,
        tasks::list,
        queues::queues,
        health::health,
        metrics::metrics,
        openapi::openapi_json,
        docs::docs
    ]
}
