//! `bench-backend`: the benchmark harness's backend (`bench/run`).
//!
//! A minimal, fast server on one port speaking HTTP/1.1 (keep-alive) and h2c
//! (HTTP/2 with prior knowledge). Every request gets `200` and a fixed body of
//! `--body-bytes` bytes with a `content-length`. A request whose `content-type`
//! starts with `application/grpc` gets a gRPC-shaped answer instead: its body
//! is read whole, and the response is one length-prefixed message of
//! `--body-bytes` bytes followed by the trailer `grpc-status: 0`.
//!
//! ```text
//! bench-backend --listen 127.0.0.1:18080 --body-bytes 1024 --workers 1
//! ```
//!
//! It prints `listening on ADDR` once it accepts connections.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The gRPC-shaped response body: one data frame, then trailers.
type GrpcBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// Either a plain body or a gRPC-shaped one.
type Body = Either<Full<Bytes>, GrpcBody>;

/// Command-line settings.
struct Args {
    listen: SocketAddr,
    body_bytes: usize,
    workers: usize,
}

const USAGE: &str = "usage: bench-backend [--listen ADDR] [--body-bytes N] [--workers N]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 18080)),
        body_bytes: 1024,
        workers: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag}: missing value\n{USAGE}"))?;
        match flag.as_str() {
            "--listen" => args.listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "--body-bytes" => {
                args.body_bytes = value.parse().map_err(|e| format!("--body-bytes: {e}"))?;
            }
            "--workers" => {
                args.workers = value
                    .parse::<usize>()
                    .map_err(|e| format!("--workers: {e}"))?
                    .max(1);
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// What every connection shares: the prepared bodies.
#[derive(Clone)]
struct Bodies {
    plain: Bytes,
    plain_len: HeaderValue,
    grpc_message: Bytes,
}

impl Bodies {
    fn new(n: usize) -> Bodies {
        // Printable, so a curl of it is readable.
        let plain: Bytes = (0..n)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>()
            .into();
        let mut grpc = Vec::with_capacity(n + 5);
        grpc.push(0);
        grpc.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        grpc.extend_from_slice(&plain);
        Bodies {
            plain_len: HeaderValue::from(n),
            plain,
            grpc_message: grpc.into(),
        }
    }
}

async fn handle(bodies: Bodies, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the request body whole (usually empty): a proxy may wait for it.
    let _ = req.into_body().collect().await;
    if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            Ok(Frame::data(bodies.grpc_message)),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp = Response::new(Either::Right(StreamBody::new(futures_util::stream::iter(
            frames,
        ))));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        Ok(resp)
    } else {
        let mut resp = Response::new(Either::Left(Full::new(bodies.plain)));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(CONTENT_LENGTH, bodies.plain_len);
        Ok(resp)
    }
}

async fn serve(listener: TcpListener, bodies: Bodies) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(bodies.clone(), req));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(1024);
            // Resets and aborted requests are part of load tests.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-backend: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bench-backend: cannot listen on {}: {e}", args.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        println!("listening on {}", args.listen);
        serve(listener, Bodies::new(args.body_bytes)).await;
        std::process::ExitCode::SUCCESS
    })
}
