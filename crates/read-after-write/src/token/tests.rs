//! The token format: round trips, tampering, keys, users, versions, and
//! the cheap checks before the MAC.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use proptest::prelude::*;
use smallvec::SmallVec;

use super::wire::{macs_computed, Checked, MacBudget, TokenBuffer, UnverifiedToken};
use super::*;
use crate::bookmark::ReplicaTag;
use crate::position::Lsn;

const NAME: &str = "primary_affinity";
const NOW: u64 = 1_700_000_000;

fn keys(byte: u8) -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[byte; 32]).unwrap())
}

fn user(id: u64) -> UserId {
    UserId::from(id)
}

fn sample(id: u64) -> AffinityToken {
    let position = WritePosition::new(Lsn::new(0x0000_0001_0203_0405), 3, 0xDEAD_BEEF_0000_0001);
    AffinityToken::new(user(id), position, NOW + 30)
}

/// Verifies for `id`, now.
fn verify(text: &str, keys: &KeySet, id: u64) -> Result<AffinityToken, TokenError> {
    AffinityToken::verify(text, NAME, keys, NOW, &user(id))
}

#[test]
fn round_trip_keeps_every_field() {
    let keys = keys(1);
    let token = sample(42);
    let text = token.sign(NAME, &keys);
    assert_eq!(
        text.len(),
        84,
        "the documented length of a one-cluster token"
    );
    assert!(text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    let back = verify(&text, &keys, 42).unwrap();
    assert_eq!(back.user(), token.user());
    assert_eq!(back.position(), token.position());
    assert_eq!(back.expires_at(), token.expires_at());
    assert_eq!(back.key_id(), keys.current().id());
    assert_eq!(back.version(), TOKEN_VERSION);
}

#[test]
fn the_user_id_is_not_in_the_token_and_its_length_does_not_show() {
    let signing = keys(1);
    let position = WritePosition::new(Lsn::new(0x500), 1, 7);
    let email =
        UserId::try_from("a.rather.long.address.of.sixty.four.bytes@mail.example.org").unwrap();
    let short = UserId::from(7u64);
    let email_token = AffinityToken::new(email.clone(), position, NOW + 30).sign(NAME, &signing);
    let short_token = AffinityToken::new(short.clone(), position, NOW + 30).sign(NAME, &signing);
    // One length for every user id: 84 characters for one cluster.
    assert_eq!(email_token.len(), 84);
    assert_eq!(short_token.len(), 84);
    let raw = URL_SAFE_NO_PAD.decode(&email_token).unwrap();
    for window in email.as_bytes().windows(4) {
        assert!(
            !raw.windows(4).any(|w| w == window),
            "a piece of the address is in the token"
        );
    }
    // The tag is keyed: another key gives another tag for the same user,
    // so tags cannot be matched across deployments or rotations.
    let tag = |text: &str| URL_SAFE_NO_PAD.decode(text).unwrap()[2..10].to_vec();
    let other = keys(2);
    let under_other = AffinityToken::new(short.clone(), position, NOW + 30).sign(NAME, &other);
    assert_ne!(tag(&short_token), tag(&under_other));
    assert!(AffinityToken::verify(&email_token, NAME, &signing, NOW, &email).is_ok());
}

#[test]
fn a_token_of_another_user_is_refused_without_a_mac() {
    let keys = keys(1);
    let text = sample(1).sign(NAME, &keys);
    let before = macs_computed();
    assert_eq!(verify(&text, &keys, 2), Err(TokenError::OtherUser));
    assert_eq!(macs_computed(), before, "the keyed tag decides, no MAC");
    assert!(verify(&text, &keys, 1).is_ok());
}

#[test]
fn the_mac_input_is_unambiguous_whatever_the_name() {
    // Versions 1 and 2 MACed `name ‖ 0x00 ‖ payload`: a token signed for
    // `a` could re-verify under a name holding a NUL byte. The length
    // prefix of version 3 keeps every (name, payload) apart.
    let keys = keys(1);
    let text = sample(1).sign("a", &keys);
    let raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
    for name in ["a\0", "a\0\u{3}", "", "aa", "\0a"] {
        assert_eq!(
            AffinityToken::verify(&text, name, &keys, NOW, &user(1)),
            Err(TokenError::BadSignature),
            "{name:?}"
        );
    }
    // Nor can a version 3 token be read as a version 2 one: the version
    // byte is covered, and flipping it fails the MAC or the layout.
    let mut as_v2 = raw.clone();
    as_v2[0] = 2;
    assert!(verify(&URL_SAFE_NO_PAD.encode(&as_v2), &keys, 1).is_err());
}

#[test]
fn every_single_byte_tamper_is_rejected() {
    let keys = keys(1);
    let text = sample(7).sign(NAME, &keys);
    let raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
    for i in 0..raw.len() {
        for flip in [0x01u8, 0x80, 0xFF] {
            let mut tampered = raw.clone();
            tampered[i] ^= flip;
            let forged = URL_SAFE_NO_PAD.encode(&tampered);
            assert!(
                verify(&forged, &keys, 7).is_err(),
                "byte {i} ^ {flip:#x} verified"
            );
        }
    }
    // And at the text level: every character replaced by every other.
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for i in 0..text.len() {
        for &c in alphabet {
            if text.as_bytes()[i] == c {
                continue;
            }
            let mut forged = text.clone().into_bytes();
            forged[i] = c;
            let forged = String::from_utf8(forged).unwrap();
            assert!(
                verify(&forged, &keys, 7).is_err(),
                "char {i} -> {}",
                c as char
            );
        }
    }
}

#[test]
fn wrong_key_other_name_and_expiry_are_refused_by_reason() {
    let text = sample(1).sign(NAME, &keys(1));
    // A different key with a different id, and one forced to share the id.
    let other = keys(2);
    let outcome = verify(&text, &other, 1).unwrap_err();
    if other.current().id() == keys(1).current().id() {
        assert!(matches!(
            outcome,
            TokenError::BadSignature | TokenError::OtherUser
        ));
    } else {
        assert_eq!(outcome, TokenError::UnknownKey);
    }
    let same_id = (3u8..=255)
        .map(keys)
        .find(|k| k.current().id() == keys(1).current().id())
        .expect("some key shares a one-byte id");
    // Under another key the tag is (almost surely) another user's.
    assert!(matches!(
        verify(&text, &same_id, 1),
        Err(TokenError::OtherUser | TokenError::BadSignature)
    ));
    assert_eq!(
        AffinityToken::verify(&text, "session", &keys(1), NOW, &user(1)),
        Err(TokenError::BadSignature)
    );
    assert!(AffinityToken::verify(&text, NAME, &keys(1), NOW + 29, &user(1)).is_ok());
    assert_eq!(
        AffinityToken::verify(&text, NAME, &keys(1), NOW + 30, &user(1)),
        Err(TokenError::Expired)
    );
}

#[test]
fn oversize_garbage_and_foreign_versions_are_refused() {
    let keys = keys(1);
    let long = "A".repeat(MAX_ENCODED_LEN + 1);
    assert_eq!(verify(&long, &keys, 1), Err(TokenError::TooLong));
    let huge = "A".repeat(1 << 20);
    assert_eq!(verify(&huge, &keys, 1), Err(TokenError::TooLong));
    for junk in [
        "",
        "=",
        "AAAA=",
        "a b",
        "🍪",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        assert!(verify(junk, &keys, 1).is_err(), "{junk:?}");
    }
    let mut raw = URL_SAFE_NO_PAD.decode(sample(1).sign(NAME, &keys)).unwrap();
    raw[0] = 4;
    assert_eq!(
        verify(&URL_SAFE_NO_PAD.encode(&raw), &keys, 1),
        Err(TokenError::WrongVersion)
    );
    // A bookmark count that disagrees with the real length.
    let mut raw = URL_SAFE_NO_PAD.decode(sample(1).sign(NAME, &keys)).unwrap();
    raw[18] = 2;
    assert_eq!(
        verify(&URL_SAFE_NO_PAD.encode(&raw), &keys, 1),
        Err(TokenError::Malformed)
    );
}

/// `text` (a token of this release) as a later release would write it:
/// the head every format shares kept, `version` in it, a field appended.
fn later_format(text: &str, version: u8) -> String {
    let mut raw = URL_SAFE_NO_PAD.decode(text).unwrap();
    raw[0] = version;
    raw.push(0xA5);
    URL_SAFE_NO_PAD.encode(raw)
}

#[test]
fn a_later_format_keeps_its_head_and_claims_every_cluster() {
    let known = keys(1);
    let signed = sample(7).sign(NAME, &known);
    for version in [TOKEN_VERSION + 1, 9, u8::MAX] {
        let text = later_format(&signed, version);
        let mut buffer = TokenBuffer::new();
        let token = UnverifiedToken::parse(&text, NOW, &mut buffer).unwrap();
        assert!(token.is_newer());
        // The head every version from 3 on shares: key id, tag, expiry.
        assert_eq!(token.key_id(), known.current().id());
        assert_eq!(token.expires_at(), NOW + 30);
        assert!(token.may_name(&user(7), &known));
        assert!(!token.may_name(&user(8), &known), "another user's tag");
        let stranger = keys(2);
        assert_ne!(stranger.current().id(), known.current().id());
        assert!(
            token.may_name(&user(8), &stranger),
            "under an unknown key, anyone's"
        );
        // Its bookmarks are the later release's: it may promise a write in
        // any cluster.
        assert_eq!(
            token.bookmarks(),
            Bookmarks::one(crate::bookmark::Bookmark::EVERY_CLUSTER)
        );
        // Never authentic here, and not worth a MAC.
        let macs = macs_computed();
        assert_eq!(
            token.authenticate(NAME, &known, &user(7), &mut MacBudget::new(16)),
            Checked::Unchecked
        );
        assert_eq!(macs_computed(), macs);
        assert_eq!(verify(&text, &known, 7), Err(TokenError::WrongVersion));
        // Past its expiry, expired like any token.
        assert_eq!(
            UnverifiedToken::parse(&text, NOW + 30, &mut TokenBuffer::new()).err(),
            Some(TokenError::Expired)
        );
    }
    // Version 0 never existed.
    assert_eq!(
        verify(&later_format(&signed, 0), &known, 7),
        Err(TokenError::WrongVersion)
    );
}

#[test]
fn previous_keys_still_verify_after_rotation() {
    let old = SigningKey::from_bytes(&[1; 32]).unwrap();
    let new = SigningKey::from_bytes(&[2; 32]).unwrap();
    let text = sample(5).sign(NAME, &KeySet::new(old.clone()));
    let rotated = KeySet::new(new.clone()).with_previous(old.clone());
    let back = verify(&text, &rotated, 5).unwrap();
    assert_eq!(back.key_id(), old.id());
    let resigned = back.sign(NAME, &rotated);
    assert_eq!(verify(&resigned, &rotated, 5).unwrap().key_id(), new.id());
    // Once the old key is dropped, its tokens stop verifying.
    assert!(verify(&text, &KeySet::new(new), 5).is_err());
}

/// A version 1 or 2 token, signed as this crate did before version 3.
fn sign_legacy(
    version: u8,
    id: &UserId,
    bookmarks: &Bookmarks,
    expires_at: u64,
    keys: &KeySet,
) -> String {
    let key = keys.current();
    let mut raw: SmallVec<[u8; 400]> = SmallVec::new();
    raw.extend_from_slice(&[version, key.id(), id.as_bytes().len() as u8]);
    raw.extend_from_slice(id.as_bytes());
    if version == 1 {
        let position = bookmarks.as_slice()[0].position;
        raw.extend_from_slice(&position.lsn.as_u64().to_be_bytes());
        raw.extend_from_slice(&position.timeline.to_be_bytes());
        raw.extend_from_slice(&position.system_id.to_be_bytes());
        raw.extend_from_slice(&expires_at.to_be_bytes());
    } else {
        raw.extend_from_slice(&expires_at.to_be_bytes());
        raw.push(bookmarks.len() as u8);
        for bookmark in bookmarks.as_slice() {
            raw.extend_from_slice(&bookmark.position.system_id.to_be_bytes());
            raw.extend_from_slice(&bookmark.position.timeline.to_be_bytes());
            raw.extend_from_slice(&bookmark.position.lsn.as_u64().to_be_bytes());
            raw.extend_from_slice(&bookmark.replica.map_or(0, ReplicaTag::get).to_be_bytes());
        }
    }
    UnverifiedToken::sign_legacy(&mut raw, key, NAME);
    URL_SAFE_NO_PAD.encode(&raw)
}

#[test]
fn version_1_and_2_tokens_keep_their_promise_until_they_expire() {
    let keys = keys(1);
    let id = user(5);
    let position = WritePosition::new(Lsn::new(0x1_6B37_4800), 2, 77);
    let one = Bookmarks::one(Bookmark::new(position));
    let v1 = sign_legacy(1, &id, &one, NOW + 30, &keys);
    assert_eq!(v1.len(), 74, "the length of a version 1 token");
    let v2 = sign_legacy(2, &id, &one, NOW + 30, &keys);
    assert_eq!(v2.len(), 86, "the length of a version 2 token");
    for (version, text) in [(1, &v1), (2, &v2)] {
        let token = verify(text, &keys, 5).unwrap();
        assert_eq!(token.version(), version);
        assert_eq!(token.bookmarks(), &one);
        assert_eq!(token.expires_at(), NOW + 30);
        assert_eq!(verify(text, &keys, 6), Err(TokenError::OtherUser));
        assert_eq!(
            AffinityToken::verify(text, NAME, &keys, NOW + 30, &id),
            Err(TokenError::Expired)
        );
        // Re-signed, it is version 3 and promises the same.
        let again = verify(&token.sign(NAME, &keys), &keys, 5).unwrap();
        assert_eq!((again.version(), again.bookmarks()), (3, token.bookmarks()));
        // Tampered, it fails its MAC.
        let mut raw = URL_SAFE_NO_PAD.decode(text).unwrap();
        raw[12] ^= 1;
        assert_eq!(
            verify(&URL_SAFE_NO_PAD.encode(&raw), &keys, 5),
            Err(TokenError::BadSignature)
        );
    }
    // The longest version 2 token sets the limit.
    let longest = UserId::new(&[0xAB; 255]).unwrap();
    let mut four = Bookmarks::new();
    for system in 1..=MAX_CLUSTERS as u64 {
        let at = WritePosition::new(Lsn::new(u64::MAX), u32::MAX, system);
        four.set(Bookmark::new(at).returning_to(ReplicaTag::new(u64::MAX >> 1).unwrap()));
    }
    let text = sign_legacy(2, &longest, &four, NOW + 1, &keys);
    assert_eq!(text.len(), MAX_ENCODED_LEN);
    assert_eq!(MAX_ENCODED_LEN, 527);
    assert!(AffinityToken::verify(&text, NAME, &keys, NOW, &longest).is_ok());
}

#[test]
fn four_clusters_fit_and_a_fifth_does_not() {
    let keys = keys(1);
    let mut bookmarks = Bookmarks::new();
    for system in 1..=MAX_CLUSTERS as u64 {
        let at = WritePosition::new(Lsn::new(u64::MAX), u32::MAX, system);
        bookmarks.set(Bookmark::new(at).returning_to(ReplicaTag::new(u64::MAX >> 1).unwrap()));
    }
    let token = AffinityToken::with_bookmarks(user(9), bookmarks, NOW + 1).unwrap();
    let text = token.sign(NAME, &keys);
    assert_eq!(text.len(), 196, "84, and 37 or 38 more per cluster");
    assert_eq!(
        verify(&text, &keys, 9).unwrap().bookmarks(),
        token.bookmarks()
    );
    let mut five = token.bookmarks().clone();
    assert!(!five.set(Bookmark::new(WritePosition::new(Lsn::new(1), 1, 99))));
}

#[test]
fn a_bookmark_count_out_of_range_is_malformed() {
    let keys = keys(1);
    let raw = URL_SAFE_NO_PAD.decode(sample(1).sign(NAME, &keys)).unwrap();
    let count_at = 18;
    assert_eq!(raw[count_at], 1);
    for count in [0u8, 2, 5, 255] {
        let mut bad = raw.clone();
        bad[count_at] = count;
        assert_eq!(
            verify(&URL_SAFE_NO_PAD.encode(&bad), &keys, 1),
            Err(TokenError::Malformed),
            "count {count}"
        );
    }
    assert_eq!(
        AffinityToken::with_bookmarks(user(1), Bookmarks::new(), NOW),
        Err(BookmarkCountError)
    );
}

#[test]
fn cheap_checks_come_before_the_mac() {
    let other = keys(2);
    let keys = keys(1);
    let text = sample(7).sign(NAME, &keys);
    let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
    let tag_start = raw.len() - 16;
    raw[tag_start] ^= 1;
    let forged = URL_SAFE_NO_PAD.encode(&raw);
    // A bad MAC passes every check that needs no MAC...
    let mut buffer = TokenBuffer::new();
    let unverified = UnverifiedToken::parse(&forged, NOW, &mut buffer).unwrap();
    assert!(unverified.may_name(&user(7), &keys));
    assert!(!unverified.may_name(&user(8), &keys));
    assert_eq!(unverified.bookmarks(), *sample(7).bookmarks());
    assert_eq!(unverified.expires_at(), NOW + 30);
    assert_eq!(unverified.key_id(), keys.current().id());
    let before = macs_computed();
    assert_eq!(
        unverified.authenticate(NAME, &keys, &user(7), &mut MacBudget::new(1)),
        Checked::Forged
    );
    assert_eq!(macs_computed(), before + 1);
    // ...and an expired forgery is refused as expired, before any MAC,
    // whichever key it names.
    let expired = |keys: &KeySet| AffinityToken::verify(&forged, NAME, keys, NOW + 30, &user(7));
    assert_eq!(expired(&keys), Err(TokenError::Expired));
    assert_eq!(expired(&other), Err(TokenError::Expired));
    assert_eq!(macs_computed(), before + 1);
    // A version 3 token under a key the set does not hold may be anyone's:
    // its tag cannot be checked.
    let foreign = sample(7).sign(NAME, &other);
    let mut buffer = TokenBuffer::new();
    let unknown = UnverifiedToken::parse(&foreign, NOW, &mut buffer).unwrap();
    if !keys.knows(unknown.key_id()) {
        assert!(unknown.may_name(&user(8), &keys));
    }
    let mut buffer = TokenBuffer::new();
    let genuine = UnverifiedToken::parse(&text, NOW, &mut buffer).unwrap();
    assert_eq!(
        genuine.authenticate(NAME, &keys, &user(7), &mut MacBudget::new(0)),
        Checked::Unchecked,
        "no budget, no MAC"
    );
    assert_eq!(macs_computed(), before + 1);
    assert_eq!(
        genuine.authenticate(NAME, &keys, &user(7), &mut MacBudget::new(1)),
        Checked::Authentic(AffinityToken {
            key_id: keys.current().id(),
            ..sample(7)
        })
    );
}

#[test]
fn every_key_sharing_the_id_costs_a_mac_of_the_budget() {
    // Three keys with one id: ids are one byte, so some among a few
    // hundred keys share one. Version 2 tokens (the user id in clear) name
    // the user under every key, so each key costs a MAC.
    let mut by_id: Vec<Vec<SigningKey>> = vec![Vec::new(); 256];
    let sharing = (0u16..)
        .find_map(|n| {
            let mut bytes = [0x5A; 32];
            bytes[..2].copy_from_slice(&n.to_be_bytes());
            let key = SigningKey::from_bytes(&bytes).unwrap();
            let same = &mut by_id[usize::from(key.id())];
            same.push(key);
            (same.len() == 3).then(|| same.clone())
        })
        .unwrap();
    // Signed with the last of the three.
    let set = KeySet::new(sharing[0].clone())
        .with_previous(sharing[1].clone())
        .with_previous(sharing[2].clone());
    let text = sign_legacy(
        2,
        &user(7),
        sample(7).bookmarks(),
        NOW + 30,
        &KeySet::new(sharing[2].clone()),
    );
    let mut buffer = TokenBuffer::new();
    let token = UnverifiedToken::parse(&text, NOW, &mut buffer).unwrap();
    let mut budget = MacBudget::new(2);
    assert_eq!(
        token.authenticate(NAME, &set, &user(7), &mut budget),
        Checked::Unchecked
    );
    let mut budget = MacBudget::new(3);
    assert!(matches!(
        token.authenticate(NAME, &set, &user(7), &mut budget),
        Checked::Authentic(_)
    ));
    assert!(verify(&text, &set, 7).is_ok());
    // A version 3 token names its user under its own key only: the others
    // cost nothing.
    let v3 = sample(7).sign(NAME, &KeySet::new(sharing[2].clone()));
    let mut buffer = TokenBuffer::new();
    let token = UnverifiedToken::parse(&v3, NOW, &mut buffer).unwrap();
    let before = macs_computed();
    assert!(matches!(
        token.authenticate(NAME, &set, &user(7), &mut MacBudget::new(1)),
        Checked::Authentic(_)
    ));
    assert_eq!(macs_computed(), before + 1);
}

#[test]
fn promise_comparison_follows_the_rules() {
    let at = |lsn: u64, timeline: u32, system: u64| {
        AffinityToken::new(
            user(1),
            WritePosition::new(Lsn::new(lsn), timeline, system),
            NOW,
        )
    };
    let expiring = |mut token: AffinityToken, expires_at: u64| {
        token.expires_at = expires_at;
        token
    };
    let pinned = AffinityToken::new(user(1), WritePosition::default(), NOW);
    let cases = [
        // (more, less)
        (at(0x300, 1, 7), expiring(at(0x100, 1, 7), NOW + 99)),
        (at(0x1, 2, 7), expiring(at(0x900, 1, 7), NOW + 99)),
        (expiring(at(0x1, 1, 8), NOW + 1), at(0x900, 1, 7)),
        (expiring(at(0x100, 1, 7), NOW + 1), at(0x100, 1, 7)),
        (
            pinned.clone(),
            expiring(at(u64::MAX, u32::MAX, u64::MAX), NOW + 99),
        ),
        (expiring(pinned.clone(), NOW + 1), pinned.clone()),
    ];
    for (more, less) in cases {
        assert!(more.promises_more_than(&less), "{more:?} > {less:?}");
        assert!(!less.promises_more_than(&more), "{less:?} < {more:?}");
        assert!(!more.promises_more_than(&more), "strict");
    }
    // Position 0/0 on a real timeline is a position, not "pinned".
    assert!(!WritePosition::new(Lsn::ZERO, 1, 7).pins_primary());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn at_most_one_of_two_tokens_promises_more(
        a in (any::<u64>(), 0u32..3, 0u64..3, 0u64..3),
        b in (any::<u64>(), 0u32..3, 0u64..3, 0u64..3),
    ) {
        let token = |(lsn, timeline, system, expiry): (u64, u32, u64, u64)| {
            AffinityToken::new(
                user(1),
                WritePosition::new(Lsn::new(lsn % 4), timeline, system),
                NOW + expiry,
            )
        };
        let (a, b) = (token(a), token(b));
        prop_assert!(!(a.promises_more_than(&b) && b.promises_more_than(&a)));
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,600}") {
        let _ = verify(&text, &keys(1), 1);
    }

    #[test]
    fn arbitrary_base64_bytes_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..320)) {
        let text = URL_SAFE_NO_PAD.encode(&bytes);
        prop_assert!(verify(&text, &keys(1), 1).is_err());
    }

    #[test]
    fn no_mutation_of_a_valid_token_verifies(
        id in proptest::collection::vec(any::<u8>(), 0..=255),
        lsn in any::<u64>(),
        timeline in any::<u32>(),
        system in any::<u64>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        truncate in proptest::option::of(any::<usize>()),
        extra in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let keys = keys(1);
        let id = UserId::new(&id).unwrap();
        let token = AffinityToken::new(
            id.clone(),
            WritePosition::new(Lsn::new(lsn), timeline, system),
            NOW + 60,
        );
        let original = URL_SAFE_NO_PAD.decode(token.sign(NAME, &keys)).unwrap();
        let mut raw = original.clone();
        for (at, xor) in edits {
            let at = at % raw.len();
            raw[at] ^= xor;
        }
        if let Some(cut) = truncate {
            raw.truncate(cut % (raw.len() + 1));
        }
        raw.extend_from_slice(&extra);
        prop_assume!(raw != original);
        let forged = URL_SAFE_NO_PAD.encode(&raw);
        prop_assert!(AffinityToken::verify(&forged, NAME, &keys, NOW, &id).is_err());
    }
}

#[test]
fn a_floor_travels_with_its_replica_and_a_plain_tie_without_one() {
    let keys = keys(1);
    let tag = ReplicaTag::of("replica-1", 1_700_000_000_000_000);
    let at = WritePosition::new(Lsn::new(0x900), 1, 7);
    for bookmark in [
        Bookmark::new(at).on_replica(tag),
        Bookmark::new(at).returning_to(tag),
    ] {
        let text = AffinityToken::with_bookmarks(user(9), Bookmarks::one(bookmark), NOW + 30)
            .unwrap()
            .sign(NAME, &keys);
        let read = AffinityToken::verify(&text, NAME, &keys, NOW, &user(9)).unwrap();
        assert_eq!(read.bookmarks().as_slice(), [bookmark]);
    }
}
