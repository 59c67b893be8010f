//! The social app's HTML page: a login form, a post form and the user's
//! own posts, so the seed's scenario (post, redirect, see the post) runs in
//! a browser.

use axum::http::header::LOCATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Form;
use read_after_write::{Backend, Db};
use serde::Deserialize;
use sqlx::PgPool;

use super::{
    insert_post, own_posts, signed_in, user_from_headers, AppError, DemoUser, MAX_POST_CHARS,
};

#[derive(Deserialize)]
pub(super) struct PostForm {
    content: String,
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    user_id: i64,
}

fn see_other(location: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
}

/// `POST /posts` from the HTML form: write, then 303 back to `/`, which must
/// show the new post. The seed's scenario, in a browser.
pub(super) async fn create_post_form<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
    Form(form): Form<PostForm>,
) -> Result<Response, AppError> {
    insert_post(&db, user, &form.content).await?;
    Ok(see_other("/"))
}

/// `POST /login`: sets the demo identity cookie. It writes nothing, so
/// unlike `POST /api/login` it needs no token.
pub(super) async fn login_form(Form(form): Form<LoginForm>) -> Response {
    signed_in(see_other("/"), form.user_id)
}

/// `GET /`: the post form and the user's own posts (a session read).
pub(super) async fn home<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    headers: HeaderMap,
) -> Result<Html<String>, AppError> {
    let Some(user) = user_from_headers(&headers) else {
        return Ok(Html(page(
            "<form method=post action=/login>\
             <label>Your user id (demo only) <input name=user_id type=number value=1 required></label> \
             <button>Sign in</button></form>",
        )));
    };
    let posts = own_posts(&db, user).await?;
    let mut body = format!(
        "<p>Signed in as user {user}.</p>\
         <form method=post action=/posts><textarea name=content rows=3 cols=60 required maxlength={MAX_POST_CHARS}></textarea><br>\
         <button>Post</button></form><h2>Your posts</h2><ul>"
    );
    for post in &posts {
        body.push_str(&format!(
            "<li><time>{}</time> {}</li>",
            escape(&post.created_at),
            escape(&post.content)
        ));
    }
    body.push_str("</ul>");
    if posts.is_empty() {
        body.push_str("<p>No posts yet.</p>");
    }
    Ok(Html(page(&body)))
}

fn page(body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>read-after-write social</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}time{{color:#777}}</style></head>\
         <body><h1>Social</h1>{body}</body></html>"
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
