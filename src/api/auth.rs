//! The API key check both front ends share: `Authorization: Bearer <key>` with the
//! scheme matched case-insensitively (RFC 7235) and the key compared in constant time.

use subtle::ConstantTimeEq;

/// Whether an `Authorization` header value carries `key`.
pub fn bearer_matches(header: Option<&str>, key: &str) -> bool {
    let given = header
        .map(str::trim)
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start());
    // Compared even when absent, so the time taken does not tell a missing header
    // from a wrong key (the key's length is not secret-critical).
    bool::from(given.as_bytes().ct_eq(key.as_bytes())) && !key.is_empty()
}

#[cfg(test)]
mod tests {
    use super::bearer_matches;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_key_exact() {
        assert!(bearer_matches(Some("Bearer k1"), "k1"));
        assert!(bearer_matches(Some("bearer k1"), "k1"));
        assert!(bearer_matches(Some("BEARER  k1"), "k1"));
        assert!(!bearer_matches(Some("Bearer k2"), "k1"));
        assert!(!bearer_matches(Some("Bearer k1x"), "k1"));
        assert!(!bearer_matches(Some("Basic k1"), "k1"));
        assert!(!bearer_matches(Some("k1"), "k1"));
        assert!(!bearer_matches(None, "k1"));
        assert!(!bearer_matches(Some("Bearer "), ""));
    }
}
