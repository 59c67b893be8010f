//! Signing keys and the key set that makes rotation painless. What is
//! wiped from memory, and what cannot be, is documented on [`SigningKey`].

use std::fmt;
use std::hint::black_box;
use std::sync::Arc;

use base64_simd::{Out, STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

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
    /// Every byte of the key is zero: an unset or placeholder secret, never a
    /// random one.
    #[error(
        "signing key is all zero bytes (an unset or placeholder secret?); \
         use at least 32 random bytes (for example `openssl rand -base64 32`)"
    )]
    AllZero,
    /// The environment variable is unset or not valid Unicode.
    #[error("environment variable {name} is not set (or not valid Unicode); put a key in it: {VALID_KEY}")]
    MissingEnv {
        /// The variable's name.
        name: String,
    },
    /// A key read from an environment variable by [`KeySet::from_env`] was
    /// refused. The message names the variable (and the key, in a list) and
    /// says what a valid key looks like; `error` is why it was refused.
    ///
    /// ```
    /// use read_after_write::{KeyError, KeySet};
    ///
    /// # fn main() {
    /// // AFFINITY_KEY=correct-horse-battery-staple-1234 (a passphrase, not a key)
    /// match KeySet::from_env("AFFINITY_KEY") {
    ///     Err(KeyError::InEnv { name, error, .. }) if matches!(*error, KeyError::TooShort { .. }) => {
    ///         eprintln!("{name} is too short")
    ///     }
    ///     _ => {}
    /// }
    /// # }
    /// ```
    #[error("{}", env_message(.name, *.list_index, .error))]
    InEnv {
        /// The variable's name.
        name: String,
        /// Which key of a comma-separated list was refused (0: the current
        /// key); `None` when the variable holds one key.
        list_index: Option<usize>,
        /// Why it was refused: [`TooShort`](KeyError::TooShort),
        /// [`InvalidBase64`](KeyError::InvalidBase64),
        /// [`AllZero`](KeyError::AllZero) or [`Empty`](KeyError::Empty).
        error: Box<KeyError>,
    },
    /// The operating system's random number generator failed.
    #[error("could not read random bytes from the operating system to generate a key")]
    Random,
}

/// What every key message ends with.
const VALID_KEY: &str = "a key is at least 32 random bytes, base64-encoded (44 characters), \
                         e.g. from `openssl rand -base64 32`";

/// The message of [`KeyError::InEnv`]: the variable and key first, then
/// what was wrong in terms of the text the operator put there.
fn env_message(name: &str, list_index: Option<usize>, error: &KeyError) -> String {
    let key = match list_index {
        None => name.to_owned(),
        Some(0) => format!("the first (current) key in {name}"),
        Some(i) => format!("key {} of the comma-separated list in {name}", i + 1),
    };
    match error {
        KeyError::TooShort { len } => format!(
            "{key} decodes to {len} bytes; {VALID_KEY} (the value is base64-decoded, not used \
             as a passphrase)"
        ),
        KeyError::InvalidBase64 => format!("{key} is not valid base64; {VALID_KEY}"),
        KeyError::AllZero => format!(
            "{key} decodes to all zero bytes (an unset or placeholder secret?); {VALID_KEY}"
        ),
        KeyError::Empty => format!(
            "{name} holds no key (it is empty or only commas); {VALID_KEY}; several keys are \
             comma-separated, current key first"
        ),
        other => format!("{key}: {other}"),
    }
}

/// One HMAC-SHA256 key for signing and verifying affinity tokens.
///
/// Keys must be at least 32 bytes of real randomness. Every web instance that
/// should honour another's tokens needs the same keys. A key's one-byte id is
/// derived from the key itself, so rotating needs no bookkeeping beyond the
/// order in which instances learn the new key: see
/// [rotating keys across a rolling deploy](KeySet#rotating-keys-across-a-rolling-deploy).
///
/// ```
/// use read_after_write::SigningKey;
///
/// let key = SigningKey::from_base64("c2VjcmV0LWtleS1vZi1hdC1sZWFzdC0zMi1ieXRlcyEh")?;
/// assert!(SigningKey::from_bytes(b"too short").is_err());
/// # Ok::<_, read_after_write::KeyError>(())
/// ```
///
/// # Key material in memory
///
/// What this crate can clear, it clears; what it cannot, is listed here.
///
/// - Decoded, generated and environment-read key bytes live in
///   [`Zeroizing`] buffers and are wiped when dropped, also when decoding
///   fails half way.
/// - A key holds its keyed HMAC state once, behind an [`Arc`]:
///   cloning a key, a [`KeySet`] or a layer shares that one copy instead of
///   spreading key material over the heap.
/// - That state is what a token is MACed with: SHA-256 with `key ⊕ ipad` and
///   `key ⊕ opad` already absorbed, computed once per key so a token costs
///   two compressions, not four. It is key-equivalent (it forges tokens,
///   though it does not reveal the key). `hmac` 0.12 and `digest` 0.10 offer
///   no `zeroize` feature (it arrives with `digest` 0.11 / `hmac` 0.13) and
///   the crate denies `unsafe`, so when the last clone of a key is dropped
///   the state is overwritten with one keyed by zeros and the store is kept
///   alive with [`std::hint::black_box`]: best effort, not a guarantee.
/// - Not cleared: the stack copies of that state each sign and verify makes
///   (`hmac` consumes them in `finalize`), the padded key blocks inside
///   `hmac`'s key setup and the key id's SHA-256 buffer, a caller's own
///   `&[u8]` or `&str`, the `String` [`SigningKey::generate_base64`] returns,
///   and the process environment [`KeySet::from_env`] reads. Keep keys out
///   of core dumps and swap at the operating-system level.
#[derive(Clone)]
pub struct SigningKey {
    /// The only copy of this key's material, however often it is cloned.
    material: Arc<KeyMaterial>,
}

/// A key's id, its keyed HMAC state and the key of its user tags, wiped
/// (best effort) on drop.
struct KeyMaterial {
    id: u8,
    mac: KeyedMac,
    /// SipHash-2-4 key of the user tags this key's tokens carry instead of
    /// user ids: derived from the key, so a tag reveals nothing to whoever
    /// lacks it.
    user_key: (u64, u64),
}

impl KeyMaterial {
    /// Overwrites the keyed state in place. There is no safe way to zero
    /// `Hmac`'s private fields, so the whole state is replaced by one keyed
    /// with an all-zero block, and `black_box` makes the store observable so
    /// it is not elided as dead before the memory is freed.
    fn wipe(&mut self) {
        self.mac = <KeyedMac as KeyInit>::new(&Default::default());
        black_box(&mut self.mac);
        self.user_key = (0, 0);
        black_box(&mut self.user_key);
    }
}

impl Drop for KeyMaterial {
    fn drop(&mut self) {
        self.wipe();
    }
}

impl SigningKey {
    /// The shortest key accepted, in bytes: the HMAC-SHA256 output size.
    pub const MIN_LEN: usize = 32;

    /// A key from raw bytes; refuses keys shorter than [`Self::MIN_LEN`]
    /// and keys of nothing but zero bytes.
    ///
    /// ```
    /// use read_after_write::{KeyError, SigningKey};
    ///
    /// assert!(SigningKey::from_bytes(&[7; 32]).is_ok());
    /// assert_eq!(SigningKey::from_bytes(&[7; 31]).err(), Some(KeyError::TooShort { len: 31 }));
    /// assert_eq!(SigningKey::from_bytes(&[0; 32]).err(), Some(KeyError::AllZero));
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        // Or-ing every byte (no early exit) keeps the check's time
        // independent of where the first non-zero byte sits.
        if bytes.iter().fold(0u8, |any, &byte| any | byte) == 0 {
            return Err(KeyError::AllZero);
        }
        let mut id_hash = Sha256::new();
        id_hash.update(b"read-after-write key id\0");
        id_hash.update(bytes);
        let id = id_hash.finalize()[0];
        let mac = <KeyedMac as Mac>::new_from_slice(bytes)
            .map_err(|_| KeyError::TooShort { len: bytes.len() })?;
        // The user-tag key: HMAC of a label under the key, so it is
        // independent of the token MAC's use of the same key.
        let mut derive = mac.clone();
        derive.update(b"read-after-write user tag key\0");
        let mut derived = Zeroizing::new([0u8; 32]);
        derived.copy_from_slice(&derive.finalize().into_bytes());
        let half = |range: std::ops::Range<usize>| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&derived[range]);
            u64::from_le_bytes(word)
        };
        let user_key = (half(0..8), half(8..16));
        Ok(SigningKey {
            material: Arc::new(KeyMaterial { id, mac, user_key }),
        })
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
        // One buffer for every dialect tried, wiped on drop whether decoding
        // succeeds, fails half way or the key is refused. Base64 never
        // decodes to more bytes than it has characters.
        let mut bytes = Zeroizing::new(vec![0u8; text.len()]);
        let text = text.as_bytes();
        let len = [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| {
                let len = engine.decoded_length(text).ok()?;
                let out = bytes.get_mut(..len)?;
                engine.decode(text, Out::from_slice(out)).ok().map(|_| len)
            })
            .ok_or(KeyError::InvalidBase64)?;
        Self::from_bytes(&bytes[..len])
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
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut_slice()).map_err(|_| KeyError::Random)?;
        Self::from_bytes(bytes.as_slice())
    }

    /// A fresh random 32-byte key as standard base64, ready to store in a
    /// secret or an environment variable.
    ///
    /// The raw bytes are wiped; the returned text is the key itself and is
    /// the caller's to protect.
    ///
    /// ```
    /// use read_after_write::SigningKey;
    ///
    /// assert_eq!(SigningKey::generate_base64()?.len(), 44);
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn generate_base64() -> Result<String, KeyError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut_slice()).map_err(|_| KeyError::Random)?;
        Ok(STANDARD.encode_to_string(bytes.as_slice()))
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
        self.material.id
    }

    /// A MAC state with the key absorbed, ready for the message.
    pub(crate) fn mac(&self) -> KeyedMac {
        self.material.mac.clone()
    }

    /// The tag a token signed with this key carries for `user` (version 3
    /// on): SipHash-2-4 under a key derived from this one, over the id's
    /// length and bytes. Without the key, a tag says nothing about the id,
    /// however small the space of ids; with it, binding a token to its user
    /// costs a few tens of nanoseconds, no MAC.
    pub(crate) fn user_tag(&self, user: &[u8]) -> u64 {
        use std::hash::Hasher as _;
        let (k0, k1) = self.material.user_key;
        let mut hasher = siphasher::sip::SipHasher24::new_with_keys(k0, k1);
        // UserId holds at most 255 bytes: the length fits a byte.
        hasher.write_u8(user.len() as u8);
        hasher.write(user);
        hasher.finish()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.material.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The keys one deployment signs and verifies with: one current key and any
/// number of previous keys.
///
/// Tokens are always signed with the current key; verification accepts every
/// key in the set. A request that writes re-signs its token with the current
/// key. In a list (`AFFINITY_KEY=a,b` for
/// [`from_env`](Self::from_env)), the first key is current and the rest are
/// previous: accepted, never used to sign.
///
/// # Rotating keys across a rolling deploy
///
/// Instances pick up a new key list one by one, so for a while some run the
/// old list and some the new one. An instance that meets a token signed with
/// a key it does not have cannot check it; it sends that user's session
/// reads of the clusters the token names to the primary
/// (`reason="unknown_key"`), since the token may promise a write. Safe, but
/// it costs the primary reads that a rotation in three phases never needs:
///
/// 1. Roll out `old,new`: `old` still signs, `new` is accepted only. Every
///    instance, rolled out or not, signs with `old` and knows it.
/// 2. Once every instance runs `old,new`, roll out `new,old`: `new` signs.
///    Instances on either list know both keys.
/// 3. Once every instance runs `new,old` and one token TTL has passed (no
///    token signed with `old` is still valid), roll out `new`.
///
/// In this order no instance ever meets a key it does not know. A deploy
/// that skips phase 1 (going straight to `new,old`) works too: until every
/// instance has the new list, the instances that do not know `new` read the
/// primary for users whose token it signed, instead of serving them stale
/// reads. A key dropped before its tokens expire has the same effect for
/// those tokens' remaining life.
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
        Self::parse_list(text).map_err(|(_, error)| error)
    }

    /// [`from_base64_list`](Self::from_base64_list), telling which key was
    /// refused: `None` when the text holds at most one.
    fn parse_list(text: &str) -> Result<Self, (Option<usize>, KeyError)> {
        let parts: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .collect();
        let at = |i: usize| (parts.len() > 1).then_some(i);
        let mut keys = parts
            .iter()
            .enumerate()
            .map(|(i, part)| SigningKey::from_base64(part).map_err(|error| (at(i), error)));
        let current = keys.next().ok_or((None, KeyError::Empty))??;
        keys.try_fold(KeySet::new(current), |set, key| Ok(set.with_previous(key?)))
    }

    /// Keys from the environment variable `name`, in the
    /// [`from_base64_list`](Self::from_base64_list) format.
    ///
    /// An unset variable is [`KeyError::MissingEnv`]; a refused key is
    /// [`KeyError::InEnv`], whose message names the variable and says what a
    /// valid key looks like, e.g. for a 32-character passphrase: "AFFINITY_KEY
    /// decodes to 24 bytes; a key is at least 32 random bytes, base64-encoded
    /// (44 characters), e.g. from `openssl rand -base64 32` (...)".
    ///
    /// ```no_run
    /// use read_after_write::KeySet;
    ///
    /// let keys = KeySet::from_env("AFFINITY_KEY")?;
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn from_env(name: &str) -> Result<Self, KeyError> {
        let value = Zeroizing::new(std::env::var(name).map_err(|_| KeyError::MissingEnv {
            name: name.to_owned(),
        })?);
        Self::from_named_text(name, &value)
    }

    /// [`from_env`](Self::from_env) for a value already read.
    fn from_named_text(name: &str, text: &str) -> Result<Self, KeyError> {
        Self::parse_list(text).map_err(|(list_index, error)| KeyError::InEnv {
            name: name.to_owned(),
            list_index,
            error: Box::new(error),
        })
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
    /// keys may share one; verification then tries each, and each try is a
    /// MAC that counts against a request's budget.
    pub(crate) fn with_id(&self, id: u8) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .filter(move |key| key.id() == id)
    }

    /// Whether some key of the set has the id `id`: a token under any other
    /// id was signed with a key this set does not hold.
    pub(crate) fn knows(&self, id: u8) -> bool {
        self.with_id(id).next().is_some()
    }
}

impl From<SigningKey> for KeySet {
    fn from(current: SigningKey) -> Self {
        KeySet::new(current)
    }
}

#[cfg(test)]
#[path = "tests_keys.rs"]
mod tests;
