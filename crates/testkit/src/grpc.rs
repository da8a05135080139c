//! A gRPC echo server (tonic) and its generated client.
//!
//! The service is `sinew.test.v1.Echo` from `proto/echo.proto`; the Rust code
//! generated from it is committed in `src/gen/` (regenerate with
//! `scripts/regen-protos`), so building needs no `protoc`.
//!
//! | RPC | Behaviour |
//! |-----|-----------|
//! | `Unary` | echoes `message`; header metadata `x-echo-server: <name>` |
//! | `ServerStream` | sends `count` replies `message-0`, `message-1`, ...; trailers `x-echo-trailer: server-stream-done` with grpc-status 0 |
//! | `BidiStream` | echoes each request; trailers `x-echo-trailer: bidi-stream-done` with grpc-status 0 |
//! | `Fail` | status `FAILED_PRECONDITION`, message `told to fail`, metadata `x-echo-trailer: failed` |
//!
//! Every reply's `server` field is the server's name.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt, stream};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::BoxError;
use crate::server::{ServerTask, bind};

/// Code generated from `proto/echo.proto` (package `sinew.test.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!("gen/sinew.test.v1.rs");
}

pub use pb::echo_client::EchoClient;
pub use pb::{EchoReply, EchoRequest, StreamRequest};

/// Metadata key the server sets in its trailers (and on `Fail`).
pub const TRAILER_KEY: &str = "x-echo-trailer";
/// `x-echo-trailer` value at the end of a successful `ServerStream`.
pub const SERVER_STREAM_TRAILER: &str = "server-stream-done";
/// `x-echo-trailer` value at the end of a successful `BidiStream`.
pub const BIDI_STREAM_TRAILER: &str = "bidi-stream-done";
/// `x-echo-trailer` value on `Fail`.
pub const FAIL_TRAILER: &str = "failed";
/// Header metadata key carrying the server name on `Unary` replies.
pub const SERVER_HEADER_KEY: &str = "x-echo-server";
/// Status message of `Fail`.
pub const FAIL_MESSAGE: &str = "told to fail";

/// A tonic gRPC server running the echo service on loopback.
///
/// Dropping it (or calling [`shutdown`](Self::shutdown)) closes the
/// listener. Connections that tonic already accepted run in their own tasks
/// and last until the client drops them.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    task: ServerTask,
}

impl EchoServer {
    /// Binds `127.0.0.1:0` and starts serving; ready when this returns.
    ///
    /// `name` goes into every reply's `server` field and `x-echo-server`; it
    /// must be a valid (ASCII) metadata value.
    pub async fn start(name: &str) -> std::io::Result<EchoServer> {
        let server_header = MetadataValue::try_from(name).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("server name {name:?} is not a valid metadata value: {e}"),
            )
        })?;
        let (listener, addr) = bind().await?;
        let service = EchoService {
            name: name.to_owned(),
            server_header,
        };
        let router = Server::builder().add_service(pb::echo_server::EchoServer::new(service));
        let task = ServerTask::spawn(async move {
            // Only ends on a fatal server error; tests then see refused or
            // failed connections.
            let _ = router
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await;
        });
        Ok(EchoServer { addr, task })
    }

    /// The address the server listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server: when this returns the listener is closed.
    pub async fn shutdown(mut self) {
        self.task.stop().await;
    }
}

/// Connects an [`EchoClient`] to `addr` over h2c.
pub async fn connect(addr: SocketAddr) -> Result<EchoClient<Channel>, BoxError> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(EchoClient::new(channel))
}

/// A `Status` that ends a response stream successfully (grpc-status 0) with
/// `x-echo-trailer: value` in the trailers.
///
/// On the server, tonic turns an `Err(status)` item of a response stream into
/// the trailers frame `status.to_header_map()`: grpc-status from the code,
/// plus the status metadata. With `Code::Ok` that is a successful end with
/// custom trailers.
fn ok_with_trailer(value: &'static str) -> Status {
    let mut md = MetadataMap::new();
    md.insert(TRAILER_KEY, MetadataValue::from_static(value));
    Status::with_metadata(Code::Ok, "", md)
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send + 'static>>;

struct EchoService {
    name: String,
    server_header: MetadataValue<tonic::metadata::Ascii>,
}

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let reply = EchoReply {
            message: request.into_inner().message,
            server: self.name.clone(),
        };
        let mut response = Response::new(reply);
        response
            .metadata_mut()
            .insert(SERVER_HEADER_KEY, self.server_header.clone());
        Ok(response)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let count = request.into_inner().count;
        let server = self.name.clone();
        let replies = stream::iter(0..count).map(move |i| {
            Ok(EchoReply {
                message: format!("message-{i}"),
                server: server.clone(),
            })
        });
        let end = stream::once(async { Err(ok_with_trailer(SERVER_STREAM_TRAILER)) });
        Ok(Response::new(Box::pin(replies.chain(end))))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStreamStream>, Status> {
        let server = self.name.clone();
        // State: the inbound stream, or `None` once the stream has ended.
        let replies = stream::unfold(Some(request.into_inner()), move |state| {
            let server = server.clone();
            async move {
                let mut inbound = state?;
                match inbound.next().await {
                    Some(Ok(req)) => Some((
                        Ok(EchoReply {
                            message: req.message,
                            server,
                        }),
                        Some(inbound),
                    )),
                    Some(Err(status)) => Some((Err(status), None)),
                    None => Some((Err(ok_with_trailer(BIDI_STREAM_TRAILER)), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn fail(&self, _request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let mut md = MetadataMap::new();
        md.insert(TRAILER_KEY, MetadataValue::from_static(FAIL_TRAILER));
        Err(Status::with_metadata(
            Code::FailedPrecondition,
            FAIL_MESSAGE,
            md,
        ))
    }
}
