//! Result polling: what became of a buyer's admitted request.
//!
//! After `202 queued` the buyer polls `GET /sales/{id}/result`. Sources are
//! read from the freshest to the most durable:
//!
//! 1. the result key `KeySchema.sale(id).result(user)`, which the order
//!    workers write after their MySQL batch commits: a JSON string
//!    `{"status":"success","order_id":"..."}` or
//!    `{"status":"failed","reason":"..."}`;
//! 2. the reservations hash `KeySchema.sale(id).reservations()` (field = the
//!    user id), written by the admission script: the request is `queued`;
//! 3. MySQL `orders` (the result key may have expired or Redis restarted):
//!    `success` with the order id;
//! 4. MySQL `failed_admissions`: `failed`;
//! 5. otherwise `none`: this user never got admitted to this sale.
//!
//! A user only ever sees their own result: the user id comes from the
//! verified token.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::identity::Identity;
use super::problem::{parse_sale_id, Problem, ProblemBody, SaleIdParam};
use super::ApiState;
use crate::statuses::ResultStatus;
use crate::worker::results::ResultRecord;

/// What became of the buyer's attempt at a sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct PollResult {
    /// `success` (an order exists: `order_id`), `queued` (still on its
    /// way), `failed` (it will not be an order) or `none` (no attempt).
    pub status: ResultStatus,
    /// The order, with `success`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub order_id: Option<String>,
}

impl PollResult {
    fn without_order(status: ResultStatus) -> PollResult {
        PollResult {
            status,
            order_id: None,
        }
    }

    fn success(order_id: String) -> PollResult {
        PollResult {
            status: ResultStatus::Success,
            order_id: Some(order_id),
        }
    }
}

/// `/api/v1/sales/{id}/result`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(poll))
}

/// Looks the result up in the order described in the module docs.
pub async fn lookup(state: &ApiState, sale_id: u64, user_id: u64) -> Result<PollResult, Problem> {
    let keys = state.keys().sale(sale_id);
    let mut redis = state.redis();
    let (stored, queued): (Option<String>, bool) = redis::pipe()
        .cmd("GET")
        .arg(keys.result(user_id))
        .cmd("HEXISTS")
        .arg(keys.reservations())
        .arg(user_id)
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    if let Some(raw) = stored {
        match serde_json::from_str::<ResultRecord>(&raw) {
            Ok(ResultRecord {
                status: ResultStatus::Success,
                order_id: Some(id),
                ..
            }) => return Ok(PollResult::success(id)),
            Ok(ResultRecord {
                status: ResultStatus::Failed,
                ..
            }) => return Ok(PollResult::without_order(ResultStatus::Failed)),
            _ => tracing::warn!(sale_id, user_id, "unreadable result record; asking MySQL"),
        }
    }
    if queued {
        return Ok(PollResult::without_order(ResultStatus::Queued));
    }
    let order: Option<(String,)> =
        sqlx::query_as("SELECT id FROM orders WHERE user_id = ? AND sale_id = ?")
            .bind(user_id)
            .bind(sale_id)
            .fetch_optional(state.db())
            .await
            .map_err(Problem::internal)?;
    if let Some((id,)) = order {
        return Ok(PollResult::success(id));
    }
    let failed: Option<(i32,)> =
        sqlx::query_as("SELECT 1 FROM failed_admissions WHERE sale_id = ? AND user_id = ? LIMIT 1")
            .bind(sale_id)
            .bind(user_id)
            .fetch_optional(state.db())
            .await
            .map_err(Problem::internal)?;
    Ok(PollResult::without_order(if failed.is_some() {
        ResultStatus::Failed
    } else {
        ResultStatus::None
    }))
}

/// What became of this buyer's attempt at this sale.
#[utoipa::path(
    get,
    path = "/api/v1/sales/{id}/result",
    tag = "sales",
    operation_id = "get_result",
    params(SaleIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The attempt's state", body = PollResult),
        (status = 404, description = "The sale id is not a positive integer", body = ProblemBody),
    ),
)]
async fn poll(
    State(state): State<ApiState>,
    who: Identity,
    Path(raw): Path<String>,
) -> Result<Json<PollResult>, Problem> {
    let sale_id = parse_sale_id(&raw)?;
    Ok(Json(lookup(&state, sale_id, who.user_id).await?))
}
