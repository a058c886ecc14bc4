//! Mutating calls (anything but GET/HEAD/OPTIONS) need `Authorization: Bearer TOKEN`; reads
//! are open, since the server binds to loopback by default. That includes
//! `POST /v1/chat/completions`: OpenAI clients send their API key as this header, so they use
//! the server's token as their key.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::server::openai::OpenAiError;
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
    // The OpenAI-compatible API answers in OpenAI's error shape, which its clients parse.
    let openai = request.uri().path().starts_with("/v1/");
    let refuse = |message: &str| {
        if openai {
            OpenAiError::unauthorized(message).into_response()
        } else {
            AppError::new(StatusCode::UNAUTHORIZED, message).into_response()
        }
    };
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => refuse("invalid token"),
        None if openai => refuse(
            "this call needs the server's token as the API key (`Authorization: Bearer TOKEN`, e.g. OPENAI_API_KEY=TOKEN); it is printed by `adapterlab serve` and stored in the data directory's `token` file",
        ),
        None => refuse(
            "this call needs `Authorization: Bearer TOKEN` (the token is printed by `adapterlab serve` and stored in the data directory's `token` file)",
        ),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
