//! Optional bearer-token authentication: when `web_auth_token` is set, the job routes need
//! `Authorization: Bearer <token>`; `/health` never does. A refusal is a plain 401 that does not
//! say what was wrong.

use rocket::http::Status;
use rocket::request::{FromRequest, Outcome, Request};

/// The configured token, managed state.
pub struct Auth {
    /// `None`: the API is open.
    pub token: Option<String>,
}

/// A request that passed authentication.
pub struct Authorized;

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Authorized {
    type Error = ();

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, ()> {
        let Some(expected) = request
            .rocket()
            .state::<Auth>()
            .and_then(|auth| auth.token.as_deref())
        else {
            return Outcome::Success(Authorized);
        };
        let given = request
            .headers()
            .get_one("Authorization")
            .and_then(|h| h.strip_prefix("Bearer "));
        match given {
            Some(given) if same(given.as_bytes(), expected.as_bytes()) => {
                Outcome::Success(Authorized)
            }
            _ => Outcome::Error((Status::Unauthorized, ())),
        }
    }
}

/// Equality whose time does not depend on where the first difference is.
fn same(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
    }
}
