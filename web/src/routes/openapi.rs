//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated from the handlers'
//! `#[utoipa::path]` attributes and the answer types' `ToSchema` derives, so it says what the
//! code does. Open like `/health`: it describes the API, not any job.

use std::sync::LazyLock;

use rocket::http::ContentType;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{DatabaseUnavailable, Unauthorized};

/// The document but for its paths ([`super::Paths`], from the one list of routes): what it is,
/// its shared responses, security scheme and tags.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "rcelery web",
        description = "Jobs in over HTTP, out to Celery workers (ours or Python's), tracked in \
            PostgreSQL. Errors are JSON `{\"error\": \"...\"}`."
    ),
    components(responses(Unauthorized, DatabaseUnavailable)),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "submit jobs and workflows, follow them"),
        (name = "history", description = "every task and worker of the cluster, as the monitor \
            recorded them from its events"),
        (name = "operations", description = "health, queues and metrics"),
        (name = "api", description = "this document and its page"),
    )
)]
pub struct ApiDoc;

/// The `bearer` security scheme the job routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "Needed only when the deployment sets `web_auth_token` (the shared token) or \
                 `web_jwt_secret` (a JWT signed HS256 with it, `exp` required); otherwise the \
                 routes are open. A refusal is a plain 401 `{\"error\": \"Unauthorized\"}`.",
            ))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document as served, made once: utoipa's, with the `POST /receive` body's schemas, which
/// are JSON Schema written by hand (see [`crate::submission::body_schemas`]).
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    let mut document = ApiDoc::openapi();
    document.merge(super::Paths::openapi());
    let mut document = serde_json::to_value(document).expect("the document is JSON");
    let schemas = document["components"]["schemas"]
        .as_object_mut()
        .expect("the document has schemas");
    schemas.extend(crate::submission::body_schemas());
    document.to_string()
});

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "api",
    responses((status = 200, description = "the OpenAPI 3.1 document of this API",
        content_type = "application/json", body = Object)),
)]
#[rocket::get("/openapi.json")]
pub fn openapi_json() -> (ContentType, &'static str) {
    (ContentType::JSON, DOCUMENT.as_str())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn document() -> Value {
        serde_json::from_str(&DOCUMENT).unwrap()
    }

    /// `/status/<id>` as OpenAPI writes it: `/status/{id}`.
    fn openapi_path(rocket_path: &str) -> String {
        rocket_path.replace('<', "{").replace('>', "}")
    }

    #[test]
    fn every_mounted_route_is_documented_and_nothing_else() {
        let rocket = crate::mount(rocket::build());
        let mut mounted = BTreeSet::new();
        let mut mounted_queries = BTreeSet::new();
        for route in rocket.routes() {
            let path = openapi_path(route.uri.path());
            let method = route.method.as_str().to_lowercase();
            for query in route
                .uri
                .query()
                .into_iter()
                .map(|q| q.to_string())
                .collect::<Vec<_>>()
                .iter()
                .flat_map(|q| q.split('&'))
            {
                mounted_queries.insert((path.clone(), method.clone(), openapi_path(query)));
            }
            mounted.insert((path, method));
        }
        let mut documented = BTreeSet::new();
        let mut documented_queries = BTreeSet::new();
        for (path, operations) in document()["paths"].as_object().unwrap() {
            for (method, operation) in operations.as_object().unwrap() {
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    if parameter["in"] == "query" {
                        let name = format!("{{{}}}", parameter["name"].as_str().unwrap());
                        documented_queries.insert((path.clone(), method.clone(), name));
                    }
                }
                documented.insert((path.clone(), method.clone()));
            }
        }
        assert_eq!(mounted, documented);
        assert_eq!(mounted_queries, documented_queries);
        assert!(mounted.contains(&("/status/{id}".into(), "get".into())));
    }

    #[test]
    fn the_job_routes_need_the_bearer_scheme_and_the_open_ones_do_not() {
        let document = document();
        assert_eq!(
            document["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        for (path, operations) in document["paths"].as_object().unwrap() {
            for operation in operations.as_object().unwrap().values() {
                let open = ["/health", "/metrics", "/openapi.json", "/docs", "/ui"]
                    .contains(&path.as_str());
                let security = &operation["security"];
                if open {
                    assert!(security.is_null(), "{path}: {security}");
                } else {
                    assert_eq!(security, &serde_json::json!([{"bearer": []}]), "{path}");
                    assert!(operation["responses"]["401"].is_object(), "{path}");
                }
            }
        }
    }

    #[test]
    fn the_receive_body_schemas_are_served_whole() {
        let schemas = &document()["components"]["schemas"];
        for (name, schema) in crate::submission::body_schemas() {
            assert_eq!(schemas[&name], schema, "{name}");
        }
        let body = &document()["paths"]["/receive"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/Submission");
        let one_of = &schemas["Submission"];
        let branches = one_of["oneOf"].as_array().unwrap();
        assert_eq!(branches.len(), 4, "{one_of}");
        assert_eq!(
            branches[3]["not"]["anyOf"],
            serde_json::json!([
                {"required": ["task"]},
                {"required": ["chain"], "maxProperties": 1, "properties": {"chain": {"type": "array"}}},
                {"required": ["group"], "maxProperties": 1, "properties": {"group": {"type": "array"}}},
            ])
        );
    }
}
