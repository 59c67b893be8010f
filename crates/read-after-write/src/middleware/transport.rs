//! How tokens travel: read from `Cookie` headers or the token header, written
//! as an appended `Set-Cookie` and the token header.

use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};
use memchr::memmem::Finder;

use crate::backend::Backend;
use crate::config::Shared;

/// Calls `each` with every token candidate, header first, then every cookie
/// `cookie` finds the name of across all `Cookie` headers (HTTP/2 sends one header
/// per cookie), until `each` returns true. Returns whether any candidate was
/// found.
///
/// Does not bound the number of candidates: that is the caller's MAC budget
/// (see [`MAX_MACS_PER_REQUEST`](super::MAX_MACS_PER_REQUEST)), which junk
/// cannot spend. One pass over the header bytes, no allocation: the work is
/// linear in the headers' size, which the HTTP server already bounds.
pub(crate) fn for_each_candidate(
    headers: &HeaderMap,
    cookie: &Finder<'_>,
    token_header: Option<&HeaderName>,
    mut each: impl FnMut(&str) -> bool,
) -> bool {
    let mut found = false;
    if let Some(name) = token_header {
        for value in headers.get_all(name) {
            // Not visible ASCII: not a token of ours; skip, never fail.
            let Ok(text) = value.to_str() else { continue };
            found = true;
            if each(text.trim()) {
                return true;
            }
        }
    }
    for value in headers.get_all(COOKIE) {
        for raw in cookie_values(value.as_bytes(), cookie) {
            // Only our cookie's value needs to be text, so a header with
            // other non-ASCII cookies still yields ours.
            let Ok(text) = std::str::from_utf8(raw) else {
                continue;
            };
            found = true;
            if each(text) {
                return true;
            }
        }
    }
    found
}

/// The values of every cookie whose name `name` finds in one `Cookie`
/// header, in
/// order, parsed by hand with no allocation (`cookie::Cookie::split_parse`
/// cost more than verifying the token).
///
/// A browser's header is mostly other cookies (analytics, consent,
/// sessions: often a kilobyte or more), so the header is not split into
/// pairs: `memchr`'s substring search jumps from one occurrence of `name`
/// to the next, and only those are looked at. An occurrence is our cookie
/// when it starts a pair (nothing but whitespace between it and the
/// header's start or the previous `;`) and is followed by optional
/// whitespace and `=`: exactly the pairs, split on `;`, whose trimmed text
/// before the first `=` is `name`, since a cookie name holds neither `;`,
/// `=` nor whitespace ([`check_cookie_name`](crate::config::check_cookie_name)),
/// so no occurrence that starts a pair overlaps an earlier one. The value
/// runs to the next `;`, trimmed, and a quoted one is unquoted.
fn cookie_values<'a>(
    header: &'a [u8],
    name: &'a Finder<'_>,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let length = name.needle().len();
    name.find_iter(header).filter_map(move |at| {
        let before = header[..at].trim_ascii_end();
        if before.last().is_some_and(|&b| b != b';') {
            return None;
        }
        let rest = header[at + length..]
            .trim_ascii_start()
            .strip_prefix(b"=")?;
        let raw = rest[..memchr::memchr(b';', rest).unwrap_or(rest.len())].trim_ascii();
        Some(
            raw.strip_prefix(b"\"")
                .and_then(|inner| inner.strip_suffix(b"\""))
                .unwrap_or(raw),
        )
    })
}

/// Appends the `Set-Cookie` for `token` (keeping every other cookie the
/// handler set) and sets the token header.
pub(crate) fn attach_token<B: Backend>(headers: &mut HeaderMap, shared: &Shared<B>, token: String) {
    let (prefix, suffix) = &shared.set_cookie;
    let mut text = String::with_capacity(prefix.len() + token.len() + suffix.len());
    text.push_str(prefix);
    text.push_str(&token);
    text.push_str(suffix);
    match HeaderValue::try_from(text) {
        Ok(value) => {
            headers.append(SET_COOKIE, value);
        }
        Err(_) => tracing::warn!(
            cookie = %shared.cookie_name,
            "affinity cookie is not a valid header value (check the cookie name and domain); not set"
        ),
    }
    if let Some(name) = &shared.token_header {
        // The token itself becomes the header's bytes: no copy.
        match HeaderValue::try_from(token) {
            Ok(value) => {
                headers.insert(name.clone(), value);
            }
            Err(_) => {
                tracing::warn!("affinity token is not a valid header value; not sent as a header")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use memchr::memmem::Finder;

    use super::cookie_values;

    /// The parser before `cookie_values`, kept as its specification: split
    /// on every `;`, the name is the trimmed text before the pair's first
    /// `=`, the value the trimmed rest, unquoted.
    fn reference<'a>(header: &'a [u8], name: &[u8]) -> Vec<&'a [u8]> {
        let mut values = Vec::new();
        for pair in header.split(|&b| b == b';') {
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name {
                continue;
            }
            let raw = pair[eq + 1..].trim_ascii();
            values.push(
                raw.strip_prefix(b"\"")
                    .and_then(|inner| inner.strip_suffix(b"\""))
                    .unwrap_or(raw),
            );
        }
        values
    }

    #[test]
    fn finds_every_value_of_the_name_in_order() {
        let header = b"theme=dark; primary_affinity=abc;x=primary_affinity=no;  primary_affinity = \"q\" ;primary_affinityX=no;primary_affinity;primary_affinity=";
        let name = Finder::new("primary_affinity");
        let found: Vec<&[u8]> = cookie_values(header, &name).collect();
        assert_eq!(found, vec![&b"abc"[..], b"q", b""]);
        assert_eq!(found, reference(header, b"primary_affinity"));
        assert_eq!(cookie_values(b"", &Finder::new("a")).count(), 0);
        assert_eq!(cookie_values(b";;;", &Finder::new("a")).count(), 0);
    }

    proptest! {
        /// Agrees with the reference on any bytes, built from the pieces
        /// that matter (the name, separators, `=`, quotes, whitespace,
        /// non-ASCII) so that matches are common.
        #[test]
        fn agrees_with_the_reference_parser(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just(&b"pa"[..]),
                    Just(&b";"[..]),
                    Just(&b"="[..]),
                    Just(&b" "[..]),
                    Just(&b"\t"[..]),
                    Just(&b"\""[..]),
                    Just(&b"x"[..]),
                    Just(&b"p"[..]),
                    Just(&b"\xff"[..]),
                ],
                0..40,
            )
        ) {
            let header: Vec<u8> = pieces.concat();
            let name = Finder::new("pa");
            let found: Vec<&[u8]> = cookie_values(&header, &name).collect();
            prop_assert_eq!(found, reference(&header, b"pa"));
        }
    }
}
