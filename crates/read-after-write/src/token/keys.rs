//! Signing keys and the key set that makes rotation painless.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// HMAC-SHA256 with the key already absorbed: cloning it skips the two key
/// block compressions on every token.
pub(crate) type KeyedMac = Hmac<Sha256>;

/// Why a key could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key has fewer than [`SigningKey::MIN_LEN`] bytes.
    #[error(
        "signing key is {len} bytes; use at least 32 random bytes \
         (for example `openssl rand -base64 32`)"
    )]
    TooShort {
        /// Length of the rejected key in bytes.
        len: usize,
    },
    /// The text is not base64 (standard or URL-safe, padded or not).
    #[error("signing key is not valid base64; give 32 or more random bytes encoded as base64")]
    InvalidBase64,
    /// A key list held no key at all.
    #[error("no signing key given; set at least one base64-encoded key of 32 or more bytes")]
    Empty,
    /// The environment variable is unset or not valid Unicode.
    #[error("environment variable {name} is not set; put a base64-encoded key of 32 or more bytes in it")]
    MissingEnv {
        /// The variable's name.
        name: String,
    },
    /// The operating system's random number generator failed.
    #[error("could not read random bytes from the operating system to generate a key")]
    Random,
}

/// One HMAC-SHA256 key for signing and verifying affinity tokens.
///
/// Keys must be at least 32 bytes of real randomness. Every web instance that
/// should honour another's tokens needs the same keys. A key's one-byte id is
/// derived from the key itself, so rotating needs no bookkeeping: put the new
/// key first and keep the old one as a previous key until the token TTL has
/// passed.
///
/// ```
/// use read_after_write::SigningKey;
///
/// let key = SigningKey::from_base64("c2VjcmV0LWtleS1vZi1hdC1sZWFzdC0zMi1ieXRlcyEh")?;
/// assert!(SigningKey::from_bytes(b"too short").is_err());
/// # Ok::<_, read_after_write::KeyError>(())
/// ```
#[derive(Clone)]
pub struct SigningKey {
    id: u8,
    mac: KeyedMac,
}

impl SigningKey {
    /// The shortest key accepted, in bytes: the HMAC-SHA256 output size.
    pub const MIN_LEN: usize = 32;

    /// A key from raw bytes; refuses keys shorter than [`Self::MIN_LEN`].
    ///
    /// ```
    /// use read_after_write::{KeyError, SigningKey};
    ///
    /// assert!(SigningKey::from_bytes(&[7; 32]).is_ok());
    /// assert_eq!(SigningKey::from_bytes(&[7; 31]).err(), Some(KeyError::TooShort { len: 31 }));
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        let mut id_hash = Sha256::new();
        id_hash.update(b"read-after-write key id\0");
        id_hash.update(bytes);
        let id = id_hash.finalize()[0];
        let mac =
            KeyedMac::new_from_slice(bytes).map_err(|_| KeyError::TooShort { len: bytes.len() })?;
        Ok(SigningKey { id, mac })
    }

    /// A key from base64 text (standard or URL-safe alphabet, padded or not;
    /// surrounding whitespace is ignored), as it would come from an
    /// environment variable or a secret store.
    ///
    /// ```
    /// use read_after_write::SigningKey;
    ///
    /// let text = SigningKey::generate_base64()?;
    /// let key = SigningKey::from_base64(&text)?;
    /// # let _ = key;
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let bytes = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(KeyError::InvalidBase64)?;
        Self::from_bytes(&bytes)
    }

    /// A fresh random 32-byte key from the operating system.
    ///
    /// Tokens signed with it die with the process and are not honoured by
    /// other instances: fine for a demo or a test, not for production.
    ///
    /// ```
    /// use read_after_write::SigningKey;
    ///
    /// let a = SigningKey::generate()?;
    /// let b = SigningKey::generate()?;
    /// # let _ = (a, b);
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| KeyError::Random)?;
        Self::from_bytes(&bytes)
    }

    /// A fresh random 32-byte key as standard base64, ready to store in a
    /// secret or an environment variable.
    ///
    /// ```
    /// use read_after_write::SigningKey;
    ///
    /// assert_eq!(SigningKey::generate_base64()?.len(), 44);
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn generate_base64() -> Result<String, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| KeyError::Random)?;
        Ok(STANDARD.encode(bytes))
    }

    /// The key's one-byte id, written into every token it signs.
    ///
    /// ```
    /// use read_after_write::SigningKey;
    ///
    /// let key = SigningKey::from_bytes(&[1; 32])?;
    /// assert_eq!(key.id(), SigningKey::from_bytes(&[1; 32])?.id());
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn id(&self) -> u8 {
        self.id
    }

    /// A MAC state with the key absorbed, ready for the message.
    pub(crate) fn mac(&self) -> KeyedMac {
        self.mac.clone()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The keys one deployment signs and verifies with: one current key and any
/// number of previous keys.
///
/// Tokens are always signed with the current key; verification accepts every
/// key in the set. To rotate, make the new key current and keep the old one as
/// previous for at least one token TTL. A request that writes re-signs its
/// token with the current key.
///
/// ```
/// use read_after_write::{KeySet, SigningKey};
///
/// let old = SigningKey::from_bytes(&[1; 32])?;
/// let new = SigningKey::from_bytes(&[2; 32])?;
/// let keys = KeySet::new(new).with_previous(old);
/// assert_eq!(keys.len(), 2);
///
/// // The same from configuration: current key first, comma-separated.
/// let keys = KeySet::from_base64_list(
///     "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=, AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
/// )?;
/// assert_eq!(keys.len(), 2);
/// # Ok::<_, read_after_write::KeyError>(())
/// ```
#[derive(Clone, Debug)]
pub struct KeySet {
    current: SigningKey,
    previous: Vec<SigningKey>,
}

impl KeySet {
    /// A set holding only `current`.
    pub fn new(current: SigningKey) -> Self {
        KeySet {
            current,
            previous: Vec::new(),
        }
    }

    /// Adds a previous key, still accepted for verification.
    pub fn with_previous(mut self, key: SigningKey) -> Self {
        self.previous.push(key);
        self
    }

    /// Keys from a comma-separated list of base64 keys, current key first.
    ///
    /// ```
    /// use read_after_write::{KeyError, KeySet};
    ///
    /// assert_eq!(KeySet::from_base64_list(" , ").err(), Some(KeyError::Empty));
    /// ```
    pub fn from_base64_list(text: &str) -> Result<Self, KeyError> {
        let mut keys = text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(SigningKey::from_base64);
        let current = keys.next().ok_or(KeyError::Empty)??;
        keys.try_fold(KeySet::new(current), |set, key| Ok(set.with_previous(key?)))
    }

    /// Keys from the environment variable `name`, in the
    /// [`from_base64_list`](Self::from_base64_list) format.
    ///
    /// ```no_run
    /// use read_after_write::KeySet;
    ///
    /// let keys = KeySet::from_env("AFFINITY_KEY")?;
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn from_env(name: &str) -> Result<Self, KeyError> {
        let value = std::env::var(name).map_err(|_| KeyError::MissingEnv {
            name: name.to_owned(),
        })?;
        Self::from_base64_list(&value)
    }

    /// The key new tokens are signed with.
    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    /// How many keys the set holds, current included.
    pub fn len(&self) -> usize {
        1 + self.previous.len()
    }

    /// Always false: a set holds at least its current key.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every key whose id is `id`, current first. Ids are one byte, so two
    /// keys may share one; verification then tries each.
    pub(crate) fn with_id(&self, id: u8) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .filter(move |key| key.id == id)
    }
}

impl From<SigningKey> for KeySet {
    fn from(current: SigningKey) -> Self {
        KeySet::new(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused_with_a_clear_error() {
        let err = SigningKey::from_bytes(&[0; 16]).unwrap_err();
        assert_eq!(err, KeyError::TooShort { len: 16 });
        assert!(err.to_string().contains("at least 32"));
        assert_eq!(
            SigningKey::from_base64("c2hvcnQ=").unwrap_err(),
            KeyError::TooShort { len: 5 }
        );
    }

    #[test]
    fn base64_in_every_common_dialect_is_accepted() {
        let raw = [0xFBu8; 33];
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let text = format!("  {}\n", engine.encode(raw));
            let key = SigningKey::from_base64(&text).unwrap();
            assert_eq!(key.id(), SigningKey::from_bytes(&raw).unwrap().id());
        }
        assert_eq!(
            SigningKey::from_base64("not base64!").unwrap_err(),
            KeyError::InvalidBase64
        );
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let key = SigningKey::from_bytes(b"super-secret-key-material-0123456789").unwrap();
        let shown = format!("{key:?} {:?}", KeySet::new(key.clone()));
        assert!(!shown.contains("super-secret"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn env_list_puts_the_first_key_current() {
        let a = STANDARD.encode([1u8; 32]);
        let b = STANDARD.encode([2u8; 32]);
        let set = KeySet::from_base64_list(&format!("{a},{b}")).unwrap();
        assert_eq!(
            set.current().id(),
            SigningKey::from_bytes(&[1; 32]).unwrap().id()
        );
        assert_eq!(set.len(), 2);
        assert_eq!(
            KeySet::from_env("READ_AFTER_WRITE_SURELY_UNSET_VARIABLE").unwrap_err(),
            KeyError::MissingEnv {
                name: "READ_AFTER_WRITE_SURELY_UNSET_VARIABLE".into()
            }
        );
    }
}
