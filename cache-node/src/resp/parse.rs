//! The RESP2 request parser: pure and incremental.
//!
//! A client sends either a multibulk frame (`*<n>\r\n` then `n` bulk strings
//! `$<len>\r\n<bytes>\r\n`) or an inline command (one line of
//! space-separated words, as typed into telnet). [`parse`] looks at the
//! front of the read buffer and either takes one whole request out of it,
//! says it needs more bytes, or reports a protocol error.
//!
//! Every length is checked against [`ParseLimits`] as soon as its header is
//! read, before the bytes it announces are buffered: a client cannot make
//! the node hold more than `max_frame_bytes` for one request.

use bytes::{Bytes, BytesMut};

use crate::error::Error;

/// The longest number header (`*`/`$` line) accepted: a sign, 19 digits.
const MAX_NUMBER_LINE: usize = 21;

/// Bounds on what one request may announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// Longest bulk string (a key or a value).
    pub max_bulk_bytes: usize,
    /// Most elements in one multibulk frame (the command name included).
    pub max_args: usize,
    /// Most bytes of one whole multibulk frame, headers included.
    pub max_frame_bytes: usize,
    /// Longest inline command line.
    pub max_inline_bytes: usize,
}

/// A request: the command name and its arguments, as sent. Empty for an
/// empty frame (`*0`, a blank inline line), which gets no reply.
pub type Request = Vec<Bytes>;

fn protocol(reason: impl Into<String>) -> Error {
    Error::Protocol(reason.into())
}

/// Takes one whole request off the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a request (nothing is
/// consumed; call again with more bytes), `Ok(Some(request))` after
/// consuming it.
///
/// # Errors
/// [`Error::Protocol`] when the bytes are not RESP or announce more than
/// `limits` allow; the connection cannot be resynchronised after it.
pub fn parse(buf: &mut BytesMut, limits: &ParseLimits) -> Result<Option<Request>, Error> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

/// The position of the `\r\n` that ends the line starting at `start`, if it
/// is within `max` bytes; `Err` if the line is longer.
fn line_end(buf: &[u8], start: usize, max: usize) -> Result<Option<usize>, ()> {
    let window = &buf[start..buf.len().min(start + max + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(start + i)),
        None if window.len() >= max + 2 => Err(()),
        None => Ok(None),
    }
}

/// Parses the decimal number of a header line (after its type byte): an
/// optional sign and at least one digit, as `i64::from_str` takes it,
/// without its UTF-8 check (two of these per argument).
fn number(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        n = n.checked_mul(10)?;
        n = if negative {
            n.checked_sub(d)?
        } else {
            n.checked_add(d)?
        };
    }
    Some(n)
}

/// Arguments whose positions the first pass keeps on the stack; longer
/// requests (`MSET` of many keys) spill to the heap.
const INLINE_ARGS: usize = 8;

fn parse_multibulk(buf: &mut BytesMut, limits: &ParseLimits) -> Result<Option<Request>, Error> {
    let Some(end) =
        line_end(buf, 1, MAX_NUMBER_LINE).map_err(|()| protocol("too big mbulk count string"))?
    else {
        return Ok(None);
    };
    let count = number(&buf[1..end]).ok_or_else(|| protocol("invalid multibulk length"))?;
    let mut pos = end + 2;
    if count <= 0 {
        // Redis ignores `*0` and `*-1` requests.
        let _ = buf.split_to(pos);
        return Ok(Some(Vec::new()));
    }
    let count = usize::try_from(count).map_err(|_| protocol("invalid multibulk length"))?;
    if count > limits.max_args {
        return Err(protocol(format!(
            "multibulk of {count} elements exceeds the limit ({})",
            limits.max_args
        )));
    }
    // First pass: find every element without copying, so that an incomplete
    // frame costs nothing but the scan and is retried from the start.
    let mut inline = [(0, 0); INLINE_ARGS];
    let mut spilled = Vec::new();
    for i in 0..count {
        match buf.get(pos) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&other) => {
                return Err(protocol(format!(
                    "expected '$', got '{}'",
                    char::from(other).escape_default()
                )));
            }
        }
        let Some(end) = line_end(buf, pos + 1, MAX_NUMBER_LINE)
            .map_err(|()| protocol("too big bulk count string"))?
        else {
            return Ok(None);
        };
        let len = number(&buf[pos + 1..end])
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| protocol("invalid bulk length"))?;
        if len > limits.max_bulk_bytes {
            return Err(protocol(format!(
                "bulk string of {len} bytes exceeds the limit ({})",
                limits.max_bulk_bytes
            )));
        }
        let start = end + 2;
        let frame_end = start + len + 2;
        if frame_end > limits.max_frame_bytes {
            return Err(protocol(format!(
                "request exceeds max_request_bytes ({})",
                limits.max_frame_bytes
            )));
        }
        if buf.len() < frame_end {
            return Ok(None);
        }
        if &buf[start + len..frame_end] != b"\r\n" {
            return Err(protocol("bulk string not terminated by CRLF"));
        }
        match inline.get_mut(i) {
            Some(span) => *span = (start, start + len),
            None => spilled.push((start, start + len)),
        }
        pos = frame_end;
    }
    let frame = buf.split_to(pos).freeze();
    let spans = inline[..count.min(INLINE_ARGS)].iter().chain(&spilled);
    Ok(Some(spans.map(|&(s, e)| frame.slice(s..e)).collect()))
}

fn parse_inline(buf: &mut BytesMut, limits: &ParseLimits) -> Result<Option<Request>, Error> {
    let window = &buf[..buf.len().min(limits.max_inline_bytes + 1)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        if window.len() > limits.max_inline_bytes {
            return Err(protocol("too big inline request"));
        }
        return Ok(None);
    };
    let line = buf.split_to(newline + 1);
    let mut line = &line[..newline];
    if let Some(stripped) = line.strip_suffix(b"\r") {
        line = stripped;
    }
    split_args(line).map(Some)
}

/// Splits an inline line into words like Redis's `sdssplitargs`: spaces
/// separate, `"..."` may hold `\n`, `\r`, `\t`, `\\`, `\"` and `\xHH`
/// escapes, `'...'` is literal but for `\'`.
fn split_args(line: &[u8]) -> Result<Request, Error> {
    let unbalanced = || protocol("unbalanced quotes in request");
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Ok(args);
        }
        let mut word = Vec::new();
        let quote = match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                Some(q)
            }
            _ => None,
        };
        loop {
            let Some(&c) = line.get(i) else {
                if quote.is_some() {
                    return Err(unbalanced());
                }
                break;
            };
            match quote {
                None if c.is_ascii_whitespace() => break,
                None => word.push(c),
                Some(q) if c == q => {
                    i += 1;
                    // A closing quote must be followed by a space or the end.
                    if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                        return Err(unbalanced());
                    }
                    break;
                }
                Some(b'"') if c == b'\\' && i + 1 < line.len() => {
                    i += 1;
                    let escaped = line[i];
                    let hex = (escaped == b'x' && i + 2 < line.len())
                        .then(|| {
                            std::str::from_utf8(&line[i + 1..i + 3])
                                .ok()
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                        })
                        .flatten();
                    match (escaped, hex) {
                        (_, Some(byte)) => {
                            word.push(byte);
                            i += 2;
                        }
                        (b'n', _) => word.push(b'\n'),
                        (b'r', _) => word.push(b'\r'),
                        (b't', _) => word.push(b'\t'),
                        (b'b', _) => word.push(0x08),
                        (b'a', _) => word.push(0x07),
                        (other, _) => word.push(other),
                    }
                }
                Some(b'\'') if c == b'\\' && line.get(i + 1) == Some(&b'\'') => {
                    i += 1;
                    word.push(b'\'');
                }
                Some(_) => word.push(c),
            }
            i += 1;
        }
        args.push(Bytes::from(word));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ParseLimits = ParseLimits {
        max_bulk_bytes: 64,
        max_args: 8,
        max_frame_bytes: 256,
        max_inline_bytes: 64,
    };

    fn parse_all(input: &[u8]) -> Result<Vec<Request>, Error> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(request) = parse(&mut buf, &LIMITS)? {
            out.push(request);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    fn words(request: &Request) -> Vec<&[u8]> {
        request.iter().map(|b| b.as_ref()).collect()
    }

    #[test]
    fn header_numbers_parse_as_i64_from_str_does() {
        for text in [
            "0",
            "7",
            "-1",
            "+5",
            "00012",
            "",
            "-",
            "+",
            "1a",
            " 1",
            "1 ",
            "--1",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
        ] {
            assert_eq!(number(text.as_bytes()), text.parse().ok(), "{text:?}");
        }
    }

    #[test]
    fn requests_longer_than_the_inline_spans_keep_every_argument() {
        let mut frame = b"*12\r\n$4\r\nMSET\r\n".to_vec();
        for i in 0..11 {
            let arg = format!("a{i}");
            frame.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        let limits = ParseLimits {
            max_args: 16,
            ..LIMITS
        };
        let request = parse(&mut BytesMut::from(&frame[..]), &limits)
            .unwrap()
            .unwrap();
        let requests = [request];
        assert_eq!(requests[0].len(), 12);
        assert_eq!(&requests[0][8][..], b"a7");
        assert_eq!(&requests[0][11][..], b"a10");
    }

    #[test]
    fn multibulk_frames_parse_back_to_back() {
        let requests =
            parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n")
                .unwrap();
        assert_eq!(words(&requests[0]), [&b"GET"[..], b"k"]);
        assert_eq!(words(&requests[1]), [&b"SET"[..], b"k", b""]);
    }

    #[test]
    fn binary_values_keep_their_crlf() {
        let requests = parse_all(b"*1\r\n$4\r\na\r\nb\r\n").unwrap();
        assert_eq!(words(&requests[0]), [&b"a\r\nb"[..]]);
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete_and_consumes_nothing() {
        let frame = b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n";
        for cut in 0..frame.len() {
            let mut buf = BytesMut::from(&frame[..cut]);
            assert_eq!(parse(&mut buf, &LIMITS).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
        assert_eq!(parse_all(frame).unwrap().len(), 1);
    }

    #[test]
    fn empty_frames_are_empty_requests() {
        let requests = parse_all(b"*0\r\n*-1\r\n\r\n").unwrap();
        assert_eq!(requests, vec![Vec::<Bytes>::new(); 3]);
    }

    #[test]
    fn inline_commands_split_on_spaces_and_quotes() {
        let requests = parse_all(b"PING\r\nset k \"a b\\x41\\n\"\nECHO 'it\\'s'  \r\n").unwrap();
        assert_eq!(words(&requests[0]), [&b"PING"[..]]);
        assert_eq!(words(&requests[1]), [&b"set"[..], b"k", b"a bA\n"]);
        assert_eq!(words(&requests[2]), [&b"ECHO"[..], b"it's"]);
        assert!(matches!(
            parse_all(b"SET k \"open\r\n"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            parse_all(b"SET k \"a\"b\r\n"),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn limits_are_checked_from_the_headers_alone() {
        // Only the headers are present: the refusal must not wait for the
        // announced bytes.
        for (input, what) in [
            (&b"*9\r\n"[..], "elements"),
            (b"*1\r\n$65\r\n", "bulk string"),
        ] {
            let mut buf = BytesMut::from(input);
            let err = parse(&mut buf, &LIMITS).unwrap_err().to_string();
            assert!(err.contains(what), "{input:?}: {err}");
        }
        // A frame of 4 bulk strings of 60 bytes crosses 256 bytes at the
        // fourth header.
        let mut frame = b"*4\r\n".to_vec();
        for _ in 0..3 {
            frame.extend_from_slice(b"$60\r\n");
            frame.extend_from_slice(&[b'x'; 60]);
            frame.extend_from_slice(b"\r\n");
        }
        frame.extend_from_slice(b"$60\r\n");
        let mut buf = BytesMut::from(&frame[..]);
        let err = parse(&mut buf, &LIMITS).unwrap_err().to_string();
        assert!(err.contains("max_request_bytes"), "{err}");
        let mut buf = BytesMut::from(&[b'a'; 65][..]);
        let err = parse(&mut buf, &LIMITS).unwrap_err().to_string();
        assert!(err.contains("too big inline request"), "{err}");
    }

    #[test]
    fn malformed_headers_are_protocol_errors() {
        for input in [
            &b"*x\r\n"[..],
            b"*1\r\n+OK\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$x\r\n",
            b"*1\r\n$1\r\nab\r\n",
            b"*12345678901234567890123\r\n",
        ] {
            let mut buf = BytesMut::from(input);
            assert!(
                matches!(parse(&mut buf, &LIMITS), Err(Error::Protocol(_))),
                "{input:?}"
            );
        }
    }

    /// Every request until the input runs out or an error, feeding `data`
    /// in pieces of `piece` bytes; and whether an error came.
    fn parse_in_pieces(data: &[u8], piece: usize) -> (Vec<Request>, bool) {
        let mut buf = BytesMut::new();
        let mut requests = Vec::new();
        for chunk in data.chunks(piece.max(1)) {
            buf.extend_from_slice(chunk);
            loop {
                match parse(&mut buf, &LIMITS) {
                    Ok(Some(request)) => requests.push(request),
                    Ok(None) => break,
                    Err(_) => return (requests, true),
                }
            }
        }
        (requests, false)
    }

    /// Streams of valid frames, inline lines and noise.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let part = prop_oneof![
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..70), 0..10)
                .prop_map(|args| {
                    let mut frame = format!("*{}\r\n", args.len()).into_bytes();
                    for arg in &args {
                        frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                        frame.extend_from_slice(arg);
                        frame.extend_from_slice(b"\r\n");
                    }
                    frame
                }),
            "[ -~]{0,80}\r?\n".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        proptest::collection::vec(part, 0..6).prop_map(|parts| parts.concat())
    }

    proptest! {
        /// A socket delivers bytes in arbitrary pieces: the requests (and
        /// whether an error comes) must not depend on where they are cut.
        #[test]
        fn pieces_parse_like_the_whole(input in stream(), piece in 1usize..40) {
            prop_assert_eq!(
                parse_in_pieces(&input, input.len()),
                parse_in_pieces(&input, piece)
            );
        }

        #[test]
        fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(_)) = parse(&mut buf, &LIMITS) {}
        }

        #[test]
        fn mutated_frames_never_panic(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..6),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut frame = format!("*{}\r\n", args.len()).into_bytes();
            for arg in &args {
                frame.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                frame.extend_from_slice(arg);
                frame.extend_from_slice(b"\r\n");
            }
            // The whole frame parses back to its arguments.
            let mut buf = BytesMut::from(&frame[..]);
            let request = parse(&mut buf, &LIMITS).unwrap().unwrap();
            prop_assert_eq!(request.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), args);
            // A truncated one is incomplete and consumes nothing.
            let cut = cut.index(frame.len());
            let mut buf = BytesMut::from(&frame[..cut]);
            prop_assert_eq!(parse(&mut buf, &LIMITS).unwrap(), None);
            prop_assert_eq!(buf.len(), cut);
            // A corrupted one does not panic.
            let flip = flip.index(frame.len());
            frame[flip] = byte;
            let mut buf = BytesMut::from(&frame[..]);
            while let Ok(Some(_)) = parse(&mut buf, &LIMITS) {}
        }
    }
}
