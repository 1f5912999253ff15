//! The monitor's access check (`Authorization: Bearer`, `?token=`, Basic) and its decoding of
//! query parameters. Properties: the check lets a request in exactly when a plain reading of
//! the rules does (a Bearer header decides alone: a wrong one is not rescued by the query; a
//! token in the query must decode to the token exactly; Basic must decode to user:password),
//! and the decoding agrees with the `form_urlencoded` crate.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_monitor::fuzzing::{allowed, percent_decode};
use rustomnic_monitor::Auth;

fn form_decoded(value: &str) -> String {
    let pair = format!("x={value}");
    form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn reference(auth: &Auth, authorization: Option<&str>, query: Option<&str>) -> bool {
    let header = authorization.unwrap_or("");
    match auth {
        Auth::None => true,
        Auth::Token(token) => match header.strip_prefix("Bearer ") {
            Some(given) => given.trim() == token,
            None => query
                .unwrap_or("")
                .split('&')
                .filter_map(|p| p.strip_prefix("token="))
                .any(|t| form_decoded(t) == *token),
        },
        Auth::Basic { user, password } => header
            .strip_prefix("Basic ")
            .and_then(|e| {
                base64::engine::general_purpose::STANDARD
                    .decode(e.trim())
                    .ok()
            })
            .is_some_and(|d| d == format!("{user}:{password}").as_bytes()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let kind = c.byte() % 3;
    let secret = String::from_utf8_lossy(c.piece()).into_owned();
    let auth = match kind {
        0 => Auth::None,
        1 => Auth::Token(secret),
        _ => {
            let (user, password) = secret.split_once(':').unwrap_or((secret.as_str(), ""));
            Auth::Basic {
                user: user.to_string(),
                password: password.to_string(),
            }
        }
    };
    let header = c.piece();
    let query = std::str::from_utf8(c.rest()).ok();
    let mut headers = http::HeaderMap::new();
    let mut authorization = None;
    if let Ok(v) = http::HeaderValue::from_bytes(header) {
        authorization = v.to_str().ok().map(str::to_string);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    assert_eq!(
        allowed(&auth, &headers, query),
        reference(&auth, authorization.as_deref(), query),
        "{auth:?} {authorization:?} {query:?}"
    );
    for piece in query.unwrap_or("").split('&') {
        assert_eq!(percent_decode(piece), form_decoded(piece), "{piece:?}");
    }
});
