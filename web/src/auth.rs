//! Optional bearer authentication of the job routes. When `web_auth_token` or `web_jwt_secret` is
//! set, they need `Authorization: Bearer <x>`, where `x` is the shared token or a JWT signed
//! HS256 with the secret (`exp` required, `nbf` honoured, a few seconds of leeway for clock skew;
//! no other algorithm, `none` included, is taken); `/health` never does. A refusal is a plain 401
//! that does not say what was wrong: the reason is logged at debug level, the token never.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome, Request};
use runtime::CeleryConfig;
use serde::Deserialize;

/// Seconds of clock skew allowed when checking a JWT's `exp` and `nbf`.
pub const JWT_LEEWAY_SECONDS: u64 = 30;

/// What a request must present, managed state; one check for both kinds of credential.
pub struct Auth {
    /// The shared token (`web_auth_token`).
    token: Option<String>,
    /// How JWTs are checked, when `web_jwt_secret` is set.
    jwt: Option<Jwt>,
}

/// The key and the rules of accepted JWTs.
struct Jwt {
    key: DecodingKey,
    validation: Validation,
}

/// The claims read. The time claims' types are whole seconds since the epoch: reading them here
/// refuses a token whose `nbf` is malformed, which `Validation` alone would skip; that `exp` is
/// present is `Validation`'s check. `sub` names the caller (the scope of its idempotency keys);
/// it is read as any JSON so that a token taken before is not refused for its type. Other claims
/// are not read.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
    #[serde(default)]
    sub: Option<serde_json::Value>,
}

/// Why a request was refused: logged, never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    MissingHeader,
    /// An `Authorization` header that is not `Bearer <x>`.
    NotBearer,
    /// Not the shared token (and no JWT secret is set).
    WrongToken,
    /// A JWT past its `exp`.
    Expired,
    /// A JWT before its `nbf`.
    NotYetValid,
    /// A JWT whose signature is not the secret's.
    BadSignature,
    /// A JWT signed with another algorithm than HS256 (or none).
    WrongAlgorithm,
    /// A JWT without `exp`.
    MissingExpiry,
    /// A claim the deployment does not accept, or one it requires missing (`iss`, `aud`).
    ClaimRejected,
    /// Neither the shared token nor a well-formed JWT.
    Malformed,
}

impl Auth {
    /// Checks against the shared token (`web_auth_token`) and JWTs signed with
    /// `web_jwt_secret`; with neither, the API is open. A JWT must also carry `web_jwt_issuer`
    /// as its `iss` when that is set, and name `web_jwt_audience` in its `aud` when that is set;
    /// without an audience set, a token with an `aud` is refused: it is meant for another
    /// service. (The settings refuse a secret under 32 bytes.)
    pub fn new(config: &CeleryConfig) -> Self {
        let token = config.web_auth_token.clone();
        let (jwt_secret, issuer, audience) = (
            config.web_jwt_secret.as_deref(),
            config.web_jwt_issuer.as_deref(),
            config.web_jwt_audience.as_deref(),
        );
        let jwt = jwt_secret.map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = JWT_LEEWAY_SECONDS;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            let mut required = vec!["exp"];
            if let Some(issuer) = issuer {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            if let Some(audience) = audience {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            validation.set_required_spec_claims(&required);
            Jwt {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation,
            }
        });
        Self { token, jwt }
    }

    /// No credential is required.
    pub fn is_open(&self) -> bool {
        self.token.is_none() && self.jwt.is_none()
    }

    /// Whether a request with this `Authorization` header value may pass, until when and as
    /// whom (see [`Authorized`]).
    pub fn check(&self, authorization: Option<&str>) -> Result<Authorized, Refusal> {
        let anonymous = Authorized {
            expires_at: None,
            subject: None,
        };
        if self.is_open() {
            return Ok(anonymous);
        }
        let given = authorization
            .ok_or(Refusal::MissingHeader)?
            .strip_prefix("Bearer ")
            .ok_or(Refusal::NotBearer)?;
        if let Some(token) = &self.token {
            if same(given.as_bytes(), token.as_bytes()) {
                return Ok(anonymous);
            }
        }
        match &self.jwt {
            Some(jwt) => jwt.check(given),
            None => Err(Refusal::WrongToken),
        }
    }
}

impl Jwt {
    /// The caller `token` names: until when it passes (its `exp` and the leeway), and its `sub`
    /// (a string as is, any other JSON as its text).
    fn check(&self, token: &str) -> Result<Authorized, Refusal> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| Authorized {
                expires_at: data
                    .claims
                    .exp
                    .map(|exp| exp.saturating_add(self.validation.leeway)),
                subject: data.claims.sub.map(|sub| match sub {
                    serde_json::Value::String(sub) => sub,
                    other => other.to_string(),
                }),
            })
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::ImmatureSignature => Refusal::NotYetValid,
                ErrorKind::InvalidSignature => Refusal::BadSignature,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::MissingAlgorithm => Refusal::WrongAlgorithm,
                ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => Refusal::MissingExpiry,
                ErrorKind::InvalidAudience
                | ErrorKind::InvalidIssuer
                | ErrorKind::InvalidSubject
                | ErrorKind::MissingRequiredClaim(_) => Refusal::ClaimRejected,
                _ => Refusal::Malformed,
            })
    }
}

/// A request that passed authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// When its credential stops passing, in seconds since the epoch: a JWT's `exp` and the
    /// leeway; none for the shared token or an open API. A stream ends then.
    pub expires_at: Option<u64>,
    /// Who it is: a JWT's `sub`; none for the shared token, an open API or a JWT without one.
    pub subject: Option<String>,
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Authorized {
    type Error = ();

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, ()> {
        let Some(auth) = request.rocket().state::<Auth>() else {
            return Outcome::Success(Authorized {
                expires_at: None,
                subject: None,
            });
        };
        match auth.check(request.headers().get_one("Authorization")) {
            Ok(authorized) => Outcome::Success(authorized),
            Err(reason) => {
                tracing::debug!(?reason, uri = %request.uri(), "request refused: 401");
                Outcome::Error((Status::Unauthorized, ()))
            }
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
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::{json, Value};

    const SECRET: &str = "jwt-test-secret-of-at-least-32-b";

    fn auth(token: Option<&str>, secret: Option<&str>) -> Auth {
        Auth::new(&CeleryConfig {
            web_auth_token: token.map(str::to_owned),
            web_jwt_secret: secret.map(str::to_owned),
            ..CeleryConfig::default()
        })
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn signed(algorithm: Algorithm, secret: &str, claims: &Value) -> String {
        encode(
            &Header::new(algorithm),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn hs256(claims: Value) -> String {
        signed(Algorithm::HS256, SECRET, &claims)
    }

    fn jwt_only() -> Auth {
        auth(None, Some(SECRET))
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn check(auth: &Auth, token: &str) -> Result<(), Refusal> {
        auth.check(Some(&bearer(token))).map(drop)
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
    }

    #[test]
    fn nothing_configured_is_open() {
        let auth = auth(None, None);
        assert!(auth.is_open());
        let anonymous = Authorized {
            expires_at: None,
            subject: None,
        };
        assert_eq!(auth.check(None), Ok(anonymous.clone()));
        assert_eq!(auth.check(Some("Bearer anything")), Ok(anonymous));
    }

    #[test]
    fn a_valid_hs256_token_is_accepted() {
        let auth = jwt_only();
        assert!(!auth.is_open());
        let token = hs256(json!({"sub": "svc", "exp": now() + 300}));
        assert_eq!(check(&auth, &token), Ok(()));
        let started = hs256(json!({"exp": now() + 300, "nbf": now() - 10, "iat": now() - 10}));
        assert_eq!(check(&auth, &started), Ok(()));
        // Clock skew within the leeway is tolerated, both ways.
        let skewed = hs256(json!({"exp": now() - 5, "nbf": now() + 5}));
        assert_eq!(check(&auth, &skewed), Ok(()));
    }

    #[test]
    fn a_jwt_passes_until_its_exp_and_the_leeway_the_shared_token_for_ever() {
        let exp = now() + 300;
        let both = auth(Some("s3cret-token"), Some(SECRET));
        let until = |token: &str| both.check(Some(&bearer(token))).map(|a| a.expires_at);
        assert_eq!(
            until(&hs256(json!({"exp": exp}))),
            Ok(Some(exp + JWT_LEEWAY_SECONDS))
        );
        assert_eq!(until("s3cret-token"), Ok(None));
    }

    #[test]
    fn a_jwt_names_its_caller_by_its_sub_the_shared_token_nobody() {
        let both = auth(Some("s3cret-token"), Some(SECRET));
        let who = |token: &str| both.check(Some(&bearer(token))).map(|a| a.subject);
        let exp = now() + 300;
        assert_eq!(
            who(&hs256(json!({"exp": exp, "sub": "svc"}))),
            Ok(Some("svc".into()))
        );
        assert_eq!(
            who(&hs256(json!({"exp": exp, "sub": 42}))),
            Ok(Some("42".into()))
        );
        assert_eq!(who(&hs256(json!({"exp": exp}))), Ok(None));
        assert_eq!(who("s3cret-token"), Ok(None));
    }

    #[test]
    fn expired_and_not_yet_valid_tokens_are_refused() {
        let auth = jwt_only();
        let expired = hs256(json!({"exp": now() - JWT_LEEWAY_SECONDS - 60}));
        assert_eq!(check(&auth, &expired), Err(Refusal::Expired));
        let early = hs256(json!({"exp": now() + 600, "nbf": now() + JWT_LEEWAY_SECONDS + 60}));
        assert_eq!(check(&auth, &early), Err(Refusal::NotYetValid));
    }

    #[test]
    fn a_token_of_another_secret_is_refused() {
        let token = signed(
            Algorithm::HS256,
            "another-secret",
            &json!({"exp": now() + 300}),
        );
        assert_eq!(check(&jwt_only(), &token), Err(Refusal::BadSignature));
        // A valid token with its claims changed after signing.
        let token = hs256(json!({"sub": "a", "exp": now() + 300}));
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": now() + 300}).to_string());
        assert_eq!(
            check(&jwt_only(), &parts.join(".")),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn only_hs256_is_taken() {
        let claims = json!({"exp": now() + 300});
        for algorithm in [Algorithm::HS384, Algorithm::HS512] {
            let token = signed(algorithm, SECRET, &claims);
            assert_eq!(
                check(&jwt_only(), &token),
                Err(Refusal::WrongAlgorithm),
                "{algorithm:?}"
            );
        }
        // `alg: none`, unsigned or carrying a valid HS256 signature, is not a token at all.
        let valid = hs256(claims.clone());
        let signature = valid.rsplit('.').next().unwrap();
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        for alg in ["none", "None", "NONE"] {
            let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
            for token in [
                format!("{header}.{payload}."),
                format!("{header}.{payload}.{signature}"),
            ] {
                assert!(check(&jwt_only(), &token).is_err(), "{token}");
            }
        }
    }

    #[test]
    fn tokens_without_a_numeric_exp_are_refused() {
        let auth = jwt_only();
        assert_eq!(
            check(&auth, &hs256(json!({"sub": "svc"}))),
            Err(Refusal::MissingExpiry)
        );
        assert_eq!(
            check(&auth, &hs256(json!({"exp": null}))),
            Err(Refusal::MissingExpiry)
        );
        for claims in [
            json!({"exp": "tomorrow"}),
            json!({"exp": -1}),
            json!({"exp": now() + 300, "nbf": "now"}),
        ] {
            assert!(check(&auth, &hs256(claims.clone())).is_err(), "{claims}");
        }
    }

    #[test]
    fn a_token_for_an_audience_is_refused() {
        let token = hs256(json!({"exp": now() + 300, "aud": "other-service"}));
        assert_eq!(check(&jwt_only(), &token), Err(Refusal::ClaimRejected));
    }

    #[test]
    fn with_an_issuer_and_an_audience_set_a_jwt_must_carry_both() {
        let bound = Auth::new(&CeleryConfig {
            web_jwt_secret: Some(SECRET.into()),
            web_jwt_issuer: Some("https://id.example".into()),
            web_jwt_audience: Some("rcelery".into()),
            ..CeleryConfig::default()
        });
        let exp = now() + 300;
        let iss = "https://id.example";
        assert_eq!(
            check(
                &bound,
                &hs256(json!({"exp": exp, "iss": iss, "aud": "rcelery"}))
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &bound,
                &hs256(json!({"exp": exp, "iss": iss, "aud": ["x", "rcelery"]}))
            ),
            Ok(())
        );
        for claims in [
            json!({"exp": exp, "aud": "rcelery"}),
            json!({"exp": exp, "iss": iss}),
            json!({"exp": exp, "iss": "https://other.example", "aud": "rcelery"}),
            json!({"exp": exp, "iss": iss, "aud": "another-service"}),
        ] {
            assert_eq!(
                check(&bound, &hs256(claims.clone())),
                Err(Refusal::ClaimRejected),
                "{claims}"
            );
        }
        assert_eq!(
            check(&bound, &hs256(json!({"iss": iss, "aud": "rcelery"}))),
            Err(Refusal::MissingExpiry)
        );
    }

    #[test]
    fn malformed_credentials_are_refused() {
        let auth = jwt_only();
        let valid = hs256(json!({"exp": now() + 300}));
        for token in [
            "",
            "not-a-jwt",
            "a.b.c",
            "a.b",
            "..",
            "%%%.%%%.%%%",
            &format!("{valid}.extra"),
            &valid[1..],
        ] {
            assert!(check(&auth, token).is_err(), "{token:?}");
        }
        assert_eq!(auth.check(None), Err(Refusal::MissingHeader));
        assert_eq!(auth.check(Some(&valid)), Err(Refusal::NotBearer));
        assert_eq!(
            auth.check(Some(&format!("bearer {valid}"))),
            Err(Refusal::NotBearer)
        );
        assert!(auth.check(Some(&format!("Bearer {valid} "))).is_err());
    }

    #[test]
    fn the_shared_token_and_jwts_are_both_taken_when_both_are_set() {
        let both = auth(Some("s3cret-token"), Some(SECRET));
        assert_eq!(check(&both, "s3cret-token"), Ok(()));
        assert_eq!(check(&both, &hs256(json!({"exp": now() + 300}))), Ok(()));
        assert!(check(&both, "s3cret-tokeN").is_err());

        let token_only = auth(Some("s3cret-token"), None);
        assert_eq!(check(&token_only, "s3cret-token"), Ok(()));
        assert_eq!(
            check(&token_only, &hs256(json!({"exp": now() + 300}))),
            Err(Refusal::WrongToken)
        );
        // The JWT secret is not itself a bearer token.
        assert!(check(&jwt_only(), SECRET).is_err());
    }
}
