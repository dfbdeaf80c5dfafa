//! HTTP content codings, as Triton serves them: a request body sent with `Content-Encoding:
//! gzip` or `deflate` (tritonclient's `request_compression_algorithm`) is inflated before it is
//! decoded, and a response is deflated when the request's `Accept-Encoding` asks for it
//! (`response_compression_algorithm`, `curl --compressed`, a Prometheus scraper).
//!
//! A compressed body is hostile input like any other: what it inflates to counts against the
//! body limit (413) and the node's bytes in flight (503) as it is inflated, a stream that is not
//! what its coding says gets 400, and a coding the node does not speak gets 415. Inflating and
//! deflating run in slices, yielding to the worker's other tasks between them, so that a large
//! body (or a small one that inflates a thousandfold) does not hold a worker for its whole run.

use std::io::{Read, Write};

/// A content coding the node reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// RFC 1952: what `gzip.compress` writes.
    Gzip,
    /// HTTP's `deflate`: the zlib format (RFC 1950), what `zlib.compress` writes. A raw deflate
    /// stream (RFC 1951), which some clients send under the same name, is read too.
    Deflate,
}

impl Coding {
    /// The coding's name in `Content-Encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// Why a body could not be inflated.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    /// `Content-Encoding` names a coding the node does not read.
    #[error("Content-Encoding '{0}' is not supported: send the body as gzip, deflate or identity")]
    Unsupported(String),
    /// The body is not a valid stream of its coding.
    #[error("the request body is not valid {coding}: {reason}")]
    Corrupt {
        coding: &'static str,
        reason: String,
    },
    /// The body inflates to more than the limit.
    #[error("request body is over the limit of {limit} bytes once inflated from {coding}")]
    TooLarge { coding: &'static str, limit: usize },
    /// The node's bytes in flight are taken (see `http::read_body`).
    #[error("no room for the inflated body")]
    NoRoom,
}

/// The coding of a request body, from its `Content-Encoding` (absent or `identity`: none).
pub fn request_coding(
    value: Option<&axum::http::HeaderValue>,
) -> Result<Option<Coding>, InflateError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| InflateError::Unsupported(String::from_utf8_lossy(value.as_bytes()).into()))?
        .trim();
    // One coding only: a body encoded twice ("gzip, gzip") is refused rather than inflated in
    // layers, each of which could multiply it again.
    match text.to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(None),
        "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
        "deflate" => Ok(Some(Coding::Deflate)),
        _ => Err(InflateError::Unsupported(text.to_string())),
    }
}

/// The coding to answer in, from the request's `Accept-Encoding`: gzip or deflate when the
/// client accepts one (gzip first on a tie, as its checksum covers the data), none otherwise.
/// `q=0` refuses a coding; `*` stands for any coding not named.
pub fn response_coding(value: Option<&axum::http::HeaderValue>) -> Option<Coding> {
    let text = value?.to_str().ok()?;
    let (mut gzip, mut deflate, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    for item in text.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f32;
        for param in parts {
            if let Some((k, v)) = param.split_once('=')
                && k.trim().eq_ignore_ascii_case("q")
            {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q),
            "deflate" => deflate = Some(q),
            "*" => any = Some(q),
            _ => {}
        }
    }
    let gzip = gzip.or(any).unwrap_or(0.0);
    let deflate = deflate.or(any).unwrap_or(0.0);
    if gzip <= 0.0 && deflate <= 0.0 {
        None
    } else if gzip >= deflate {
        Some(Coding::Gzip)
    } else {
        Some(Coding::Deflate)
    }
}

/// How much is inflated or deflated between two yields to the worker's other tasks: about
/// 100–300 µs of work.
const SLICE: usize = 256 << 10;

/// Inflate `body` from `coding`, at most `limit` bytes, calling `room(n)` before it holds `n`
/// more bytes of memory for the inflated body (it takes them from the node's bytes in flight,
/// or refuses).
pub async fn inflate(
    coding: Coding,
    body: &[u8],
    limit: usize,
    room: impl FnMut(usize) -> bool,
) -> Result<bytes::Bytes, InflateError> {
    inflate_metered(coding, body, limit, room, INPUT_SLICE).await
}

/// [`inflate`], yielding after every `input_slice` bytes of the body read as well as after every
/// [`SLICE`] bytes it inflated to: a body of empty blocks (or empty gzip members) inflates to
/// nothing while the decoder works through all of it.
async fn inflate_metered(
    coding: Coding,
    body: &[u8],
    limit: usize,
    mut room: impl FnMut(usize) -> bool,
    input_slice: usize,
) -> Result<bytes::Bytes, InflateError> {
    let corrupt = |e: std::io::Error| InflateError::Corrupt {
        coding: coding.name(),
        reason: e.to_string(),
    };
    let input = Metered {
        rest: body,
        budget: input_slice,
    };
    let mut decoder = match coding {
        Coding::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(input)),
        Coding::Deflate if zlib_header(body) => {
            Decoder::Zlib(flate2::bufread::ZlibDecoder::new(input))
        }
        Coding::Deflate => Decoder::Raw(flate2::bufread::DeflateDecoder::new(input)),
    };
    // Room for twice the compressed size to start with (most bodies inflate to less than
    // that), never past the limit; it grows as the body inflates. What is counted against the
    // bytes in flight is the room held, not only the bytes in it.
    let start = body.len().saturating_mul(2).min(limit);
    if !room(start) {
        return Err(InflateError::NoRoom);
    }
    let mut out: Vec<u8> = Vec::with_capacity(start);
    let mut counted = start;
    // Inflated a piece at a time, each piece counted before it is kept.
    let mut piece = vec![0u8; PIECE];
    let mut since_yield = 0usize;
    loop {
        let n = match decoder.read(&mut piece) {
            Ok(0) => return Ok(out.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The input's slice is read: let the worker's other tasks run, then go on.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                decoder.input().budget = input_slice;
                since_yield = 0;
                tokio::task::yield_now().await;
                continue;
            }
            Err(e) => return Err(corrupt(e)),
        };
        if out.len() + n > limit {
            return Err(InflateError::TooLarge {
                coding: coding.name(),
                limit,
            });
        }
        if out.len() + n > out.capacity() {
            out.reserve(n);
        }
        if out.capacity() > counted {
            if !room(out.capacity() - counted) {
                return Err(InflateError::NoRoom);
            }
            counted = out.capacity();
        }
        out.extend_from_slice(&piece[..n]);
        since_yield += n;
        if since_yield >= SLICE {
            since_yield = 0;
            decoder.input().budget = input_slice;
            tokio::task::yield_now().await;
        }
    }
}

/// How much is inflated at a time, before it is counted and kept.
const PIECE: usize = 32 << 10;

/// How much of a compressed body is read between two yields.
const INPUT_SLICE: usize = 64 << 10;

/// The body, handed to the decoder a budget at a time: past it, reading says `WouldBlock`
/// (which flate2's decoders resume from) until the budget is renewed.
struct Metered<'a> {
    rest: &'a [u8],
    budget: usize,
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let available = std::io::BufRead::fill_buf(self)?;
            let n = available.len().min(buf.len());
            buf[..n].copy_from_slice(&available[..n]);
            n
        };
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for Metered<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.budget == 0 && !self.rest.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self.rest.len().min(self.budget).min(PIECE);
        Ok(&self.rest[..n])
    }

    fn consume(&mut self, n: usize) {
        self.rest = &self.rest[n..];
        self.budget -= n;
    }
}

/// One of the three decoders, over the metered body.
enum Decoder<'a> {
    Gzip(flate2::bufread::MultiGzDecoder<Metered<'a>>),
    Zlib(flate2::bufread::ZlibDecoder<Metered<'a>>),
    Raw(flate2::bufread::DeflateDecoder<Metered<'a>>),
}

impl<'a> Decoder<'a> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zlib(d) => d.read(buf),
            Decoder::Raw(d) => d.read(buf),
        }
    }

    fn input(&mut self) -> &mut Metered<'a> {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib(d) => d.get_mut(),
            Decoder::Raw(d) => d.get_mut(),
        }
    }
}

/// Whether `body` starts with a zlib header (RFC 1950: deflate method, a window of at most
/// 32 KiB, and a check that makes the first two bytes a multiple of 31).
fn zlib_header(body: &[u8]) -> bool {
    match body {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

/// Deflate `body` into `coding`, at the fast level: a response is compressed for the wire,
/// and the level that costs least per byte keeps the node's latency (float tensors gain little
/// from a higher one).
pub async fn deflate(coding: Coding, body: &[u8]) -> Vec<u8> {
    let level = flate2::Compression::fast();
    let out = Vec::with_capacity(body.len() / 2 + 64);
    let mut encoder = match coding {
        Coding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(out, level)),
        Coding::Deflate => Encoder::Zlib(flate2::write::ZlibEncoder::new(out, level)),
    };
    let mut chunks = body.chunks(SLICE).peekable();
    while let Some(chunk) = chunks.next() {
        encoder.write(chunk);
        if chunks.peek().is_some() {
            tokio::task::yield_now().await;
        }
    }
    encoder.finish()
}

/// An encoder into memory, where writing cannot fail.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zlib(flate2::write::ZlibEncoder<Vec<u8>>),
}

impl Encoder {
    fn write(&mut self, chunk: &[u8]) {
        let written = match self {
            Encoder::Gzip(e) => e.write_all(chunk),
            Encoder::Zlib(e) => e.write_all(chunk),
        };
        written.expect("deflating into memory does not fail");
    }

    fn finish(self) -> Vec<u8> {
        let finished = match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zlib(e) => e.finish(),
        };
        finished.expect("deflating into memory does not fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn encode(coding: &str, data: &[u8]) -> Vec<u8> {
        let level = flate2::Compression::default();
        match coding {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
                e.write_all(data).expect("in memory");
                e.finish().expect("in memory")
            }
            "zlib" => {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
                e.write_all(data).expect("in memory");
                e.finish().expect("in memory")
            }
            _ => {
                let mut e = flate2::write::DeflateEncoder::new(Vec::new(), level);
                e.write_all(data).expect("in memory");
                e.finish().expect("in memory")
            }
        }
    }

    #[tokio::test]
    async fn inflating_resumes_after_every_slice_of_input() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        // Two gzip members, as `cat a.gz b.gz` makes.
        let mut two = encode("gzip", &data[..1000]);
        two.extend(encode("gzip", &data[1000..]));
        for (coding, body, want) in [
            (Coding::Gzip, encode("gzip", &data), &data[..]),
            (Coding::Gzip, two, &data[..]),
            (Coding::Deflate, encode("zlib", &data), &data[..]),
            (Coding::Deflate, encode("raw", &data), &data[..]),
        ] {
            // A slice of a few bytes makes the decoders stop and resume everywhere, headers
            // included.
            for slice in [1, 7, 4096, INPUT_SLICE] {
                let got = inflate_metered(coding, &body, 1 << 30, |_| true, slice)
                    .await
                    .expect("inflates");
                assert!(got == want, "{coding:?}, input slices of {slice}");
            }
        }
    }

    #[tokio::test]
    async fn a_body_of_empty_gzip_members_yields_as_it_is_read() {
        // 4,000 empty members: nothing comes out, and the reading still stops every slice.
        let empty = encode("gzip", b"");
        let body: Vec<u8> = std::iter::repeat_n(empty, 4000).flatten().collect();
        let yields = std::sync::atomic::AtomicUsize::new(0);
        let counting = async {
            loop {
                yields.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        };
        let got = tokio::select! {
            got = inflate_metered(Coding::Gzip, &body, 1 << 20, |_| true, 1024) => got,
            _ = counting => unreachable!("the counter never ends"),
        };
        assert!(got.expect("valid").is_empty());
        let yields = yields.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            yields >= body.len() / 1024 / 2,
            "{yields} yields for {} bytes",
            body.len()
        );
    }
}
