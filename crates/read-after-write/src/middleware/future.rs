//! [`ResponseFuture`]: after the handler, the capture of the write position
//! and the token the response carries.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::transport;
use crate::backend::Backend;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::config::Shared;
use crate::forward::{self, TokenSource};
use crate::issue::{capture_all, mint_token, needs_capture, next_bookmarks, refresh_due, Captured};
use crate::request::RequestState;

type CaptureFuture = Pin<Box<dyn Future<Output = Captured> + Send>>;

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
            Poll::Ready(captured) => {
                let bookmarks = next_bookmarks(this.shared, this.state, &captured);
                issue_token(this.shared, this.state, &mut response, bookmarks);
                finish(this.shared, this.state, &mut response);
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// Decides what the response carries once the handler has returned: starts
/// the capture of the primary's position where the request wrote (or, with
/// monotonic reads, read the primary), or issues what needs no capture.
fn start_capture<B: Backend, ResBody>(
    shared: &Arc<Shared<B>>,
    state: &Arc<RequestState>,
    response: &mut Response<ResBody>,
) -> Option<CaptureFuture> {
    let wrote = state.wrote();
    if wrote {
        metrics::counter!("read_after_write_writes_total").increment(1);
    }
    // Whom the token is for, now that the handler has run: it may have
    // bound the request to a user it signed up or signed in.
    if !state.has_user() {
        if wrote {
            warn_wrote_without_identity(shared);
        }
        return None;
    }
    // A request bound to a new user that carries promises over to them
    // issues a token even without a write: the old one in the browser is
    // not that user's.
    let rebound = state.rebound();
    if shared.time_window() {
        if wrote || (rebound && state.inherits() && !state.carried.is_empty()) {
            let pinned = Bookmarks::one(Bookmark::EVERY_CLUSTER);
            issue_token(shared, state, response, pinned);
        }
        return None;
    }
    if !needs_capture(shared, state) {
        if shared.monotonic() || rebound {
            let bookmarks = next_bookmarks(shared, state, &Captured::new());
            let monotonic_due =
                shared.monotonic() && (bookmarks != state.carried || refresh_due(shared, state));
            if rebound || monotonic_due {
                issue_token(shared, state, response, bookmarks);
            }
        }
        return None;
    }
    // The handler has returned, so its commits are done: a position asked
    // for now covers them (and covers every state a read of this request
    // saw on the primary). This runs for 4xx and 5xx responses too, since a
    // commit may still have happened.
    //
    // When the capture fails the write may still have committed, and the
    // token the client holds promises less than that. Leaving it would send
    // the next read to a replica without the write, so the client gets a
    // token with an unknown position instead: it pins the user's session
    // reads of that cluster to the primary until their next successful
    // write replaces it, or it expires.
    let shared = Arc::clone(shared);
    let state = Arc::clone(state);
    Some(Box::pin(async move { capture_all(&shared, &state).await }))
}

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
             it runs first. A handler that signs the user up or in binds the request to them \
             with Db::bind_user. (Logged at most once a minute; every such write is counted in \
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

/// Signs a token carrying `bookmarks` (as [`next_bookmarks`] worked them
/// out, or a pin) for the request's user and attaches it as a cookie and
/// the token header. Nothing without a user or a bookmark to carry.
fn issue_token<B: Backend, ResBody>(
    shared: &Shared<B>,
    state: &RequestState,
    response: &mut Response<ResBody>,
    bookmarks: Bookmarks,
) {
    let Some(user) = state.user() else {
        return;
    };
    let Some(token) = mint_token(shared, user, bookmarks) else {
        return;
    };
    transport::attach_token(response.headers_mut(), shared, token);
    metrics::counter!("read_after_write_tokens_issued_total").increment(1);
    tracing::debug!("affinity token issued");
}

/// Sets the debug header, when it is on: where the request's last read
/// went, why, and what became of its token.
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
