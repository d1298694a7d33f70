//! `Idempotency-Key` on `POST /receive` (the header of the IETF draft
//! `draft-ietf-httpapi-idempotency-key-header`): the key read and checked from its header, the
//! scope it belongs to, the digest of the body it came with, and the loop that forgets expired
//! keys. That one key makes one job, however many replicas its repeats reach at once, is the
//! unique index's doing ([`store::insert_keyed`]); what a repeat answers is the route's.

use std::time::Duration;

use rocket::request::{FromRequest, Outcome, Request};
use sha2::{Digest, Sha256};

use crate::auth::Authorized;
use crate::db::Pool;
use crate::error::Error;
use crate::store;

/// The header's name.
pub const HEADER: &str = "Idempotency-Key";
/// The longest key taken, in characters (each one byte: printable ASCII only).
pub const MAX_KEY_CHARS: usize = 255;
/// Expired keys one statement deletes at most: a backlog (after an outage, or a TTL made
/// shorter) goes in short statements that hold no lock for long.
const FORGET_BATCH: i64 = 1000;

/// The key a request carries, if any, checked; a malformed one is 400.
pub struct IdempotencyKey(pub Option<String>);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for IdempotencyKey {
    type Error = Error;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Error> {
        let mut given = request.headers().get(HEADER);
        let key = match (given.next(), given.next()) {
            (None, _) => Ok(None),
            (Some(value), None) => parse_key(value).map(Some),
            (Some(_), Some(_)) => Err(Error::BadRequest(format!(
                "one {HEADER} header at most, not several"
            ))),
        };
        match key {
            Ok(key) => Outcome::Success(Self(key)),
            Err(error) => Outcome::Error((error.status(), error)),
        }
    }
}

/// The key a header value names: the value itself, or, in the draft's form (a structured-field
/// string, `"..."`), what is between the quotes, so `"k"` and `k` are one key. 1 to
/// [`MAX_KEY_CHARS`] printable ASCII characters (space to `~`), else 400: the key is stored and
/// compared as is, so no byte of it may be open to a reading.
pub fn parse_key(value: &str) -> Result<String, Error> {
    let key = value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value);
    let printable = key.bytes().all(|b| (b' '..=b'~').contains(&b));
    if key.is_empty() || key.len() > MAX_KEY_CHARS || !printable {
        return Err(Error::BadRequest(format!(
            "{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters (space to ~)"
        )));
    }
    Ok(key.to_string())
}

/// Whose keys a request's key is among: a JWT's subject has keys of its own; callers that
/// cannot be told apart (an open API, the shared token, a JWT without `sub`) share the scope
/// `""`, so one of them can repeat another's key. The prefix keeps a subject from ever being
/// that shared scope.
pub fn scope(caller: &Authorized) -> String {
    caller
        .subject
        .as_deref()
        .map(|subject| format!("sub:{subject}"))
        .unwrap_or_default()
}

/// SHA-256 of the body's bytes as received, not of its JSON re-encoded: a repeat is the same
/// request only if it sends the same bytes (a client that re-serialises with other spacing or
/// key order gets 422, never another job).
pub fn digest(body: &[u8]) -> Vec<u8> {
    Sha256::digest(body).to_vec()
}

/// How long keys are kept (`web_idempotency_ttl`), managed state.
#[derive(Debug, Clone, Copy)]
pub struct Ttl(pub Duration);

/// Deletes expired keys every `interval` until the process ends, in batches of
/// [`FORGET_BATCH`]. Each replica runs it; they skip the rows another is deleting. It runs
/// whether or not there is a result backend (the sweep of `tracking` needs one), so keys never
/// pile up.
pub async fn forget_expired(pool: Pool, ttl: Ttl, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        if let Err(error) = forget_expired_once(&pool, ttl).await {
            tracing::warn!(%error, "cannot delete expired idempotency keys; next round retries");
        }
    }
}

/// Deletes every key expired by now, a batch at a time; returns how many.
pub async fn forget_expired_once(pool: &Pool, ttl: Ttl) -> Result<usize, Error> {
    let mut forgotten = 0;
    loop {
        let mut connection = pool.get().await?;
        let deleted =
            store::forget_expired_keys(&mut connection, ttl.0.as_secs_f64(), FORGET_BATCH).await?;
        forgotten += deleted;
        if deleted < FORGET_BATCH as usize {
            return Ok(forgotten);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocket::http::Status;

    #[test]
    fn a_key_is_1_to_255_printable_ascii_characters() {
        for key in [
            "k",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            "a b~!",
            &"x".repeat(255),
        ] {
            assert_eq!(parse_key(key).unwrap(), key);
        }
        for bad in [
            "",
            "\"\"",
            &"x".repeat(256),
            "caf\u{e9}",
            "tab\there",
            "nul\0",
            "del\x7f",
        ] {
            let error = parse_key(bad).unwrap_err();
            assert_eq!(error.status(), Status::BadRequest, "{bad:?}");
            assert!(
                error.to_string().contains("1 to 255 printable ASCII"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_drafts_quoted_form_names_the_same_key() {
        assert_eq!(parse_key("\"abc\"").unwrap(), "abc");
        assert_eq!(parse_key("\"a\"b\"").unwrap(), "a\"b");
        // A lone quote is part of the key, not a form.
        assert_eq!(parse_key("\"abc").unwrap(), "\"abc");
        assert_eq!(
            parse_key(&format!("\"{}\"", "x".repeat(255)))
                .unwrap()
                .len(),
            255
        );
    }

    #[test]
    fn the_digest_is_sha256_of_the_bytes_as_sent() {
        // SHA-256("abc"), FIPS 180-2's example.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let hex: String = digest(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
        assert_ne!(digest(br#"{"a":1,"b":2}"#), digest(br#"{"b":2,"a":1}"#));
        assert_ne!(digest(br#"{"a":1}"#), digest(br#"{"a": 1}"#));
    }

    #[test]
    fn only_a_jwt_subject_has_a_scope_of_its_own() {
        let caller = |subject: Option<&str>| Authorized {
            expires_at: None,
            subject: subject.map(str::to_owned),
        };
        assert_eq!(scope(&caller(None)), "");
        assert_eq!(scope(&caller(Some("svc"))), "sub:svc");
        assert_ne!(scope(&caller(Some(""))), scope(&caller(None)));
    }
}
