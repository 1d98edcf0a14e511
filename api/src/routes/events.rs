//! `GET /v1/events`: Server-Sent Events of health transitions, committed versions, and
//! workers connecting, applying or rejecting versions — for `curl -N` users watching changes
//! live and for dashboards. Each event's `event:` field is its `type`; `data:` is the JSON.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::events::Event;
use crate::AppState;

fn sse(event: &Event) -> SseEvent {
    SseEvent::default()
        .event(event.kind())
        .json_data(event)
        .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"))
}

/// The stream of events from now on (no history), with a keep-alive comment every 15 s.
#[utoipa::path(get, path = "/v1/events", tag = "events", operation_id = "stream_events",
    responses((status = 200, description = "`text/event-stream`: one SSE event per change; `event:` is the type, `data:` the JSON", body = crate::events::Event, content_type = "text/event-stream")),
    security(("bearer" = [])))]
pub async fn stream(
    State(app): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let events = app.workers.events.subscribe();
    let mut versions = app.db.subscribe();
    versions.borrow_and_update();
    let stopping = app.stopping.subscribe();
    let state = (events, versions, stopping);
    let stream = futures_util::stream::unfold(
        state,
        |(mut events, mut versions, mut stopping)| async move {
            let event = tokio::select! {
                // The API is shutting down: end the stream so the shutdown does not wait for it.
                _ = stopping.wait_for(|s| *s) => return None,
                received = events.recv() => match received {
                    Ok(e) => e,
                    Err(RecvError::Lagged(missed)) => Event::Lagged { missed },
                    Err(RecvError::Closed) => return None,
                },
                changed = versions.changed() => {
                    changed.ok()?;
                    let version = (*versions.borrow_and_update())?;
                    Event::Committed { version, at: crate::db::now_text() }
                }
            };
            Some((Ok(sse(&event)), (events, versions, stopping)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
