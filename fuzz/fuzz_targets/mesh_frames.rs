//! The mesh frame codec: any bytes split into frames or give an error, never a panic and never
//! an allocation past the limit; frames written back give the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sophon_mesh::codec::{decode_frames, encode_header};

fuzz_target!(|data: &[u8]| {
    let Ok(frames) = decode_frames(data, 1 << 16) else {
        return;
    };
    let mut written = Vec::with_capacity(data.len());
    for (kind, payload) in frames {
        written.extend_from_slice(&encode_header(kind, payload.len()).expect("fits"));
        written.extend_from_slice(payload);
    }
    assert_eq!(written, data);
});
