//! The links the API's answers give: where a job or workflow is polled. A leaf, so that the
//! routes and the error answers (a 409 names the holder's status) both point the same way.

/// Where the job or workflow `id` is polled.
pub fn status_url(id: impl std::fmt::Display) -> String {
    format!("/status/{id}")
}
