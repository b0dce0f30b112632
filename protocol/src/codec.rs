//! The codec of every generated client and server: prost's, with larger buffers.
//!
//! tonic starts each call's encode and decode buffers at 8 KiB and doubles them as they
//! fill, copying what they hold each time. A send of 128 messages of 1 KiB is a 135 KiB
//! request, and a receive of 512 streams out 32 KiB chunks, each started in a new buffer;
//! most of their bytes were copied once more on the way in or out. Buffers of 256 KiB hold
//! either without growing. Only the pages written to are ever touched, so a small call costs
//! no more than before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// prost's codec with [`buffer_settings`].
#[derive(Debug, Clone, Copy)]
pub struct GrpcCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GrpcCodec<T, U> {
    fn default() -> Self {
        GrpcCodec(PhantomData)
    }
}

/// 256 KiB buffers; a streamed reply is still handed to the connection every 32 KiB
/// (tonic's default), so its first messages leave before the last are encoded.
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(256 << 10, 32 << 10)
}

impl<T, U> Codec for GrpcCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}
