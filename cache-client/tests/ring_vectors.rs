//! Checks the placement test vectors in `docs/ring.md` against the ring.
//!
//! The vectors are read from the document itself (the fenced block tagged
//! `ring-vectors`), so the specification and the implementation cannot drift
//! apart silently. Hashes are also recomputed straight from the documented
//! byte strings with `xxh3_64`, so the test checks the document's description
//! and not only the code's current behaviour.

use cache_client::ring::{Ring, RingNode};
use xxhash_rust::xxh3::xxh3_64;

const RING_MD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ring.md"));

/// The lines of the `ring-vectors` block, with their 1-based line numbers in
/// `docs/ring.md` for error messages.
fn vector_lines() -> Vec<(usize, &'static str)> {
    let mut lines = RING_MD.lines().enumerate();
    lines
        .by_ref()
        .find(|(_, l)| l.trim() == "```ring-vectors")
        .expect("docs/ring.md has a ```ring-vectors block");
    let block: Vec<_> = lines
        .take_while(|(_, l)| l.trim() != "```")
        .map(|(n, l)| (n + 1, l))
        .collect();
    assert!(!block.is_empty(), "the ring-vectors block is empty");
    block
}

/// Splits a line into tokens: whitespace separates, `"..."` is one token
/// (which may be empty or hold spaces), `#` outside quotes starts a comment.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            break;
        } else if c == '"' {
            chars.next();
            let token: String = chars.by_ref().take_while(|&c| c != '"').collect();
            out.push(token);
        } else {
            let mut token = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                token.push(c);
                chars.next();
            }
            out.push(token);
        }
    }
    out
}

/// Checks that `s` is a hash as the document writes it (16 lowercase hex
/// digits) and returns it; hashes are compared in this form so that a failure
/// prints them as the document does.
fn parse_hash(s: &str) -> &str {
    assert!(
        s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "hash {s:?} is not 16 lowercase hex digits"
    );
    s
}

fn hex(hash: u64) -> String {
    format!("{hash:016x}")
}

fn parse_hex_bytes(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "hex {s:?} has an odd length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|e| panic!("hex {s:?}: {e}")))
        .collect()
}

#[test]
fn docs_ring_md_vectors_hold() {
    let mut ring: Option<Ring> = None;
    let mut points: Vec<(u64, String)> = Vec::new();
    let (mut keys, mut point_count, mut rings, mut routes) = (0, 0, 0, 0);

    for (line_no, line) in vector_lines() {
        let t = tokens(line);
        let Some(kind) = t.first() else { continue };
        let at = format!("docs/ring.md:{line_no}: {line}");
        match (kind.as_str(), t.len()) {
            ("key", 5) => {
                let (keyspace, key) = (&t[1], t[2].as_bytes());
                let bytes = parse_hex_bytes(&t[3]);
                let hash = parse_hash(&t[4]);
                let mut expected = keyspace.as_bytes().to_vec();
                expected.push(0);
                expected.extend_from_slice(key);
                assert_eq!(bytes, expected, "hashed bytes at {at}");
                assert_eq!(hex(xxh3_64(&bytes)), hash, "xxh3_64 of the bytes at {at}");
                assert_eq!(
                    hex(Ring::key_hash(keyspace, key)),
                    hash,
                    "Ring::key_hash at {at}"
                );
                keys += 1;
            }
            ("point", 4) => {
                let (id, i) = (&t[1], t[2].parse::<u64>().expect("point index"));
                let hash = parse_hash(&t[3]);
                assert_eq!(
                    hex(xxh3_64(format!("{id}#{i}").as_bytes())),
                    hash,
                    "at {at}"
                );
                assert_eq!(
                    hex(Ring::point_hash(id, i)),
                    hash,
                    "Ring::point_hash at {at}"
                );
                points.push((Ring::point_hash(id, i), id.clone()));
                point_count += 1;
            }
            ("ring", n) if n >= 3 => {
                let vnodes: u32 = t[1].parse().expect("vnodes_per_weight");
                let nodes: Vec<RingNode> = t[2..]
                    .iter()
                    .map(|spec| {
                        let (id, weight) = spec.split_once(':').expect("node as id:weight");
                        RingNode::new(id, weight.parse().expect("weight"))
                    })
                    .collect();
                check_listed_points_in_ring_order(&points, &nodes, vnodes, &at);
                ring = Some(Ring::with_vnodes(nodes, vnodes));
                rings += 1;
            }
            ("route", n) if n >= 4 => {
                let ring = ring.as_ref().expect("a ring line before route lines");
                let (keyspace, key) = (&t[1], t[2].as_bytes());
                let expected: Vec<&str> = t[3..].iter().map(String::as_str).collect();
                let successors: Vec<&str> = ring.successors(keyspace, key).collect();
                assert_eq!(successors, expected, "successors at {at}");
                assert_eq!(
                    ring.owner(keyspace, key),
                    Some(expected[0]),
                    "owner at {at}"
                );
                assert_eq!(
                    ring.replicas(keyspace, key, 2),
                    expected[..2],
                    "replicas at {at}"
                );
                routes += 1;
            }
            _ => panic!("unrecognised vector line {at}"),
        }
    }

    println!(
        "checked {keys} key hashes, {point_count} point hashes, {rings} rings, {routes} routes"
    );
    // Guards against a block that parses but has lost most of its content.
    assert!(keys >= 5 && point_count >= 5 && rings >= 2 && routes >= 10);
}

/// If the `point` lines above a `ring` line list every point of that ring,
/// they must be listed in ring order: `(hash, node id bytewise)`. That is how
/// the document presents the small ring, for implementers to debug against.
fn check_listed_points_in_ring_order(
    points: &[(u64, String)],
    nodes: &[RingNode],
    vnodes: u32,
    at: &str,
) {
    let total: u64 = nodes
        .iter()
        .map(|n| u64::from(n.weight) * u64::from(vnodes))
        .sum();
    let listed: Vec<&(u64, String)> = points
        .iter()
        .filter(|(_, id)| nodes.iter().any(|n| n.id == *id))
        .collect();
    if listed.len() as u64 != total {
        return;
    }
    for pair in listed.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(
            (a.0, a.1.as_bytes()) < (b.0, b.1.as_bytes()),
            "points listed out of ring order before {at}: {a:?} then {b:?}"
        );
    }
}
