//! Forwarding a user's session to downstream services.
//!
//! A handler that writes and then calls another service (which reads the
//! user's data from its own replicas) must send along a token covering
//! that write, or the other service reads stale data. With
//! [`ReadAfterWriteLayer::forward_tokens`](crate::ReadAfterWriteLayer::forward_tokens)
//! on, put [`ForwardTokenLayer`] on your outgoing HTTP or gRPC client: every
//! request it sends while a request is being handled carries the token
//! header with a token for the handled request's user, covering everything
//! that request wrote so far (one capture query if it wrote). The downstream service runs its own `ReadAfterWriteLayer` with
//! the same signing keys and an identity that yields the same user (forward
//! the user's credentials, as you would anyway).
//!
//! Every request the wrapped client sends while a handler runs carries the
//! token, which holds the user id's bytes: wrap only clients that talk to
//! your own services, not ones that reach third parties.
//!
//! The current request is known to the client layer while its handler is
//! polled, on that thread: calls made from a task the handler spawned are
//! not covered (take [`Db::forward_header`](crate::Db::forward_header) and
//! set it yourself there).
//!
//! tonic: wrap the channel, `ServiceBuilder::new().layer(ForwardTokenLayer)
//! .service(channel)`, and build the generated client on it; the token
//! travels as the `x-primary-affinity` metadata entry. Or, with the `tonic`
//! feature, use [`ForwardTokenInterceptor`] with the generated client's
//! `with_interceptor`: interceptors are synchronous and cannot ask the
//! primary for a position, so after a write in the same handler its token
//! sends the downstream service's reads of that user to the primary (safe,
//! and dearer); the layer forwards the exact position.
//!
//! # Example
//!
//! ```
//! use read_after_write::forward::ForwardTokenLayer;
//! use tower::ServiceBuilder;
//!
//! # fn client<S: Clone>(http_client: S) {
//! // Around any tower HTTP client (hyper-util's legacy client, a tonic
//! // channel, ...):
//! let client = ServiceBuilder::new()
//!     .layer(ForwardTokenLayer)
//!     .service(http_client);
//! # let _ = client;
//! # }
//! ```

// The interceptor exists only with the `tonic` feature; without it the
// module docs still name it.
#![cfg_attr(not(feature = "tonic"), allow(rustdoc::broken_intra_doc_links))]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::Backend;
use crate::handle::Db;

type HeaderFuture<'a> =
    Pin<Box<dyn Future<Output = Option<(HeaderName, HeaderValue)>> + Send + 'a>>;

/// The request being handled, as the client layer needs it.
pub(crate) trait TokenSource: Send + Sync {
    fn forward_header(&self) -> HeaderFuture<'_>;
    #[cfg(feature = "tonic")]
    fn forward_header_now(&self) -> Option<(HeaderName, HeaderValue)>;
}

impl<B: Backend> TokenSource for Db<B> {
    fn forward_header(&self) -> HeaderFuture<'_> {
        Box::pin(Db::forward_header(self))
    }

    #[cfg(feature = "tonic")]
    fn forward_header_now(&self) -> Option<(HeaderName, HeaderValue)> {
        Db::forward_header_now(self)
    }
}

thread_local! {
    /// The request whose handler is being polled on this thread.
    static CURRENT: RefCell<Option<Arc<dyn TokenSource>>> = const { RefCell::new(None) };
}

/// Runs `poll` with `source` as the request being handled on this thread,
/// restoring what was there before (nested layers, panics included).
pub(crate) fn with_current<R>(source: &Arc<dyn TokenSource>, poll: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<dyn TokenSource>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|current| *current.borrow_mut() = previous);
        }
    }
    let previous = CURRENT.with(|current| current.borrow_mut().replace(Arc::clone(source)));
    let _restore = Restore(previous);
    poll()
}

fn current() -> Option<Arc<dyn TokenSource>> {
    CURRENT.with(|current| current.borrow().clone())
}

/// A client-side layer that adds the handled request's token to outgoing
/// requests; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardTokenLayer;

impl<S> Layer<S> for ForwardTokenLayer {
    type Service = ForwardToken<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ForwardToken { inner }
    }
}

/// The service [`ForwardTokenLayer`] builds.
#[derive(Clone, Debug)]
pub struct ForwardToken<S> {
    inner: S,
}

impl<S> ForwardToken<S> {
    /// Wraps a client.
    ///
    /// ```
    /// let client = read_after_write::forward::ForwardToken::new(());
    /// # let _ = client;
    /// ```
    pub fn new(inner: S) -> Self {
        ForwardToken { inner }
    }
}

impl<S, ReqBody> Service<Request<ReqBody>> for ForwardToken<S>
where
    S: Service<Request<ReqBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready is the one that is called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(source) = current() else {
            return Box::pin(inner.call(request));
        };
        Box::pin(async move {
            if let Some((name, value)) = source.forward_header().await {
                request.headers_mut().insert(name, value);
            }
            inner.call(request).await
        })
    }
}

/// A tonic client interceptor that adds the handled request's token to
/// outgoing gRPC calls, as `x-primary-affinity` metadata (feature `tonic`).
///
/// Synchronous, as tonic interceptors are: it cannot capture the primary's
/// position. A call made after the handler wrote carries a token that pins
/// that cluster's session reads of the user to the primary downstream (the
/// write's exact position is unknown until captured); reads before any
/// write forward exactly what the request's token promised.
/// [`ForwardTokenLayer`] around the channel forwards the exact position of
/// a write instead, at one capture query.
///
/// ```
/// use read_after_write::forward::ForwardTokenInterceptor;
/// use tonic::service::interceptor::InterceptedService;
///
/// // A generated client takes it as
/// // `FeedClient::with_interceptor(channel, ForwardTokenInterceptor)`; that
/// // wraps the channel like this:
/// fn intercepted<Channel>(channel: Channel) -> InterceptedService<Channel, ForwardTokenInterceptor> {
///     InterceptedService::new(channel, ForwardTokenInterceptor)
/// }
/// # let _ = intercepted::<()>;
/// ```
#[cfg(feature = "tonic")]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardTokenInterceptor;

#[cfg(feature = "tonic")]
impl tonic::service::Interceptor for ForwardTokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let Some((name, value)) = current().and_then(|source| source.forward_header_now()) else {
            return Ok(request);
        };
        let key = tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes());
        let value = value
            .to_str()
            .ok()
            .and_then(|text| tonic::metadata::AsciiMetadataValue::try_from(text).ok());
        if let (Ok(key), Some(value)) = (key, value) {
            request.metadata_mut().insert(key, value);
        }
        Ok(request)
    }
}
