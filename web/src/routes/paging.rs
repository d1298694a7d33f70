//! What the listing routes (`GET /tasks`, `GET /history`) share: the page size, the opaque
//! keyset cursor, and the check of text filters.

use chrono::DateTime;
use uuid::Uuid;

use crate::error::Error;
use crate::store::Cursor;

const DEFAULT_LIMIT: i64 = 50;
/// The largest page.
pub const MAX_LIMIT: i64 = 500;

/// The page size `limit` asks for: 1 to [`MAX_LIMIT`], 50 when not given.
pub fn limit_of(limit: Option<&str>) -> Result<i64, Error> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| Error::Unprocessable(format!("`limit` must be 1 to {MAX_LIMIT}"))),
    }
}

/// Refuses a text filter holding U+0000: PostgreSQL's text cannot hold it, so no row can match
/// such a filter; sent as a query parameter, it would fail the statement (an encoding error,
/// not a database gone away).
pub fn without_nul(name: &str, value: &Option<String>) -> Result<(), Error> {
    match value.as_deref().is_some_and(|text| text.contains('\0')) {
        true => Err(Error::Unprocessable(format!(
            "`{name}` may not hold the NUL character (\\u0000)"
        ))),
        false => Ok(()),
    }
}

/// The opaque cursor text: the time in microseconds and the id of the page's last row.
pub fn encode_cursor(cursor: Cursor) -> String {
    format!(
        "{}_{}",
        cursor.at.timestamp_micros(),
        cursor.task_id.simple()
    )
}

/// The cursor of a `next_cursor` text; 400 for any other text.
pub fn decode_cursor(text: &str) -> Result<Cursor, Error> {
    let bad = || Error::BadRequest(format!("invalid cursor {text:?}"));
    let (micros, id) = text.split_once('_').ok_or_else(bad)?;
    let at = micros
        .parse()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let task_id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Cursor { at, task_id })
}

/// Cuts `rows` (fetched with one more than `limit`) to the page, and gives the cursor of the
/// next page, if there is one, from the page's last row (`at` tells its place).
pub fn page<T>(rows: &mut Vec<T>, limit: i64, at: impl Fn(&T) -> Cursor) -> Option<String> {
    if rows.len() as i64 <= limit {
        return None;
    }
    rows.truncate(limit as usize);
    rows.last().map(|row| encode_cursor(at(row)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            at: DateTime::from_timestamp_micros(1_795_584_251_734_160).unwrap(),
            task_id: Uuid::new_v4(),
        };
        assert_eq!(decode_cursor(&encode_cursor(cursor)).unwrap(), cursor);
        for bad in ["", "x_y", "123", "123_not-a-uuid"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_are_1_to_500_and_50_by_default() {
        assert_eq!(limit_of(None).unwrap(), 50);
        assert_eq!(limit_of(Some("500")).unwrap(), 500);
        for bad in ["0", "501", "x", "-1"] {
            assert!(limit_of(Some(bad)).is_err(), "{bad}");
        }
    }
}
