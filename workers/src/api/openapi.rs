//! The public API as an OpenAPI 3.1 document, generated from the code that
//! serves it, at `GET /api/v1/openapi.json`, rendered at `GET /api/docs`.
//!
//! A public handler carries its `#[utoipa::path]` and is registered with
//! `utoipa_axum::routes!`, so a route and its description are one item and
//! cannot drift apart (see [`super::public_routes`]). [`document`] then
//! adds what no single handler owns:
//!
//! ```text
//! handlers' paths (public_routes)
//!   → the seckill route, answered by the gateway's rule: described from
//!     seckill_contracts::admission_answers, the table the rule is tested against
//!   → the answers every operation shares, by what it takes: 401 with a
//!     bearer token, 400/413/415 with a JSON body, 500 and 503 everywhere
//!   → links between operations: the buyer's journey, for generated
//!     clients and for schemathesis' stateful tests
//! ```
//!
//! The page at `/api/docs` is Redoc, vendored with its licence under
//! `web/api/docs/` and served by the gateway from memory (a `files` route),
//! so the docs need no CDN; it is described here like the seckill route.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use seckill_contracts::admission_answers::{AdmissionAnswer, ANSWERS};
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi as Document, Ref, RefOr, Required};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::PROBLEM_CONTENT_TYPE;
use super::ApiState;

/// The security scheme's name: `Authorization: Bearer <RS256 JWT>`.
pub const BEARER: &str = "bearer";

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api/v1/openapi.json";

/// The operation tags, one per part of the buyer's journey.
pub mod tags {
    pub const AUTH: &str = "auth";
    pub const SALES: &str = "sales";
    pub const SECKILL: &str = "seckill";
    pub const ORDERS: &str = "orders";
    pub const KEYS: &str = "keys";
    pub const DOCS: &str = "docs";
}

/// The seckill route's path (its parameters are named as the gateway's
/// route table names them).
pub const SECKILL_PATH: &str = "/api/v1/seckill/{path}/{sale_id}";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Flash-sale API",
        description = "Buy a limited stock within a time window without overselling: \
            register and log in, watch a sale, solve its captcha to get a hidden path, \
            then POST the seckill request and poll the result; pay or cancel the order. \
            Errors are application/problem+json (RFC 9457). Money is integer cents, \
            times are RFC 3339 UTC.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "auth", description = "Accounts and access tokens (RS256 JWT)."),
        (name = "sales", description = "Sales, their captcha, the hidden path and the buyer's result."),
        (name = "seckill", description = "The purchase attempt, answered at the edge."),
        (name = "orders", description = "The buyer's own orders: pay and cancel."),
        (name = "keys", description = "The public keys tokens are verified with."),
        (name = "docs", description = "This document and its rendering."),
    ),
    components(schemas(super::problem::ProblemBody)),
    modifiers(&BearerScheme),
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An RS256 access token from POST /api/v1/auth/login."))
                    .build(),
            ),
        );
    }
}

/// The document's skeleton (info, tags, the problem schema, the security
/// scheme) for [`super::public_routes`] to add the handlers' paths to.
pub fn skeleton() -> Document {
    ApiDoc::openapi()
}

/// The document and the docs page, themselves public routes.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(openapi_document))
}

/// The whole document: the handlers' paths plus what no handler owns.
pub fn document() -> serde_json::Value {
    let mut doc = super::public_routes().into_openapi();
    // The wallet service's public route: the gateway serves it under the
    // same API.
    doc.merge(crate::wallet::routes::public_routes().into_openapi());
    doc.paths
        .paths
        .insert(SECKILL_PATH.to_string(), seckill_path_item());
    for (path, item) in docs_path_items() {
        doc.paths.paths.insert(path.to_string(), item);
    }
    doc.components
        .get_or_insert_with(Default::default)
        .schemas
        .insert("Queued".to_string(), RefOr::T(queued_schema()));
    problems_as_problem_json(&mut doc);
    add_shared_responses(&mut doc);
    // The document is plain data built from literals; it always serialises.
    let mut doc = serde_json::to_value(&doc).unwrap_or_default();
    add_links(&mut doc);
    doc
}

static DOCUMENT_JSON: LazyLock<String> =
    LazyLock::new(|| serde_json::to_string_pretty(&document()).unwrap_or_default());

/// The document as served, pretty-printed JSON.
pub fn document_json() -> &'static str {
    DOCUMENT_JSON.as_str()
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "docs",
    operation_id = "get_openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
async fn openapi_document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// The rendered reference, files the gateway serves from `web/api/docs/`
/// (Redoc, vendored with its licence).
fn docs_path_items() -> [(&'static str, PathItem); 2] {
    let page = |path, id, summary, media_type| {
        let op = OperationBuilder::new()
            .tag(tags::DOCS)
            .operation_id(Some(id))
            .summary(Some(summary))
            .response(
                "200",
                ResponseBuilder::new().description(summary).content(
                    media_type,
                    ContentBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                        .build(),
                ),
            )
            .response(
                "304",
                ResponseBuilder::new().description("Unchanged (If-None-Match)"),
            )
            .build();
        (path, PathItem::new(HttpMethod::Get, op))
    };
    [
        page(
            "/api/docs",
            "get_docs",
            "The API reference page",
            "text/html",
        ),
        page(
            "/api/docs/redoc.standalone.js",
            "get_docs_script",
            "The page's renderer (Redoc's standalone bundle, MIT)",
            "text/javascript",
        ),
    ]
}

/// `POST /api/v1/seckill/{path}/{sale_id}`: one response per status, each
/// listing its outcomes from [`ANSWERS`].
fn seckill_path_item() -> PathItem {
    let mut by_status: BTreeMap<u16, Vec<&AdmissionAnswer>> = BTreeMap::new();
    for a in ANSWERS {
        by_status.entry(a.status).or_default().push(a);
    }
    let mut op = OperationBuilder::new()
        .tag(tags::SECKILL)
        .operation_id(Some("seckill"))
        .summary(Some("Try to buy one unit of a sale"))
        .description(Some(
            "Answered by the gateway: the sale's window and stock, the hidden path from \
             POST /api/v1/sales/{id}/path, the buyer's attempt limit and a duplicate check, \
             then one unit is reserved and the order queued. 202 means queued, not bought: \
             poll GET /api/v1/sales/{id}/result. At most one order per buyer and sale.",
        ))
        .parameter(
            ParameterBuilder::new()
                .name("path")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The hidden path issued to this buyer for this sale"))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some("^[0-9a-f]{32}$")),
                )),
        )
        .parameter(sale_id_parameter())
        .security(SecurityRequirement::new(BEARER, Vec::<String>::new()));
    for (status, answers) in by_status {
        op = op.response(status.to_string(), seckill_response(status, &answers));
    }
    PathItem::new(HttpMethod::Post, op.build())
}

fn seckill_response(status: u16, answers: &[&AdmissionAnswer]) -> ApiResponse {
    let lines: Vec<String> = answers
        .iter()
        .map(|a| {
            let detail = if a.detail.is_empty() {
                String::new()
            } else {
                format!(": \"{}\"", a.detail)
            };
            format!("- `{}`: {}{detail}", a.outcome, a.when)
        })
        .collect();
    let mut response = ResponseBuilder::new().description(lines.join("\n"));
    response = if status == 202 {
        response.content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Queued")))
                .build(),
        )
    } else {
        response.content(PROBLEM_CONTENT_TYPE, problem_content())
    };
    if answers.iter().any(|a| a.retry_after) {
        response = response.header("Retry-After", retry_after_header());
    }
    response.build()
}

/// The 202 body the rule writes.
fn queued_schema() -> Schema {
    ObjectBuilder::new()
        .description(Some(
            "The attempt is queued: a unit is reserved and the order is on its way",
        ))
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["queued"])),
        )
        .property(
            "request_id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("Names this attempt in logs and in the order")),
        )
        .required("status")
        .required("request_id")
        .into()
}

/// The seckill route's `{sale_id}`: the sale routes' `{id}` (one
/// description, one bound) under the name the gateway's route uses.
fn sale_id_parameter() -> utoipa::openapi::path::Parameter {
    use utoipa::IntoParams;
    let mut params = super::problem::SaleIdParam::into_params(|| Some(ParameterIn::Path));
    let mut param = params.remove(0);
    param.name = "sale_id".to_string();
    param
}

fn problem_content() -> utoipa::openapi::content::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build()
}

fn retry_after_header() -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1)),
        )
        .description(Some("Seconds to wait before retrying"))
        .build()
}

fn problem_response(description: &str) -> ApiResponse {
    ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_CONTENT_TYPE, problem_content())
        .build()
}

/// A handler writes `body = ProblemBody` for an error answer; its media
/// type is `application/problem+json`, as the `Problem` type serves it.
fn problems_as_problem_json(doc: &mut Document) {
    for item in doc.paths.paths.values_mut() {
        for op in operations_mut(item) {
            for response in op.responses.responses.values_mut() {
                let RefOr::T(response) = response else {
                    continue;
                };
                let is_problem = response.content.get("application/json").is_some_and(|c| {
                    matches!(&c.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"))
                });
                if is_problem {
                    if let Some(content) = response.content.shift_remove("application/json") {
                        response
                            .content
                            .insert(PROBLEM_CONTENT_TYPE.to_string(), content);
                    }
                }
            }
        }
    }
}

/// The shared answers, defined once under `components/responses`.
const SHARED: &[(&str, &str, &str)] = &[
    (
        "400",
        "BadRequest",
        "The request is malformed or invalid; nothing changed",
    ),
    (
        "401",
        "Unauthorized",
        "The bearer token is missing, malformed, expired, wrongly signed or not RS256",
    ),
    (
        "413",
        "PayloadTooLarge",
        "The request body is larger than accepted",
    ),
    (
        "415",
        "UnsupportedMediaType",
        "The body is not application/json",
    ),
    (
        "500",
        "InternalError",
        "An unexpected failure; nothing is revealed about it",
    ),
    (
        "503",
        "Unavailable",
        "A dependency of this route is not available; retry later",
    ),
];

/// Adds the shared answers each operation can give, unless the operation
/// documents that status itself.
fn add_shared_responses(doc: &mut Document) {
    let components = doc.components.get_or_insert_with(Default::default);
    for (status, name, description) in SHARED {
        let mut response = problem_response(description);
        if *status == "401" {
            response.headers.insert(
                "WWW-Authenticate".into(),
                HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::String))
                    .description(Some("`Bearer`, with the error (RFC 6750)"))
                    .build(),
            );
        }
        components
            .responses
            .insert((*name).to_string(), RefOr::T(response));
    }
    for item in doc.paths.paths.values_mut() {
        for op in operations_mut(item) {
            let authenticated = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let json_body = op
                .request_body
                .as_ref()
                .is_some_and(|b| b.content.contains_key("application/json"));
            for (status, name, _) in SHARED {
                let applies = match *status {
                    "401" => authenticated,
                    "400" | "413" | "415" => json_body,
                    _ => true,
                };
                if applies {
                    op.responses
                        .responses
                        .entry((*status).to_string())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
                }
            }
        }
    }
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// One link: from `(operation, status)` to `target`, with its parameters
/// as runtime expressions.
struct Link {
    from: &'static str,
    status: &'static str,
    name: &'static str,
    target: &'static str,
    parameters: &'static [(&'static str, &'static str)],
    request_body: Option<&'static str>,
}

const fn link(
    (from, status): (&'static str, &'static str),
    name: &'static str,
    target: &'static str,
    parameters: &'static [(&'static str, &'static str)],
) -> Link {
    Link {
        from,
        status,
        name,
        target,
        parameters,
        request_body: None,
    }
}

/// The buyer's journey as links (OpenAPI 3.1 §4.8.20).
const LINKS: &[Link] = &[
    Link {
        request_body: Some(
            r#"{"username": "$request.body#/username", "password": "$request.body#/password"}"#,
        ),
        ..link(("register", "201"), "Login", "login", &[])
    },
    link(
        ("list_sales", "200"),
        "GetSale",
        "get_sale",
        &[("id", "$response.body#/0/id")],
    ),
    link(
        ("get_sale", "200"),
        "GetCaptcha",
        "get_captcha",
        &[("id", "$response.body#/id")],
    ),
    link(
        ("get_captcha", "200"),
        "IssuePath",
        "issue_path",
        &[("id", "$request.path.id")],
    ),
    link(
        ("issue_path", "200"),
        "Seckill",
        "seckill",
        &[
            ("path", "$response.body#/path"),
            ("sale_id", "$request.path.id"),
        ],
    ),
    link(
        ("seckill", "202"),
        "GetResult",
        "get_result",
        &[("id", "$request.path.sale_id")],
    ),
    link(
        ("get_result", "200"),
        "GetOrder",
        "get_order",
        &[("id", "$response.body#/order_id")],
    ),
    link(
        ("get_order", "200"),
        "PayOrder",
        "pay_order",
        &[("id", "$response.body#/id")],
    ),
    link(
        ("get_order", "200"),
        "CancelOrder",
        "cancel_order",
        &[("id", "$response.body#/id")],
    ),
    link(
        ("list_orders", "200"),
        "GetOrder",
        "get_order",
        &[("id", "$response.body#/0/id")],
    ),
    link(
        ("get_idempotency_key", "200"),
        "PayOrder",
        "pay_order",
        &[("header.Idempotency-Key", "$response.body#/key")],
    ),
];

/// Writes [`LINKS`] into the serialised document. Done on the JSON, not on
/// utoipa's `Link` type: utoipa 5 serialises that type's fields in
/// snake_case (`operation_id`), which no OpenAPI tool reads.
fn add_links(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for link in LINKS {
        let response = paths
            .values_mut()
            .filter_map(|item| item.as_object_mut())
            .flat_map(|item| item.values_mut())
            .find(|op| op.get("operationId").and_then(|i| i.as_str()) == Some(link.from))
            .and_then(|op| op.pointer_mut(&format!("/responses/{}", link.status)));
        let Some(response) = response.and_then(|r| r.as_object_mut()) else {
            continue;
        };
        let mut built = serde_json::json!({ "operationId": link.target });
        if !link.parameters.is_empty() {
            let parameters: serde_json::Map<String, serde_json::Value> = link
                .parameters
                .iter()
                .map(|(name, expr)| ((*name).to_string(), (*expr).into()))
                .collect();
            built["parameters"] = parameters.into();
        }
        if let Some(body) = link.request_body {
            built["requestBody"] = serde_json::from_str(body).unwrap_or_default();
        }
        let links = response
            .entry("links")
            .or_insert_with(|| serde_json::json!({}));
        links[link.name] = built;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// (operationId, operation) of every operation.
    fn operations(doc: &Value) -> Vec<(String, Value)> {
        let mut ops: Vec<(String, Value)> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values().cloned())
            .map(|op| (op["operationId"].as_str().unwrap_or("").to_string(), op))
            .collect();
        ops.sort_by(|a, b| a.0.cmp(&b.0));
        ops
    }

    #[test]
    fn every_operation_has_a_unique_id_a_tag_and_a_problem_for_500() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let ops = operations(&doc);
        let mut ids: Vec<&str> = ops.iter().map(|(id, _)| id.as_str()).collect();
        ids.dedup();
        assert_eq!(ids.len(), ops.len(), "operation ids are unique");
        for (id, op) in &ops {
            assert!(!id.is_empty());
            assert_eq!(op["tags"].as_array().map(Vec::len), Some(1), "{id}");
            assert!(op["responses"]["500"].is_object(), "{id}");
        }
    }

    #[test]
    fn every_link_joins_two_operations_of_the_document() {
        let doc = document();
        let ops = operations(&doc);
        let find = |id: &str| ops.iter().find(|(i, _)| i == id).map(|(_, op)| op);
        for link in LINKS {
            assert!(find(link.target).is_some(), "{}", link.target);
            let from = find(link.from).unwrap_or_else(|| panic!("{}", link.from));
            let written = &from["responses"][link.status]["links"][link.name];
            assert_eq!(written["operationId"], link.target, "{}", link.name);
        }
    }

    #[test]
    fn error_answers_are_problem_json() {
        let doc = document();
        for (id, op) in operations(&doc) {
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let content = response.get("content").or_else(|| {
                        let name = response["$ref"].as_str()?.rsplit('/').next()?;
                        doc["components"]["responses"][name].get("content")
                    });
                    let content = content.unwrap_or_else(|| panic!("{id} {status}"));
                    assert!(content[PROBLEM_CONTENT_TYPE].is_object(), "{id} {status}");
                }
            }
        }
    }

    #[test]
    fn every_sale_id_parameter_carries_the_api_s_bound() {
        let doc = document();
        let mut seen = 0;
        for (id, op) in operations(&doc) {
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["name"] == "id" && p["schema"]["type"] == "integer" || p["name"] == "sale_id" {
                    let max = p["schema"]["maximum"].as_f64();
                    assert_eq!(max, Some(super::super::problem::MAX_SALE_ID as f64), "{id}");
                    assert_eq!(p["schema"]["minimum"].as_f64(), Some(1.0), "{id}");
                    seen += 1;
                }
            }
        }
        assert_eq!(
            seen, 5,
            "get_sale, get_captcha, issue_path, get_result, seckill"
        );
    }

    #[test]
    fn the_seckill_route_documents_every_status_the_rule_answers() {
        let doc = document();
        let op = &doc["paths"][SECKILL_PATH]["post"];
        for a in ANSWERS {
            let r = &op["responses"][a.status.to_string()];
            assert!(
                r["description"].as_str().unwrap().contains(a.outcome),
                "{}",
                a.outcome
            );
            let sends_retry = ANSWERS
                .iter()
                .any(|b| b.status == a.status && b.retry_after);
            assert_eq!(
                r["headers"]["Retry-After"].is_object(),
                sends_retry,
                "{}",
                a.status
            );
        }
        assert!(op["responses"]["401"].is_object());
    }
}
