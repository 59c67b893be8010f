use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::{transport, Mode, Shared};
use crate::backend::Backend;
use crate::forward::{self, TokenSource};
use crate::handle::{RequestState, Required};
use crate::position::WritePosition;
use crate::token::{AffinityToken, UserId};

type CaptureFuture = Pin<Box<dyn Future<Output = Option<WritePosition>> + Send>>;

pin_project! {
    /// Response future of [`ReadAfterWrite`](super::ReadAfterWrite).
    ///
    /// Once the handler's response is ready, and if the request wrote, it
    /// asks the backend for the write position and attaches a fresh token.
    pub struct ResponseFuture<F, B, ResBody>
    where
        B: Backend,
    {
        #[pin]
        inner: F,
        shared: Arc<Shared<B>>,
        state: Arc<RequestState>,
        // The request as outgoing clients see it while the handler runs,
        // when tokens are forwarded.
        forward: Option<Arc<dyn TokenSource>>,
        // The handler's response, held while the write position is captured.
        capturing: Option<(Response<ResBody>, CaptureFuture)>,
    }
}

impl<F, B: Backend, ResBody> ResponseFuture<F, B, ResBody> {
    pub(crate) fn new(
        inner: F,
        shared: Arc<Shared<B>>,
        state: Arc<RequestState>,
        forward: Option<Arc<dyn TokenSource>>,
    ) -> Self {
        ResponseFuture {
            inner,
            shared,
            state,
            forward,
            capturing: None,
        }
    }
}

impl<F, B: Backend, ResBody> fmt::Debug for ResponseFuture<F, B, ResBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("capturing", &self.capturing.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, B, ResBody, E> Future for ResponseFuture<F, B, ResBody>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    B: Backend,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut response, mut capture) = match this.capturing.take() {
            Some(capturing) => capturing,
            None => {
                let polled = match this.forward {
                    Some(source) => forward::with_current(source, || this.inner.poll(cx)),
                    None => this.inner.poll(cx),
                };
                let mut response = ready!(polled)?;
                match start_capture(this.shared, this.state, &mut response) {
                    Some(capture) => (response, capture),
                    None => {
                        finish(this.shared, this.state, &mut response);
                        return Poll::Ready(Ok(response));
                    }
                }
            }
        };
        match capture.as_mut().poll(cx) {
            Poll::Pending => {
                *this.capturing = Some((response, capture));
                Poll::Pending
            }
            Poll::Ready(written) => {
                if let Some(written) = written {
                    issue_token(this.shared, this.state, &mut response, written);
                }
                finish(this.shared, this.state, &mut response);
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// Decides what a finished handler's response needs. Returns the capture of
/// the write position when the request wrote in position mode; issues the
/// token at once in time-window mode.
fn start_capture<B: Backend, ResBody>(
    shared: &Arc<Shared<B>>,
    state: &RequestState,
    response: &mut Response<ResBody>,
) -> Option<CaptureFuture> {
    if !state.wrote() {
        return None;
    }
    metrics::counter!("read_after_write_writes_total").increment(1);
    if state.user.is_none() {
        warn_wrote_without_identity(shared);
        return None;
    }
    match shared.mode {
        Mode::TimeWindow(_) => {
            issue_token(shared, state, response, WritePosition::default());
            None
        }
        Mode::Position => {
            // The handler has returned, so its commits are done: a position
            // asked for now covers them. This runs for 4xx and 5xx responses
            // too, since a commit may still have happened.
            //
            // When the capture fails the write may still have committed, and
            // the token the client holds promises less than that. Leaving it
            // would send the next read to a replica without the write, so the
            // client gets a token with an unknown position instead: it pins
            // the user's session reads to the primary until their next
            // successful write replaces it, or it expires.
            let shared = Arc::clone(shared);
            Some(Box::pin(
                async move { Some(capture_position(&shared).await) },
            ))
        }
    }
}

/// The primary's write position now, covering every commit made before this
/// call. A failed capture gives the all-zero position, which pins the user's
/// session reads to the primary (see [`WritePosition::pins_primary`]).
pub(crate) async fn capture_position<B: Backend>(shared: &Shared<B>) -> WritePosition {
    match shared.backend.write_position().await {
        Ok(position) => position,
        Err(error) => {
            metrics::counter!("read_after_write_capture_failures_total").increment(1);
            tracing::warn!(
                %error,
                "could not capture the write position; the affinity token pins this user's \
                 session reads to the primary until their next write or its expiry"
            );
            WritePosition::default()
        }
    }
}

/// Counts a write that gets no token for want of an identity, and says why
/// at most once a minute per layer.
///
/// With an identity function set, this is almost always the authentication
/// layer placed inside this one: it has not run when the identity function
/// reads the request, so every user silently loses read-after-write
/// consistency. Without one, anonymous tokens were turned off.
fn warn_wrote_without_identity<B>(shared: &Shared<B>) {
    metrics::counter!("read_after_write_writes_without_identity_total").increment(1);
    if !shared.no_identity_warning.allow(shared.clock.now_unix()) {
        tracing::debug!("request wrote but has no identity; no affinity token issued");
        return;
    }
    if shared.identity.is_some() {
        tracing::warn!(
            "the identity function returned None for a request that wrote, so it got no affinity \
             token and its user may not see the write on the next page; is the authentication layer \
             inside ReadAfterWriteLayer? It must be outside (added after it, with Router::layer) so \
             it runs first. (Logged at most once a minute; every such write is counted in \
             read_after_write_writes_without_identity_total)"
        );
    } else {
        tracing::warn!(
            "a request wrote, but no identity function is set and anonymous tokens are disabled \
             (allow_anonymous(false)), so no request ever gets an affinity token; set \
             ReadAfterWriteLayer::identity or allow anonymous tokens. (Logged at most once a \
             minute; every such write is counted in read_after_write_writes_without_identity_total)"
        );
    }
}

/// Signs a token for max(carried, written) and attaches it. A `written`
/// that [pins the primary](WritePosition::pins_primary) means "position
/// unknown": the token then pins the user to the primary, whatever the
/// carried token promised.
fn issue_token<B: Backend, ResBody>(
    shared: &Shared<B>,
    state: &RequestState,
    response: &mut Response<ResBody>,
    written: WritePosition,
) {
    let Some(user) = state.user.clone() else {
        return;
    };
    let position = match state.required {
        Required::Position(_) if written.pins_primary() => written,
        Required::Position(carried) => carried.max(written),
        Required::Nothing | Required::Primary => written,
    };
    let token = mint_token(shared, user, position);
    transport::attach_token(response.headers_mut(), shared, token);
    metrics::counter!("read_after_write_tokens_issued_total").increment(1);
    tracing::debug!(lsn = %position.lsn, timeline = position.timeline, "affinity token issued");
}

/// Signs a token promising `position` to `user` for the configured TTL.
pub(crate) fn mint_token<B>(shared: &Shared<B>, user: UserId, position: WritePosition) -> String {
    // The clock has whole seconds and a token is valid while `now <
    // expires_at`: one more second makes it live at least the full TTL
    // whatever fraction of a second it was issued in.
    let ttl = transport::ttl_seconds(shared).unsigned_abs();
    let expires_at = shared
        .clock
        .now_unix()
        .saturating_add(ttl)
        .saturating_add(1);
    AffinityToken::new(user, position, expires_at).sign(&shared.cookie_name, &shared.keys)
}

/// Adds the debug header when it is on.
fn finish<B: Backend, ResBody>(
    shared: &Shared<B>,
    state: &RequestState,
    response: &mut Response<ResBody>,
) {
    let Some(name) = &shared.debug_header else {
        return;
    };
    let text = match &*state
        .last_route
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
    {
        Some(last) => format!(
            "node={}; reason={}; token={}",
            last.node(),
            last.reason(),
            state.token.as_str()
        ),
        None => format!("node=none; token={}", state.token.as_str()),
    };
    if let Ok(value) = HeaderValue::try_from(text) {
        response.headers_mut().insert(name.clone(), value);
    }
}
