//! `GET /docs`: a page that renders `/openapi.json` for people. It is one self-contained file
//! (`docs.html`, inline CSS and JS, no external asset), so it works where there is no Internet.

use rocket::response::content::RawHtml;

/// The page.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "api",
    responses((status = 200, description = "an HTML page that reads `/openapi.json` and shows \
        every route, its parameters, bodies and answers, and the schemas",
        content_type = "text/html", body = String)),
)]
#[rocket::get("/docs")]
pub fn docs() -> RawHtml<&'static str> {
    RawHtml(include_str!("docs.html"))
}
