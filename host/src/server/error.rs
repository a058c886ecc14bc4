//! One error type for handlers: a status and a message for the client; 500s log the cause
//! and tell the client little.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub message: String,
}

impl AppError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AppError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

impl<E: Into<anyhow::Error>> From<E> for AppError {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        if let Some(store) = e.downcast_ref::<crate::store::StoreError>() {
            if matches!(
                store,
                crate::store::StoreError::NoSuchRun(_) | crate::store::StoreError::AmbiguousRun(..)
            ) {
                return AppError::not_found(store.to_string());
            }
            if matches!(store, crate::store::StoreError::Conflict { .. }) {
                return AppError::new(StatusCode::CONFLICT, store.to_string());
            }
        }
        // A full disk (ENOSPC, possibly kept by sled from a failed write) is the server's
        // condition, said as such: 503 until space is freed and the store reopened.
        let full = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(28))
                || c.to_string().contains("No space left on device")
        });
        if full {
            return AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the data directory's disk is full; free some space (see /api/health)",
            );
        }
        tracing::error!("internal error: {e:#}");
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server's log",
        )
    }
}
