//! The `Idempotency-Key` header: parsing and formatting.

use http::HeaderValue;

/// The request header that carries the key (draft-ietf-httpapi-idempotency-key-header).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header set on every replayed response, with the value `true`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Longest accepted key, in bytes after unquoting ([`idem_core::MAX_ID_LEN`]).
pub const MAX_KEY_LEN: usize = idem_core::MAX_ID_LEN;

/// Why an `Idempotency-Key` header was rejected (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyHeaderError {
    /// The header value is not visible ASCII.
    #[error("the Idempotency-Key header is not visible ASCII")]
    NotAscii,
    /// The header appears more than once.
    #[error("the Idempotency-Key header appears more than once")]
    Repeated,
    /// The key is empty (`""` or a blank header).
    #[error("the idempotency key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the idempotency key is {len} bytes long; at most {MAX_KEY_LEN} are allowed")]
    TooLong {
        /// Its length in bytes, after unquoting.
        len: usize,
    },
    /// A quoted sf-string is not terminated, has a bad escape, or has text after it.
    #[error("the Idempotency-Key header is not a valid RFC 8941 sf-string: {0}")]
    BadString(&'static str),
    /// The key holds a character outside `0x21..=0x7e` (a space inside a quoted key, or a
    /// quote, backslash, comma or semicolon in a bare key).
    #[error("the idempotency key has a character outside the allowed set at byte {position}")]
    BadChar {
        /// Byte offset in the header value.
        position: usize,
    },
}

/// Parses one `Idempotency-Key` header value into the key's id.
///
/// Two forms are accepted, after trimming spaces around the value:
///
/// - an RFC 8941 sf-string, the draft's form: `"8e03978e-40d5-43e8-bc93-6894a57f9324"`;
///   `\"` and `\\` are unescaped. Parameters (`;a=1`) are not accepted;
/// - a bare token, the form Stripe and most clients send: `8e03978e-40d5-43e8-bc93-6894a57f9324`,
///   any visible ASCII (`0x21..=0x7e`) except `"`, `\`, `,` and `;`.
///
/// The key itself is 1 to [`MAX_KEY_LEN`] bytes of visible ASCII (`0x21..=0x7e`): a space
/// inside a quoted key is rejected, since it would be ambiguous in a bare key.
///
/// ```
/// use idem_http::parse_key;
/// use http::HeaderValue;
/// assert_eq!(parse_key(&HeaderValue::from_static("\"abc-1\"")).unwrap(), "abc-1");
/// assert_eq!(parse_key(&HeaderValue::from_static("abc-1")).unwrap(), "abc-1");
/// assert_eq!(parse_key(&HeaderValue::from_static(r#""a\"b""#)).unwrap(), "a\"b");
/// assert!(parse_key(&HeaderValue::from_static("\"open")).is_err());
/// assert!(parse_key(&HeaderValue::from_static("\"\"")).is_err());
/// ```
pub fn parse_key(value: &HeaderValue) -> Result<String, KeyHeaderError> {
    let raw = value.to_str().map_err(|_| KeyHeaderError::NotAscii)?;
    let start = raw.len() - raw.trim_start_matches(' ').len();
    let text = raw.trim_matches(' ');
    let key = match text.strip_prefix('"') {
        Some(rest) => unquote(rest, start + 1)?,
        None => {
            if let Some(i) = text.bytes().position(|b| {
                !(0x21..=0x7e).contains(&b) || matches!(b, b'"' | b'\\' | b',' | b';')
            }) {
                return Err(KeyHeaderError::BadChar {
                    position: start + i,
                });
            }
            text.to_string()
        }
    };
    if key.is_empty() {
        return Err(KeyHeaderError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyHeaderError::TooLong { len: key.len() });
    }
    Ok(key)
}

/// The body of an sf-string after its opening quote; `offset` is its position in the value.
fn unquote(rest: &str, offset: usize) -> Result<String, KeyHeaderError> {
    let mut out = String::with_capacity(rest.len());
    let mut bytes = rest.bytes().enumerate();
    while let Some((i, b)) = bytes.next() {
        match b {
            b'"' => {
                return if i + 1 == rest.len() {
                    Ok(out)
                } else {
                    Err(KeyHeaderError::BadString("text after the closing quote"))
                };
            }
            b'\\' => match bytes.next() {
                Some((_, e @ (b'"' | b'\\'))) => out.push(char::from(e)),
                _ => {
                    return Err(KeyHeaderError::BadString(
                        "an escape other than \\\" or \\\\",
                    ))
                }
            },
            0x21..=0x7e => out.push(char::from(b)),
            _ => {
                return Err(KeyHeaderError::BadChar {
                    position: offset + i,
                })
            }
        }
    }
    Err(KeyHeaderError::BadString("no closing quote"))
}

/// Formats a key as the draft's sf-string (`"key"`, with `"` and `\` escaped).
///
/// ```
/// assert_eq!(idem_http::format_key("abc").to_str().unwrap(), "\"abc\"");
/// ```
pub fn format_key(key: &str) -> HeaderValue {
    let mut s = String::with_capacity(key.len() + 2);
    s.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    // Keys are visible ASCII (parse_key's contract); anything else is replaced rather than
    // failing, so the server answers 400 with a clear detail.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, KeyHeaderError> {
        parse_key(&HeaderValue::from_str(s).unwrap())
    }

    #[test]
    fn forms_and_limits() {
        assert_eq!(parse("  \"k\"  ").unwrap(), "k");
        assert_eq!(parse("a:b/c").unwrap(), "a:b/c");
        assert_eq!(parse(""), Err(KeyHeaderError::Empty));
        assert_eq!(
            parse("\"a b\""),
            Err(KeyHeaderError::BadChar { position: 2 })
        );
        assert_eq!(parse("a b"), Err(KeyHeaderError::BadChar { position: 1 }));
        assert_eq!(parse("a,b"), Err(KeyHeaderError::BadChar { position: 1 }));
        assert!(matches!(
            parse("\"a\";p=1"),
            Err(KeyHeaderError::BadString(_))
        ));
        assert!(matches!(
            parse("\"a\\n\""),
            Err(KeyHeaderError::BadString(_))
        ));
        assert_eq!(parse(&"x".repeat(255)).unwrap().len(), 255);
        assert_eq!(
            parse(&format!("\"{}\"", "x".repeat(256))),
            Err(KeyHeaderError::TooLong { len: 256 })
        );
        for key in ["plain", "q\"uote", "back\\slash"] {
            assert_eq!(parse_key(&format_key(key)).unwrap(), key);
        }
    }
}
