//! The codec of every generated client and server: prost's, with larger buffers, decoding
//! each message from a `Bytes`.
//!
//! tonic starts each call's encode and decode buffers at 8 KiB and doubles them as they
//! fill, copying what they hold each time. A send of 128 messages of 1 KiB is a 135 KiB
//! request; a receive of 512 is a stream of about 600 KiB, handed to the connection in 32 KiB
//! chunks split off the front of one buffer. Once that buffer is used up while chunks are
//! still in flight, each new one is 64 KiB (`bytes` keeps no more of the first capacity) and
//! begins with a copy of the chunk being written. An encode buffer of 1 MiB holds a whole
//! receive's reply without that; a decode buffer of 512 KiB holds a send of 128. Only the
//! pages written to are touched, so a small call's buffer takes address space rather than
//! memory.
//!
//! A decode buffer is twice an HTTP/2 frame: once a message's header is read, tonic
//! reserves room for the whole message beyond the bytes it already holds, and with 256 KiB
//! HTTP/2 frames those bytes are often the whole message already.
//!
//! prost reads a message field by field, advancing its buffer at each. tonic's decode buffer
//! is a `BytesMut`, whose every advance was a visible part of decoding a receive's 512
//! messages; a `Bytes` advances by moving a pointer. Taking the message out as a `Bytes`
//! copies nothing, and bodies are still slices of it.

use std::marker::PhantomData;

use bytes::Buf;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// prost's encoder with [`buffer_settings`], and [`BytesDecoder`].
#[derive(Debug, Clone, Copy)]
pub struct GrpcCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GrpcCodec<T, U> {
    fn default() -> Self {
        GrpcCodec(PhantomData)
    }
}

const ENCODE_BUFFER_SIZE: usize = 1 << 20;
const DECODE_BUFFER_SIZE: usize = 512 << 10;
const YIELD_THRESHOLD: usize = 32 << 10;

/// A 1 MiB encode buffer; a streamed reply is still handed to the connection every 32 KiB
/// (tonic's default), so its first messages leave before the last are encoded.
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(ENCODE_BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for GrpcCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BytesDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesDecoder(PhantomData)
    }
}

/// Decodes a message from its bytes taken out of tonic's buffer.
#[derive(Debug, Clone, Copy)]
pub struct BytesDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for BytesDecoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, tonic::Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        // A message that does not parse is INTERNAL, as gRPC's status codes ask.
        U::decode(message)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_SIZE, YIELD_THRESHOLD)
    }
}
