//! `GET /api/v1/mirrors`: the mirror inventory, as JSON, for operators and their tools.
//!
//! Off (404, saying how to turn it on) unless `ADMIN_TOKEN` is set; then it needs `Authorization: Bearer <token>` (401
//! otherwise), compared in constant time. One page holds up to `limit` mirrors (default
//! [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]) in name order; `next_cursor`, when present, is
//! passed as `cursor` for the next page. Privacy is a flag: who has access is never kept.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::mirror::Info;

/// Mirrors per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit`: a page of 10,000 mirrors would take long to measure and to send.
pub const MAX_LIMIT: usize = 1000;

/// The query of a page.
#[derive(Debug, serde::Deserialize)]
pub(super) struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// One page of the inventory.
#[derive(Debug, serde::Serialize)]
struct Page {
    mirrors: Vec<Info>,
    /// The `cursor` of the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `GET /api/v1/mirrors?limit=N&cursor=C`
pub(super) async fn mirrors(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(token) = &state.config.admin_token else {
        return super::admin::off();
    };
    if !super::admin::bearer(&headers, token) {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "the admin API needs Authorization: Bearer <ADMIN_TOKEN>\n",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"smart-git-proxy admin\""),
        );
        return response;
    }
    let Ok(Query(query)) = query else {
        return text(
            StatusCode::BAD_REQUEST,
            "query: limit (a number) and cursor (from next_cursor)\n",
        );
    };
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mirrors = std::sync::Arc::clone(&state.mirrors);
    let cache = state.pack_cache.clone();
    let listed = tokio::task::spawn_blocking(move || {
        mirrors.inventory(cache.as_ref(), query.cursor.as_deref(), limit)
    })
    .await;
    let (page, more) = match listed {
        Ok(listed) => listed,
        Err(e) => {
            tracing::error!(error = %e, "inventory failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n");
        }
    };
    let next_cursor = more.then(|| page.last().map(|m| m.repo.clone())).flatten();
    let body = Page {
        mirrors: page,
        next_cursor,
    };
    match serde_json::to_vec(&body) {
        Ok(json) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            json,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "inventory failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
        }
    }
}
