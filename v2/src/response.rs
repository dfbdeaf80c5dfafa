//! Inference responses: [`encode_response`] on the server, [`decode_response`] for clients.

use super::body::{
    BinarySection, WireTensor, WriteTensor, assemble, parse, read_tensors, split_body,
    write_tensors,
};
use super::{EncodedBody, InferResponse, Result, Role, Tensor, V2Error};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Encodes a response. `binary(name)` says whether the output `name` goes as binary tensor data
/// (typically [`super::InferRequest::wants_binary`]); when any does, `header_len` is `Some` and
/// the HTTP layer must send it as `Inference-Header-Content-Length`. JSON `data` is always flat.
///
/// Errors: [`V2Error::Inconsistent`] (status 500) for an output whose data does not match its
/// shape; [`V2Error::NotJsonRepresentable`] for a JSON output holding NaN, an infinity or
/// non-UTF-8 bytes.
pub fn encode_response(
    model_name: &str,
    model_version: Option<&str>,
    id: Option<&Value>,
    outputs: &[Tensor],
    binary: impl Fn(&str) -> bool,
) -> Result<EncodedBody> {
    let flags: Vec<bool> = outputs.iter().map(|t| binary(&t.name)).collect();
    let wire_outputs = write_tensors(outputs, &flags, Role::Output)?;
    let response = WriteResponse {
        model_name,
        model_version,
        id,
        outputs: wire_outputs,
    };
    assemble(&response, outputs, &flags)
}

/// Decodes an inference response (the client side of [`encode_response`]).
pub fn decode_response(body: &[u8], header_len: Option<usize>) -> Result<InferResponse> {
    let (json, binary) = split_body(body, header_len)?;
    let wire: WireResponse<'_> = parse(json, header_len, "response")?;
    let model_name = wire
        .model_name
        .ok_or_else(|| V2Error::Malformed("the response has no `model_name`".into()))?;
    let wire_outputs = wire
        .outputs
        .ok_or_else(|| V2Error::Malformed("the response has no `outputs`".into()))?;
    let mut section = BinarySection::new(binary, header_len.is_some());
    let outputs = read_tensors(wire_outputs, Role::Output, &mut section)?;
    section.finish()?;
    Ok(InferResponse {
        model_name,
        model_version: wire.model_version,
        id: wire.id,
        outputs,
    })
}

#[derive(Deserialize)]
struct WireResponse<'a> {
    #[serde(default)]
    model_name: Option<String>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, borrow)]
    outputs: Option<Vec<WireTensor<'a>>>,
}

#[derive(Serialize)]
struct WriteResponse<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    outputs: Vec<WriteTensor<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use sophon_sdk::Datatype;

    #[test]
    fn json_response_layout() {
        let outputs = [
            Tensor::from_f32("y", vec![1, 2], &[0.25, -1.0]),
            Tensor::new("b", Datatype::Bool, vec![1], vec![1]),
        ];
        let id = Value::from("r1");
        let encoded =
            encode_response("m", Some("3"), Some(&id), &outputs, |_| false).expect("valid");
        assert_eq!(encoded.header_len, None);
        assert_eq!(
            String::from_utf8(encoded.body).expect("utf-8"),
            r#"{"model_name":"m","model_version":"3","id":"r1","outputs":[{"name":"y","datatype":"FP32","shape":[1,2],"data":[0.25,-1.0]},{"name":"b","datatype":"BOOL","shape":[1],"data":[true]}]}"#
        );
    }

    #[test]
    fn binary_response_layout() {
        let outputs = [
            Tensor::from_f32("y", vec![2], &[0.25, f32::NAN]),
            Tensor::from_i64("n", vec![], &[7]),
        ];
        let encoded =
            encode_response("m", None, None, &outputs, |name| name == "y").expect("valid");
        let header = r#"{"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}},{"name":"n","datatype":"INT64","shape":[],"data":[7]}]}"#;
        assert_eq!(encoded.header_len, Some(header.len()));
        assert_eq!(&encoded.body[..header.len()], header.as_bytes());
        assert_eq!(&encoded.body[header.len()..], &outputs[0].data[..]);
        let back = decode_response(&encoded.body, encoded.header_len).expect("decodes");
        assert_eq!(back.outputs[0].data, outputs[0].data);
        assert_eq!(back.outputs[1], outputs[1]);
    }

    #[test]
    fn response_errors() {
        let nan = [Tensor::from_f32("y", vec![1], &[f32::INFINITY])];
        let err = encode_response("m", None, None, &nan, |_| false).expect_err("inf");
        assert!(matches!(err, V2Error::NotJsonRepresentable { .. }) && err.status() == 400);
        let broken = [Tensor::new("y", Datatype::Fp32, vec![2], vec![0; 4])];
        let err = encode_response("m", None, None, &broken, |_| true).expect_err("short data");
        assert_eq!(err.status(), 500);
        assert_eq!(
            err.to_string(),
            "output 'y' is inconsistent: shape [2] of FP32 needs 8 bytes of data but there are 4"
        );
        assert!(decode_response(br#"{"outputs": []}"#, None).is_err());
        assert!(decode_response(br#"{"model_name": "m"}"#, None).is_err());
    }
}
