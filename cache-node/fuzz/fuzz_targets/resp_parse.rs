//! Fuzzes the RESP request parser: it must never panic, and feeding the
//! same bytes in pieces (as a socket delivers them) must give the same
//! requests, and the same error or lack of one, as feeding them whole.

#![no_main]

use bytes::BytesMut;
use cache_node::resp::parse::{ParseLimits, Request, parse};
use libfuzzer_sys::fuzz_target;

const LIMITS: ParseLimits = ParseLimits {
    max_bulk_bytes: 512,
    max_args: 16,
    max_frame_bytes: 2048,
    max_inline_bytes: 256,
};

/// Every request until the input runs out or an error; and whether one
/// came.
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

fuzz_target!(|data: &[u8]| {
    // The first byte picks the piece size; the rest is the stream.
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let whole = parse_in_pieces(stream, stream.len());
    let pieces = parse_in_pieces(stream, usize::from(piece % 17) + 1);
    assert_eq!(whole, pieces);
});
