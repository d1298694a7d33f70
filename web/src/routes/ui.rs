//! `GET /ui`: a page for people over the task history: the tasks table with its filters and
//! pages, a task's timeline, and tasks per minute of each name over the last hour. It is one
//! self-contained file (`ui.html`, inline CSS and JS, no external asset) that reads the JSON
//! routes (`/history`, `/history/throughput`, `/workers`, `/status/<id>`).
//!
//! The page is open, as `/docs` is: it holds no data, and a browser cannot put a bearer token on
//! a page it navigates to. The routes it reads need the token as always: the page asks for it
//! when one answers 401 and keeps it in the tab's `sessionStorage`.

use rocket::response::content::RawHtml;

/// The page.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "history",
    responses((status = 200, description = "an HTML page that reads the history routes and \
        shows the tasks (filters, pages), a task's timeline, and each task name's tasks per \
        minute over the last hour", content_type = "text/html", body = String)),
)]
#[rocket::get("/ui")]
pub fn ui() -> RawHtml<&'static str> {
    RawHtml(include_str!("ui.html"))
}
