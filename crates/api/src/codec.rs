//! The codec of Sinew's gRPC services: prost, with small buffers.
//!
//! tonic's encoder keeps, for each stream, a buffer as large as the most it has
//! encoded at once: it gathers ready messages until its yield threshold (32 KiB by
//! default), and a message larger than that grows the buffer to its size. A
//! control plane holds one discovery stream per proxy, so that buffer is paid once
//! per proxy: with small settings here, and pushes sent in parts of a few KiB, it
//! stays a few KiB per stream instead of the size of the largest push.
//!
//! tonic's decoder also keeps a buffer per stream, and reserves a whole message's
//! length more than it already holds before decoding it, so a buffer of n bytes
//! doubles on the first message above n/2 bytes and is then cycled through end to
//! end: every page of it is resident. Started small, it grows to about twice the
//! largest message a stream carries: on a control plane's proxy streams (acks,
//! demand, tap events) that is well under the 4 KiB it would otherwise start at.
//! Stats reports, the largest regular messages, come in calls of their own
//! (`Discovery.Report`) so that no stream keeps a buffer sized for them.

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Encoding: initial buffer size, and how much is gathered before it is handed to
/// HTTP/2.
fn encode_settings() -> BufferSettings {
    BufferSettings::new(4 * 1024, 4 * 1024)
}

/// Decoding: a small initial buffer that grows to fit what arrives (see the module
/// docs). Not zero: tonic also grows a decompression buffer by this step.
fn decode_settings() -> BufferSettings {
    BufferSettings::new(512, 4 * 1024)
}

/// A prost codec with small buffers (see the module docs).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(encode_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(decode_settings())
    }
}
