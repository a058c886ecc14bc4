//! Mutating calls (anything but GET/HEAD/OPTIONS) need `Authorization: Bearer TOKEN`; reads
//! are open, since the server binds to loopback by default.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::server::{AppError, AppState};

pub async fn require_token_for_mutations(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => next.run(request).await,
        Some(_) => AppError::new(StatusCode::UNAUTHORIZED, "invalid token").into_response(),
        None => AppError::new(
            StatusCode::UNAUTHORIZED,
            "this call needs `Authorization: Bearer TOKEN` (the token is printed by `adapterlab serve` and stored in the data directory's `token` file)",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
