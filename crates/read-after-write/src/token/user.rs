//! [`UserId`]: who a token belongs to.

use std::fmt;

use smallvec::SmallVec;

/// Who a token belongs to: opaque bytes, at most 255 of them.
///
/// Two ids are the same user exactly when their bytes are equal. The
/// conversions give:
///
/// | from | bytes |
/// |---|---|
/// | `u32`, `i32` | 4, big-endian (`to_be_bytes`) |
/// | `u64`, `i64` | 8, big-endian |
/// | `u128` | 16, big-endian |
/// | `&str`, `String` | the UTF-8 bytes (fails past 255) |
/// | `&[u8]`, [`UserId::new`] | the bytes as given (fails past 255) |
///
/// So the width of the integer type is part of the id: **`UserId::from(42i32)`
/// and `UserId::from(42i64)` are different users**, and a token issued under
/// one is ignored under the other (the user silently loses read-your-writes).
/// Pick one type for your ids and convert with it everywhere, typically the
/// type of your database's user id column (`int8`/`bigserial` is `i64`,
/// `int4`/`serial` is `i32`). Signedness does not matter for non-negative
/// ids: `42i64` and `42u64` give the same bytes. Ids of up to 24 bytes are
/// stored inline, without allocating.
///
/// ```
/// use read_after_write::UserId;
///
/// assert_eq!(UserId::from(42i32).as_bytes(), &[0, 0, 0, 42]);
/// assert_eq!(UserId::from(42u32).as_bytes().len(), 4);
/// assert_eq!(UserId::from(42i64).as_bytes(), &42i64.to_be_bytes());
/// assert_eq!(UserId::from(42u64).as_bytes().len(), 8);
/// assert_eq!(UserId::from(42u128).as_bytes().len(), 16);
///
/// // The same number at two widths is two different users.
/// assert_ne!(UserId::from(42i32), UserId::from(42i64));
/// // Signedness alone does not change a non-negative id.
/// assert_eq!(UserId::from(42i64), UserId::from(42u64));
///
/// let b = UserId::try_from("alice@example.com")?;
/// assert_eq!(b.as_bytes(), b"alice@example.com");
/// assert!(UserId::try_from("x".repeat(256).as_str()).is_err());
/// assert!(UserId::anonymous().is_anonymous());
/// # Ok::<_, read_after_write::UserIdTooLong>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct UserId(SmallVec<[u8; 24]>);

/// A user id was longer than [`UserId::MAX_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("user id is {len} bytes; affinity tokens carry at most 255 (hash longer ids first)")]
pub struct UserIdTooLong {
    /// Length of the rejected id in bytes.
    pub len: usize,
}

impl UserId {
    /// The longest id a token can carry, in bytes.
    pub const MAX_LEN: usize = 255;

    /// The empty id used for requests without an identity, when anonymous
    /// tokens are allowed.
    pub fn anonymous() -> Self {
        UserId(SmallVec::new())
    }

    /// An id from raw bytes.
    ///
    /// ```
    /// use read_after_write::UserId;
    ///
    /// assert_eq!(UserId::new(b"u-1")?.as_bytes(), b"u-1");
    /// # Ok::<_, read_after_write::UserIdTooLong>(())
    /// ```
    pub fn new(bytes: &[u8]) -> Result<Self, UserIdTooLong> {
        if bytes.len() > Self::MAX_LEN {
            return Err(UserIdTooLong { len: bytes.len() });
        }
        Ok(UserId(SmallVec::from_slice(bytes)))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether this is the [anonymous](Self::anonymous) id.
    pub fn is_anonymous(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if !text.is_empty() && text.chars().all(|c| !c.is_control()) => {
                write!(f, "UserId({text:?})")
            }
            _ => write!(f, "UserId({:02x?})", self.0.as_slice()),
        }
    }
}

macro_rules! user_id_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for UserId {
            fn from(id: $t) -> Self {
                UserId(SmallVec::from_slice(&id.to_be_bytes()))
            }
        }
    )*};
}
user_id_from_int!(u32, i32, u64, i64, u128);

impl TryFrom<&[u8]> for UserId {
    type Error = UserIdTooLong;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        UserId::new(bytes)
    }
}

impl TryFrom<&str> for UserId {
    type Error = UserIdTooLong;
    fn try_from(text: &str) -> Result<Self, Self::Error> {
        UserId::new(text.as_bytes())
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdTooLong;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        UserId::new(text.as_bytes())
    }
}
