//! What a handle hands to work done beyond the response: the token header
//! for a downstream service, and the [`Requirement`] for a job or a
//! message.

use smallvec::SmallVec;

use super::{Db, Required};
use crate::backend::Backend;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::config::DEFAULT_TOKEN_HEADER;
use crate::issue;
use crate::position::WritePosition;
use crate::requirement::Requirement;
use crate::token::UserId;

impl<B: Backend> Db<B> {
    /// The token header to send to a downstream service that reads this
    /// user's data: a token for this request's user covering everything the
    /// request wrote so far (see [`requirement`](Self::requirement)), or
    /// `None` when there is nothing to require or no identity.
    /// [`ForwardTokenLayer`](crate::forward::ForwardTokenLayer) calls this
    /// for you; use it directly where that layer cannot see the request (a
    /// spawned task).
    ///
    /// ```no_run
    /// # async fn handler(db: read_after_write::pg::PgDb) {
    /// let mut call = http::Request::get("http://feed-service/feed").body(()).unwrap();
    /// if let Some((name, value)) = db.forward_header().await {
    ///     call.headers_mut().insert(name, value);
    /// }
    /// # }
    /// ```
    pub async fn forward_header(&self) -> Option<(http::HeaderName, http::HeaderValue)> {
        let user = self.state.user()?;
        let bookmarks = if !self.shared.time_window() {
            let captured = issue::capture_all(&self.shared, &self.state).await;
            issue::next_bookmarks(&self.shared, &self.state, &captured)
        } else if self.time_window_pins() {
            Bookmarks::one(Bookmark::EVERY_CLUSTER)
        } else {
            return None;
        };
        self.header(user, bookmarks)
    }

    /// What reads acting for this request's user must see, to hand to work
    /// done elsewhere: a background job's payload, a queue message. Use it
    /// after the request's writes, with [`Requirement::route`] on the other
    /// side.
    ///
    /// When the request wrote, this captures the primary's position now
    /// (one query, shared with concurrent writers), so it covers the writes
    /// committed before the call; the response captures again for its own
    /// token (a capture cannot tell whether a write handed out before it
    /// committed before it, so none is reused). Otherwise it is what the
    /// request's token required. A lost capture gives
    /// [`Requirement::Primary`], as it pins the user's own token.
    ///
    /// ```no_run
    /// # async fn handler(db: read_after_write::pg::PgDb) -> Result<(), sqlx::Error> {
    /// let (post_id,): (i64,) =
    ///     sqlx::query_as("insert into posts (user_id, content) values (1, 'hi') returning id")
    ///         .fetch_one(db.write())
    ///         .await?;
    /// let requirement = db.requirement().await;
    /// sqlx::query("insert into jobs (post_id, requirement) values ($1, $2)")
    ///     .bind(post_id)
    ///     .bind(requirement.to_string())
    ///     .execute(db.write())
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn requirement(&self) -> Requirement {
        let own = self.own();
        let carried = match own.required {
            // Another user's promises, when the handler bound the request
            // to a new named user: not this user's to keep.
            _ if !self.state.inherits() => Requirement::Nothing,
            Required::Nothing => Requirement::Nothing,
            Required::Position(bookmark) => Requirement::Position(bookmark.position),
            Required::Primary(_) => Requirement::Primary,
        };
        if !own.wrote() {
            return carried;
        }
        if self.shared.time_window() {
            return Requirement::Primary;
        }
        let cluster = &self.shared.clusters[self.cluster];
        let written = issue::capture_position(&*cluster.backend, cluster.id).await;
        carried.after_write(written)
    }

    /// The position this request's session reads must see, if its token
    /// verified.
    pub fn required_position(&self) -> Option<WritePosition> {
        match self.own().required {
            Required::Position(bookmark) => Some(bookmark.position),
            Required::Nothing | Required::Primary(_) => None,
        }
    }

    /// In time-window mode, whether a token for this request's user pins
    /// the primary: they wrote now, or carried a token they may keep.
    fn time_window_pins(&self) -> bool {
        self.state.wrote() || (self.state.inherits() && !self.state.carried.is_empty())
    }

    /// Like [`forward_header`](Self::forward_header), without waiting: for
    /// synchronous callers such as a tonic interceptor. A cluster this
    /// request wrote to (or, with monotonic reads, read the primary of)
    /// since its last capture gets a bookmark that pins its session reads
    /// to the primary downstream, since its exact position is not known
    /// without asking the primary.
    ///
    /// ```no_run
    /// # fn handler(db: read_after_write::pg::PgDb) {
    /// if let Some((name, value)) = db.forward_header_now() {
    ///     // metadata.insert(name.as_str(), value.to_str()?.parse()?) ...
    ///     # let _ = (name, value);
    /// }
    /// # }
    /// ```
    pub fn forward_header_now(&self) -> Option<(http::HeaderName, http::HeaderValue)> {
        let user = self.state.user()?;
        let bookmarks = if !self.shared.time_window() {
            let captured: SmallVec<[Option<WritePosition>; 1]> = self
                .shared
                .clusters
                .iter()
                .zip(&self.state.clusters)
                .map(|(cluster, own)| {
                    let uncaptured = own.wrote() || (self.shared.monotonic() && own.read_primary());
                    uncaptured.then(|| Bookmark::pinned(cluster.id.unwrap_or(0)).position)
                })
                .collect();
            issue::next_bookmarks(&self.shared, &self.state, &captured)
        } else if self.time_window_pins() {
            Bookmarks::one(Bookmark::EVERY_CLUSTER)
        } else {
            return None;
        };
        self.header(user, bookmarks)
    }

    /// The header carrying a token for `user` with `bookmarks`, under the
    /// layer's header name.
    fn header(
        &self,
        user: UserId,
        bookmarks: Bookmarks,
    ) -> Option<(http::HeaderName, http::HeaderValue)> {
        let token = issue::mint_token(&self.shared, user, bookmarks)?;
        let name = self
            .shared
            .token_header
            .clone()
            .unwrap_or_else(|| http::HeaderName::from_static(DEFAULT_TOKEN_HEADER));
        let value = http::HeaderValue::from_str(&token).ok()?;
        Some((name, value))
    }
}
