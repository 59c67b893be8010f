//! Keys: parsing, ids, rotation lists, errors, and wiping.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;

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
fn an_all_zero_key_is_refused() {
    assert!(SigningKey::from_bytes(&[0; 32]).is_err());
    assert!(SigningKey::from_bytes(&[0; 64]).is_err());
    assert!(SigningKey::from_base64(&STANDARD.encode([0u8; 32])).is_err());
    let mut almost = [0u8; 32];
    almost[31] = 1;
    assert!(SigningKey::from_bytes(&almost).is_ok());
}

#[test]
fn an_all_zero_key_is_refused_by_name() {
    let err = SigningKey::from_bytes(&[0; 32]).unwrap_err();
    assert_eq!(err, KeyError::AllZero);
    assert!(err.to_string().contains("random"), "{err}");
    // Length is checked first: a short zero key is too short.
    assert_eq!(
        SigningKey::from_bytes(&[0; 16]).unwrap_err(),
        KeyError::TooShort { len: 16 }
    );
}

#[test]
fn clones_share_one_copy_of_the_key() {
    // One pointer: a clone is a reference count, not a second copy of
    // the keyed HMAC state.
    assert_eq!(
        std::mem::size_of::<SigningKey>(),
        std::mem::size_of::<usize>()
    );
    let key = SigningKey::from_bytes(&[5; 32]).unwrap();
    let set = KeySet::new(key.clone()).with_previous(key.clone());
    let copies = set.clone();
    assert!(Arc::ptr_eq(&key.material, &copies.current().material));
    assert_eq!(Arc::strong_count(&key.material), 5);
    drop((set, copies));
    assert_eq!(Arc::strong_count(&key.material), 1);
}

#[test]
fn a_dropped_key_leaves_a_zero_keyed_state_behind() {
    // What `Drop` writes over the keyed state: a state keyed by zeros,
    // which MACs like HMAC with an all-zero key.
    let mut material = KeyMaterial {
        id: 0,
        mac: <KeyedMac as Mac>::new_from_slice(&[9; 32]).unwrap(),
        user_key: (9, 9),
    };
    material.wipe();
    let tag = |mac: KeyedMac| mac.chain_update(b"m").finalize().into_bytes();
    assert_eq!(
        tag(material.mac.clone()),
        tag(<KeyedMac as Mac>::new_from_slice(&[0; 32]).unwrap())
    );
    drop(material);
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

#[test]
fn env_errors_name_the_variable_and_what_a_key_looks_like() {
    let err = |text: &str| KeySet::from_named_text("AFFINITY_KEY", text).unwrap_err();
    // A 32-character passphrase is base64 of 24 bytes.
    let passphrase = "correct-horse-battery-staple-123";
    assert_eq!(passphrase.len(), 32);
    let error = err(passphrase);
    assert_eq!(
        error,
        KeyError::InEnv {
            name: "AFFINITY_KEY".into(),
            list_index: None,
            error: Box::new(KeyError::TooShort { len: 24 }),
        }
    );
    let message = error.to_string();
    assert!(
        message.starts_with(
            "AFFINITY_KEY decodes to 24 bytes; a key is at least 32 random bytes, \
             base64-encoded (44 characters), e.g. from `openssl rand -base64 32`"
        ),
        "{message}"
    );
    // The error is its own message, not a chain that repeats it.
    assert!(std::error::Error::source(&error).is_none());

    let message = err("not base64!").to_string();
    assert!(
        message.starts_with("AFFINITY_KEY is not valid base64; a key is"),
        "{message}"
    );
    let message = err(&STANDARD.encode([0u8; 32])).to_string();
    assert!(
        message.starts_with("AFFINITY_KEY decodes to all zero bytes"),
        "{message}"
    );
    let message = err(" , ").to_string();
    assert!(
        message.starts_with("AFFINITY_KEY holds no key"),
        "{message}"
    );

    // In a rotation list, the message says which key.
    let good = STANDARD.encode([1u8; 32]);
    let error = err(&format!("{good}, c2hvcnQ="));
    assert!(
        matches!(&error, KeyError::InEnv { list_index: Some(1), error, .. } if **error == KeyError::TooShort { len: 5 }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("key 2 of the comma-separated list in AFFINITY_KEY decodes to 5 bytes"),
        "{error}"
    );
    let message = err(&format!("c2hvcnQ=,{good}")).to_string();
    assert!(
        message.starts_with("the first (current) key in AFFINITY_KEY"),
        "{message}"
    );

    // Outside the environment, errors stay as they were.
    assert_eq!(
        KeySet::from_base64_list(passphrase).unwrap_err(),
        KeyError::TooShort { len: 24 }
    );
    assert!(KeySet::from_named_text("AFFINITY_KEY", &good).is_ok());
    assert!(KeyError::MissingEnv { name: "K".into() }
        .to_string()
        .contains("openssl rand -base64 32"));
}
