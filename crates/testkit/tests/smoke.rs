//! Smoke tests: every testkit server driven directly by the testkit clients.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Frame;
use sinew_testkit::BoxError;
use sinew_testkit::client::{self, body_channel, collect, empty, full};
use sinew_testkit::grpc::{self, EchoRequest, StreamRequest};
use sinew_testkit::http::{self as backend, Event, FNV_OFFSET, HttpBackend, fnv1a64};
use sinew_testkit::tcp::TcpEchoServer;
use sinew_testkit::wait;
use sinew_testkit::ws::WsEchoServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

type TestResult = Result<(), BoxError>;

/// Upper bound for anything that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn echo_over_http1_keeps_alive() -> TestResult {
    let backend = HttpBackend::start("alpha").await?;
    let mut conn = client::h1(backend.addr()).await?;

    for i in 0..3 {
        let req = Request::get(format!("/echo/{i}?x=1&y=two"))
            .header("host", "example.test")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .body(empty())?;
        let resp = collect(conn.send(req).await?).await?;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.header("x-backend"), Some("alpha"));
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let path = format!("/echo/{i}?x=1&y=two");
        assert_eq!(resp.header("x-seen-path"), Some(path.as_str()));
        assert_eq!(resp.header("x-seen-authority"), Some("example.test"));
        assert_eq!(resp.header("x-seen-version"), Some("HTTP/1.1"));
        assert_eq!(resp.header("x-seen-method"), Some("GET"));

        let json = resp.json()?;
        assert_eq!(json["backend"], "alpha");
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], format!("/echo/{i}"));
        assert_eq!(json["query"], "x=1&y=two");
        assert_eq!(json["version"], "HTTP/1.1");
        assert_eq!(json["authority"], "example.test");
        assert_eq!(json["headers"]["host"], "example.test");
        assert_eq!(json["headers"]["x-multi"], "a, b");
    }
    assert_eq!(backend.requests(), 3);
    assert_eq!(backend.connections(), 1, "keep-alive reuses the connection");

    // A POST body is read and counted; no query gives null.
    let req = Request::post("/submit")
        .header("host", "example.test")
        .body(full("hello"))?;
    let json = collect(conn.send(req).await?).await?.json()?;
    assert_eq!(json["method"], "POST");
    assert_eq!(json["body_bytes"], 5);
    assert!(json["query"].is_null());

    // One-shot helper on its own connection.
    let resp = client::get(backend.addr(), "other.test", "/x").await?;
    assert_eq!(resp.json()?["authority"], "other.test");
    assert_eq!(backend.connections(), 2);
    Ok(())
}

#[tokio::test]
async fn echo_over_h2c() -> TestResult {
    let backend = HttpBackend::start("beta").await?;
    let conn = client::h2(backend.addr()).await?;

    let req = Request::get("http://example.test/h2/path?q=1").body(empty())?;
    let resp = collect(conn.send(req).await?).await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.version, Version::HTTP_2);
    assert_eq!(resp.header("x-backend"), Some("beta"));
    assert_eq!(resp.header("x-seen-version"), Some("HTTP/2.0"));
    assert_eq!(resp.header("x-seen-authority"), Some("example.test"));
    assert_eq!(resp.header("x-seen-path"), Some("/h2/path?q=1"));
    let json = resp.json()?;
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(json["path"], "/h2/path");

    // Concurrent streams on clones of the same connection.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            conn.get("example.test", &format!("/c/{i}")).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await??.status, StatusCode::OK);
    }

    // A bare path gets the connection address as authority.
    let resp = collect(conn.send(Request::get("/bare").body(empty())?).await?).await?;
    assert_eq!(
        resp.header("x-seen-authority"),
        Some(backend.addr().to_string().as_str())
    );
    assert_eq!(backend.requests(), 10);
    assert_eq!(backend.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn status_delay_and_bytes() -> TestResult {
    let backend = HttpBackend::start("gamma").await?;
    let mut conn = client::h1(backend.addr()).await?;

    let resp = conn.get("x", "/status/418").await?;
    assert_eq!(resp.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(resp.header("x-backend"), Some("gamma"));
    assert!(!resp.body.is_empty());

    let resp = conn.get("x", "/status/204").await?;
    assert_eq!(resp.status, StatusCode::NO_CONTENT);

    let started = Instant::now();
    let resp = conn.get("x", "/delay/30").await?;
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("x-seen-path"), Some("/delay/30"));

    let n = 200_000u64;
    for h2 in [false, true] {
        let resp = if h2 {
            client::h2(backend.addr())
                .await?
                .get("x", &format!("/bytes/{n}"))
                .await?
        } else {
            conn.get("x", &format!("/bytes/{n}")).await?
        };
        assert_eq!(resp.status, StatusCode::OK);
        assert!(resp.headers.get("content-length").is_none());
        assert_eq!(resp.body.len() as u64, n);
        for (i, byte) in resp.body.iter().enumerate() {
            assert_eq!(*byte, backend::pattern_byte(i as u64), "byte {i}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn never_responds_but_counts() -> TestResult {
    let backend = HttpBackend::start("delta").await?;
    let mut conn = client::h1(backend.addr()).await?;
    let req = Request::get("/never").header("host", "x").body(empty())?;
    let pending = conn.send(req);
    tokio::pin!(pending);
    // Drive the request until the backend has seen it; it must still be
    // pending then.
    let seen = wait::until("backend saw /never", PATIENCE, || async {
        backend.requests() == 1
    });
    tokio::select! {
        res = &mut pending => return Err(format!("/never answered: {res:?}").into()),
        res = seen => res?,
    }
    assert!((&mut pending).now_or_never().is_none());
    Ok(())
}

#[tokio::test]
async fn upload_checksum_streams() -> TestResult {
    let backend = HttpBackend::start("up").await?;
    let chunks: Vec<Bytes> = (0..20u8)
        .map(|i| Bytes::from(vec![i.wrapping_mul(37); 10_000 + usize::from(i)]))
        .collect();
    let expected_len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let expected_sum = chunks.iter().fold(FNV_OFFSET, |s, c| fnv1a64(s, c));

    // HTTP/1.1 chunked upload through a channel body.
    let mut conn = client::h1(backend.addr()).await?;
    let (tx, body) = body_channel(4);
    let req = Request::post("/upload").header("host", "x").body(body)?;
    let feeder = {
        let chunks = chunks.clone();
        tokio::spawn(async move {
            for chunk in chunks {
                tx.send(Ok(Frame::data(chunk))).await?;
            }
            Ok::<_, BoxError>(())
        })
    };
    let resp = collect(conn.send(req).await?).await?;
    feeder.await??;
    let json = resp.json()?;
    assert_eq!(json["bytes"].as_u64(), Some(expected_len));
    assert_eq!(json["checksum"].as_u64(), Some(expected_sum));

    // HTTP/2 upload with a full body.
    let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let conn = client::h2(backend.addr()).await?;
    let req = Request::post("/upload").body(full(all))?;
    let json = collect(conn.send(req).await?).await?.json()?;
    assert_eq!(json["bytes"].as_u64(), Some(expected_len));
    assert_eq!(json["checksum"].as_u64(), Some(expected_sum));
    Ok(())
}

async fn progress_reaches(backend: &HttpBackend, want: u64) -> TestResult {
    loop {
        match timeout(PATIENCE, backend.next_event()).await? {
            Some(Event::UploadProgress { total_bytes }) if total_bytes == want => return Ok(()),
            Some(Event::UploadProgress { total_bytes }) if total_bytes < want => {}
            other => return Err(format!("waiting for {want} bytes, got {other:?}").into()),
        }
    }
}

#[tokio::test]
async fn gated_upload_reports_progress() -> TestResult {
    let backend = HttpBackend::start("gate-up").await?;
    let conn = client::h2(backend.addr()).await?;
    let (tx, body) = body_channel(1);
    let req = Request::post("/gated-upload").body(body)?;
    let response = tokio::spawn(async move { collect(conn.send(req).await?).await });

    tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 1000]))))
        .await?;
    progress_reaches(&backend, 1000).await?;
    tx.send(Ok(Frame::data(Bytes::from(vec![2u8; 500]))))
        .await?;
    progress_reaches(&backend, 1500).await?;
    assert!(!response.is_finished());
    drop(tx);

    let resp = timeout(PATIENCE, response).await???;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()?["bytes"], 1500);
    Ok(())
}

#[tokio::test]
async fn gated_download_waits_for_permits() -> TestResult {
    let backend = HttpBackend::start("gate-down").await?;
    for h2 in [false, true] {
        let req = Request::get("/gated-download/3")
            .header("host", "x")
            .body(empty())?;
        let resp = if h2 {
            client::h2(backend.addr()).await?.send(req).await?
        } else {
            client::h1(backend.addr()).await?.send(req).await?
        };
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();

        for chunk in 0..3usize {
            if chunk > 0 {
                // Nothing more may arrive before the permit.
                assert!(body.frame().now_or_never().is_none());
                backend.release_chunk();
            }
            let mut got = Vec::new();
            while got.len() < backend::GATED_CHUNK_SIZE {
                let frame = timeout(PATIENCE, body.frame())
                    .await?
                    .ok_or("body ended early")??;
                if let Some(data) = frame.data_ref() {
                    got.extend_from_slice(data);
                }
            }
            assert_eq!(got, backend::gated_chunk(chunk).to_vec(), "chunk {chunk}");
        }
        // All chunks sent: the body ends without another permit (possibly
        // after an empty end-of-stream data frame).
        while let Some(frame) = timeout(PATIENCE, body.frame()).await? {
            let frame = frame?;
            let extra = frame.data_ref().map_or(0, |d| d.len());
            assert_eq!(extra, 0, "unexpected data after the last chunk (h2: {h2})");
        }
    }
    Ok(())
}

#[tokio::test]
async fn trailers_over_h2_and_h1() -> TestResult {
    let backend = HttpBackend::start("trailing").await?;
    let resp = client::h2(backend.addr())
        .await?
        .get("x", "/trailers")
        .await?;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.text(), "with trailers");
    assert_eq!(resp.trailer("x-trailer"), Some("done"));

    // HTTP/1.1 sends trailers only to clients that asked for them.
    let mut conn = client::h1(backend.addr()).await?;
    let req = Request::get("/trailers")
        .header("host", "x")
        .header("te", "trailers")
        .body(empty())?;
    let resp = collect(conn.send(req).await?).await?;
    assert_eq!(resp.text(), "with trailers");
    assert_eq!(resp.trailer("x-trailer"), Some("done"));
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_accepting() -> TestResult {
    let backend = HttpBackend::start("gone").await?;
    let addr = backend.addr();
    client::get(addr, "x", "/").await?;
    backend.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());

    let tcp = TcpEchoServer::start().await?;
    let addr = tcp.addr();
    drop(tcp);
    // Drop aborts the task; the listener closes once the runtime drops it.
    wait::until("tcp listener closed", PATIENCE, || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn websocket_echo_round_trip() -> TestResult {
    let server = WsEchoServer::start().await?;
    let stream = TcpStream::connect(server.addr()).await?;
    let url = format!("ws://{}/chat", server.addr());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await?;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    ws.send(Message::text("hello")).await?;
    let reply = timeout(PATIENCE, ws.next()).await?.ok_or("ws ended")??;
    assert_eq!(reply, Message::text("hello"));

    ws.send(Message::binary(vec![0u8, 1, 2, 255])).await?;
    let reply = timeout(PATIENCE, ws.next()).await?.ok_or("ws ended")??;
    assert_eq!(reply, Message::binary(vec![0u8, 1, 2, 255]));

    ws.close(None).await?;
    // The server answers the close; the stream then ends.
    loop {
        match timeout(PATIENCE, ws.next()).await? {
            Some(Ok(Message::Close(_))) => {}
            Some(Ok(other)) => return Err(format!("unexpected {other:?}").into()),
            Some(Err(_)) | None => break,
        }
    }
    assert_eq!(server.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn tcp_echo_and_server_first() -> TestResult {
    let server = TcpEchoServer::start().await?;
    let mut stream = TcpStream::connect(server.addr()).await?;
    stream.write_all(b"ping over tcp").await?;
    stream.shutdown().await?;
    let mut echoed = Vec::new();
    timeout(PATIENCE, stream.read_to_end(&mut echoed)).await??;
    assert_eq!(echoed, b"ping over tcp");
    assert_eq!(server.connections(), 1);

    let banner = "220 sinew.test ESMTP ready\r\n";
    let server = TcpEchoServer::start_server_first(banner).await?;
    let mut stream = TcpStream::connect(server.addr()).await?;
    // The client says nothing yet: the banner must arrive on its own.
    let mut got = vec![0u8; banner.len()];
    timeout(PATIENCE, stream.read_exact(&mut got)).await??;
    assert_eq!(got, banner.as_bytes());
    stream.write_all(b"HELO x\r\n").await?;
    let mut got = [0u8; 8];
    timeout(PATIENCE, stream.read_exact(&mut got)).await??;
    assert_eq!(&got, b"HELO x\r\n");
    Ok(())
}

#[tokio::test]
async fn grpc_unary_and_fail() -> TestResult {
    let server = grpc::EchoServer::start("grpc-a").await?;
    let mut client = grpc::connect(server.addr()).await?;

    let resp = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await?;
    assert_eq!(
        resp.metadata()
            .get(grpc::SERVER_HEADER_KEY)
            .and_then(|v| v.to_str().ok()),
        Some("grpc-a")
    );
    let reply = resp.into_inner();
    assert_eq!(reply.message, "hi");
    assert_eq!(reply.server, "grpc-a");

    let status = client
        .fail(EchoRequest {
            message: "x".into(),
        })
        .await
        .err()
        .ok_or("Fail succeeded")?;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "told to fail");
    assert_eq!(
        status
            .metadata()
            .get("x-echo-trailer")
            .and_then(|v| v.to_str().ok()),
        Some("failed")
    );
    Ok(())
}

#[tokio::test]
async fn grpc_server_stream_ends_with_trailer() -> TestResult {
    let server = grpc::EchoServer::start("grpc-b").await?;
    let mut client = grpc::connect(server.addr()).await?;

    let mut stream = client
        .server_stream(StreamRequest { count: 4 })
        .await?
        .into_inner();
    let mut messages = Vec::new();
    while let Some(reply) = timeout(PATIENCE, stream.message()).await?? {
        assert_eq!(reply.server, "grpc-b");
        messages.push(reply.message);
    }
    assert_eq!(
        messages,
        ["message-0", "message-1", "message-2", "message-3"]
    );
    let trailers = stream.trailers().await?.ok_or("no trailers")?;
    assert_eq!(
        trailers.get("x-echo-trailer").and_then(|v| v.to_str().ok()),
        Some(grpc::SERVER_STREAM_TRAILER)
    );
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0")
    );
    Ok(())
}

#[tokio::test]
async fn grpc_bidi_echoes_and_ends_with_trailer() -> TestResult {
    let server = grpc::EchoServer::start("grpc-c").await?;
    let mut client = grpc::connect(server.addr()).await?;

    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(4);
    let mut replies = client
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Interleaved: each reply arrives before the next request is sent.
    for word in ["one", "two", "three"] {
        tx.send(EchoRequest {
            message: word.into(),
        })
        .await?;
        let reply = timeout(PATIENCE, replies.message())
            .await??
            .ok_or("stream ended early")?;
        assert_eq!(reply.message, word);
        assert_eq!(reply.server, "grpc-c");
    }
    drop(tx);
    assert!(timeout(PATIENCE, replies.message()).await??.is_none());
    let trailers = replies.trailers().await?.ok_or("no trailers")?;
    assert_eq!(
        trailers.get("x-echo-trailer").and_then(|v| v.to_str().ok()),
        Some(grpc::BIDI_STREAM_TRAILER)
    );
    Ok(())
}

/// Raw HTTP/2 view of the gRPC trailers: grpc-status 0 and the custom key in
/// the same trailers frame.
#[tokio::test]
async fn grpc_ok_trailers_on_the_wire() -> TestResult {
    let server = grpc::EchoServer::start("grpc-d").await?;
    let conn = client::h2(server.addr()).await?;
    // StreamRequest { count: 1 } encoded: field 1 varint 1 -> [0x08, 0x01].
    let msg = [0u8, 0, 0, 0, 2, 0x08, 0x01];
    let req = Request::post("/sinew.test.v1.Echo/ServerStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(msg.to_vec()))?;
    let resp = conn.send(req).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().ok_or("no trailers")?.clone();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        trailers.get("x-echo-trailer").map(|v| v.as_bytes()),
        Some(grpc::SERVER_STREAM_TRAILER.as_bytes())
    );
    assert!(trailers.get("grpc-message").is_none());
    Ok(())
}
