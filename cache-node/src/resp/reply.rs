//! RESP2 replies.

use bytes::{BufMut, Bytes, BytesMut};

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`-style status line; must not contain CR or LF.
    Simple(&'static str),
    /// `-ERR ...` (or another error prefix, such as `NOAUTH`); the text is
    /// written with CR and LF replaced by spaces.
    Error(String),
    /// `:<n>`.
    Integer(i64),
    /// `$<len>` and the bytes, or the null bulk `$-1` for `None`.
    Bulk(Option<Bytes>),
    /// `*<n>` and the elements.
    Array(Vec<Reply>),
}

impl Reply {
    /// `+OK`.
    pub const OK: Reply = Reply::Simple("OK");

    /// An `ERR` error with `message`.
    pub fn err(message: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {message}"))
    }

    /// A bulk string.
    pub fn bulk(bytes: impl Into<Bytes>) -> Reply {
        Reply::Bulk(Some(bytes.into()))
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Reply::Simple(text) => {
                out.put_u8(b'+');
                out.put_slice(text.as_bytes());
                out.put_slice(b"\r\n");
            }
            Reply::Error(text) => {
                out.put_u8(b'-');
                // A line break inside an error would end the reply early and
                // desynchronise the client.
                out.extend(
                    text.bytes()
                        .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
                );
                out.put_slice(b"\r\n");
            }
            Reply::Integer(n) => {
                out.put_u8(b':');
                if *n < 0 {
                    out.put_u8(b'-');
                }
                put_decimal(out, n.unsigned_abs());
                out.put_slice(b"\r\n");
            }
            Reply::Bulk(None) => out.put_slice(b"$-1\r\n"),
            Reply::Bulk(Some(bytes)) => {
                // One reservation for the whole reply (header, value, CRLF).
                out.reserve(bytes.len() + 24);
                out.put_u8(b'$');
                put_decimal(out, bytes.len() as u64);
                out.put_slice(b"\r\n");
                out.put_slice(bytes);
                out.put_slice(b"\r\n");
            }
            Reply::Array(items) => {
                out.put_u8(b'*');
                put_decimal(out, items.len() as u64);
                out.put_slice(b"\r\n");
                for item in items {
                    item.encode(out);
                }
            }
        }
    }
}

/// Appends `n` in decimal without a heap allocation (every bulk reply
/// has a length to write).
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_resp2() {
        let mut out = BytesMut::new();
        for reply in [
            Reply::OK,
            Reply::err("bad\r\nthing"),
            Reply::Integer(-2),
            Reply::Integer(i64::MIN),
            Reply::Integer(0),
            Reply::Bulk(None),
            Reply::Array(vec![Reply::bulk(&b"a"[..]), Reply::Bulk(None)]),
        ] {
            reply.encode(&mut out);
        }
        assert_eq!(
            &out[..],
            b"+OK\r\n-ERR bad  thing\r\n:-2\r\n:-9223372036854775808\r\n:0\r\n$-1\r\n*2\r\n$1\r\na\r\n$-1\r\n"
        );
    }
}
