//! The bundle reader: any bytes are a verified bundle or a named error, never a panic, and the
//! streaming verifier (what a coordinator runs on an upload) agrees with `Bundle::read` however
//! the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sophon_sdk::bundle::{Bundle, StreamVerifier};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bundle)) = data.split_first() else {
        return;
    };
    let read = Bundle::read(bundle);
    let mut verifier = StreamVerifier::new();
    let streamed = bundle
        .chunks(usize::from(chunk).max(1))
        .try_for_each(|piece| verifier.update(piece))
        .and_then(|()| verifier.finish());
    assert_eq!(read.is_ok(), streamed.is_ok(), "{read:?} / {streamed:?}");
    if let (Ok(r), Ok(s)) = (read, streamed) {
        assert_eq!(r.digest, s.digest);
        assert_eq!(r.manifest, s.manifest);
    }
});
