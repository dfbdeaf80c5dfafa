//! Checks on the strings commands carry. All run before anything is changed.

use crate::error::{Result, invalid};

/// The longest id (model, version, node, zone, environment, tag, token id).
pub const MAX_ID_LEN: usize = 64;
/// The longest free text (an address, a label value, a name, a comment is longer).
pub const MAX_TEXT_LEN: usize = 256;
/// The longest approval comment.
pub const MAX_COMMENT_LEN: usize = 4096;

/// An id: 1 to 64 of `a-z A-Z 0-9 _ . -` (the same rule as manifest names).
pub fn id(what: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            value,
            format!("use 1 to {MAX_ID_LEN} of a-z, A-Z, 0-9, `_`, `.`, `-`"),
        ))
    }
}

/// Free text: at most `max` bytes, no control characters; `non_empty` refuses blank text.
pub fn text(what: &'static str, value: &str, max: usize, non_empty: bool) -> Result<()> {
    if non_empty && value.trim().is_empty() {
        return Err(invalid(what, value, "it must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            what,
            truncate(value),
            format!("shorten it to at most {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(what, value, "remove the control characters"));
    }
    Ok(())
}

/// A certificate serial number: 1 to 40 bytes as lowercase hex (RFC 5280 allows 20 octets;
/// leave room for a leading zero and for other CAs).
pub fn serial(value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 80
        && value.len().is_multiple_of(2)
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "certificate serial",
            truncate(value),
            "give it as lowercase hex, an even number of digits",
        ))
    }
}

/// A network address: `host:port`, no spaces.
pub fn address(what: &'static str, value: &str) -> Result<()> {
    text(what, value, MAX_TEXT_LEN, true)?;
    let port_ok = value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok || value.contains(char::is_whitespace) {
        return Err(invalid(
            what,
            value,
            "write it as host:port, like 10.0.0.7:7443",
        ));
    }
    Ok(())
}

/// 64 lowercase hex digits (a SHA-256 digest or an ed25519 public key).
pub fn hex64(what: &'static str, value: &str) -> Result<()> {
    let ok = value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            truncate(value),
            "give 64 lowercase hex digits",
        ))
    }
}

fn truncate(value: &str) -> String {
    value.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_texts_addresses_hex() {
        assert!(super::id("model", "resnet-50_v1.2").is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(65), "a/b"] {
            assert!(super::id("model", bad).is_err(), "{bad:?}");
        }
        assert!(super::text("comment", "fine", 10, true).is_ok());
        assert!(super::text("comment", " ", 10, true).is_err());
        assert!(super::text("comment", "", 10, false).is_ok());
        assert!(super::text("comment", "a\nb", 10, false).is_err());
        assert!(super::text("comment", "0123456789x", 10, false).is_err());
        assert!(super::address("address", "10.0.0.1:7443").is_ok());
        assert!(super::address("address", "[::1]:7443").is_ok());
        for bad in ["host", ":80", "h:99999", "a b:1"] {
            assert!(super::address("address", bad).is_err(), "{bad:?}");
        }
        assert!(super::hex64("digest", &"ab".repeat(32)).is_ok());
        assert!(super::hex64("digest", &"AB".repeat(32)).is_err());
        assert!(super::hex64("digest", "abc").is_err());
    }
}
