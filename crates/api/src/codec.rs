//! The codec of Sinew's gRPC services: prost, with small buffers.
//!
//! tonic's encoder keeps, for each stream, a buffer as large as the most it has
//! encoded at once: it gathers ready messages until its yield threshold (32 KiB by
//! default), and a message larger than that grows the buffer to its size. A
//! control plane holds one discovery stream per proxy, so that buffer is paid once
//! per proxy: with small settings here, and pushes sent in parts of a few KiB, it
//! stays a few KiB per stream instead of the size of the largest push.

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial buffer size, and how much is gathered before it is handed to HTTP/2.
fn settings() -> BufferSettings {
    BufferSettings::new(4 * 1024, 4 * 1024)
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
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
