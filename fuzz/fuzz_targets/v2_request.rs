//! V2 request decoding, JSON and Triton's binary tensor extension: any body gives a request or
//! an error, never a panic; a decoded request checks against a model's tensors without panicking,
//! and encodes back to a body that decodes to the same request. A binary body decoded from its
//! two parts (as the node reads it) gives the same request, or the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sophon_sdk::{Datatype, TensorSpec};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // The first byte says whether the Inference-Header-Content-Length header came, and where.
    let header_len = (first & 1 == 1).then(|| (first as usize >> 1) * 7 % (rest.len() + 1));
    let decoded = sophon_v2::decode_request(rest, header_len);
    if let Some(n) = header_len {
        let split = sophon_v2::decode_request_split(&rest[..n], rest[n..].to_vec());
        match (&decoded, &split) {
            (Ok(whole), Ok(split)) => assert_eq!(whole.inputs, split.inputs),
            (Err(whole), Err(split)) => assert_eq!(whole.to_string(), split.to_string()),
            _ => panic!("whole {decoded:?} but split {split:?}"),
        }
    }
    let Ok(request) = decoded else {
        return;
    };
    let specs = [
        TensorSpec {
            name: "input".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1, 4],
        },
        TensorSpec {
            name: "text".into(),
            datatype: Datatype::Bytes,
            shape: vec![-1],
        },
    ];
    let _ = sophon_v2::validate_inputs(&request.inputs, &specs);
    let _ = sophon_v2::validate_batch(&request.inputs, 8);
    let _ = sophon_v2::select_outputs(&request.outputs, &specs);
    for binary in [false, true] {
        if let Ok(encoded) = sophon_v2::encode_request(&request, |_| binary) {
            let again = sophon_v2::decode_request(&encoded.body, encoded.header_len)
                .expect("an encoded request decodes");
            assert_eq!(again.inputs, request.inputs);
            assert_eq!(again.outputs, request.outputs);
        }
    }
});
