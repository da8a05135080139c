//! Protocol detection on a connection's first bytes: the capture sniffer
//! (`capture::classify`: HTTP or opaque TCP) and the inbound listener's HTTP/2
//! prior-knowledge check, which reads bytes ahead of the HTTP server and replays
//! them.
//!
//! The input: one byte that shapes the reads, then the client's bytes. Properties:
//! classification never changes its mind as more bytes arrive; the listener takes a
//! connection for HTTP/2 exactly when it starts with the preface; and the server
//! reads every byte the client sent, in order, once.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sinew_proxy::capture::{Detected, classify};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Some((&shape, bytes)) = data.split_first() else {
        return;
    };
    // The sniffer sees ever longer prefixes (it peeks until it can decide).
    let mut decided: Option<Detected> = None;
    for n in 0..=bytes.len().min(32) {
        let d = classify(&bytes[..n]);
        if let Some(before) = decided {
            assert_eq!(
                d,
                Some(before),
                "{:?}: changed its mind at {n}",
                &bytes[..n]
            );
        }
        decided = decided.or(d);
    }
    if bytes.starts_with(H2_PREFACE) {
        assert_eq!(decided, Some(Detected::Http), "the HTTP/2 preface is HTTP");
    }

    // The bytes arrive in reads of 1..=8 bytes (the low 3 bits of `shape`, then
    // rotating), and the server reads with a buffer of 1..=32 bytes (the high bits).
    let mut chunks = Vec::new();
    let mut rest = bytes;
    let mut size = usize::from(shape & 7) + 1;
    while !rest.is_empty() {
        let (c, r) = rest.split_at(size.min(rest.len()));
        chunks.push(c.to_vec());
        rest = r;
        size = size % 8 + 1;
    }
    let read_size = usize::from(shape >> 3) + 1;
    let got = RT.block_on(sinew_proxy::fuzzing::sniff_inbound(chunks, read_size));
    match got {
        None => assert!(bytes.is_empty(), "a connection that sent bytes was dropped"),
        Some((h2, replayed)) => {
            assert_eq!(h2, bytes.starts_with(H2_PREFACE), "HTTP/2 detection");
            assert_eq!(
                replayed, bytes,
                "the server did not read what the client sent"
            );
        }
    }
});
