//! Inference requests: [`decode_request`] on the server, [`encode_request`] for clients (tests,
//! and a node forwarding a request to another). Request-level `binary_data_output` and each
//! requested output's `binary_data` are resolved into [`RequestedOutput::binary`].

use super::body::{
    BinarySection, WireTensor, WriteTensor, assemble, parse, read_tensors, split_body,
    write_tensors,
};
use super::{EncodedBody, InferRequest, RequestedOutput, Result, Role, V2Error};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// The per-output parameter asking for binary tensor data.
const BINARY_DATA: &str = "binary_data";
/// The request parameter asking for every output as binary tensor data.
const BINARY_DATA_OUTPUT: &str = "binary_data_output";
/// A requested output's parameter: answer with its top this-many classes.
const CLASSIFICATION: &str = "classification";

/// Decodes an inference request. `header_len` is the value of the `Inference-Header-Content-Length`
/// header: the length of the JSON part, with binary tensor data after it; `None` means the whole
/// body is JSON.
pub fn decode_request(body: &[u8], header_len: Option<usize>) -> Result<InferRequest> {
    let (json, binary) = split_body(body, header_len)?;
    decode_parts(
        json,
        header_len,
        BinarySection::new(binary, header_len.is_some()),
    )
}

/// Decodes a request whose JSON part and binary tensor data were read into buffers of their
/// own (`Inference-Header-Content-Length` said where the first ends). A binary input that is
/// all of `binary` takes it without a copy.
pub fn decode_request_split(json: &[u8], binary: Vec<u8>) -> Result<InferRequest> {
    decode_parts(json, Some(json.len()), BinarySection::owned(binary))
}

fn decode_parts(
    json: &[u8],
    header_len: Option<usize>,
    mut section: BinarySection<'_>,
) -> Result<InferRequest> {
    let wire: WireRequest<'_> = parse(json, header_len, "request")?;
    let mut parameters = wire.parameters.unwrap_or_default();
    let binary_data_output = match parameters.remove(BINARY_DATA_OUTPUT) {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(V2Error::Malformed(format!(
                "parameters.{BINARY_DATA_OUTPUT} is {other}: it must be true or false"
            )));
        }
    };
    let Some(wire_inputs) = wire.inputs else {
        return Err(V2Error::Malformed(
            "the request has no `inputs`: send \
             {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]}"
                .into(),
        ));
    };
    let inputs = read_tensors(wire_inputs, Role::Input, &mut section)?;
    section.finish()?;
    let outputs = read_requested_outputs(wire.outputs.unwrap_or_default(), binary_data_output)?;
    Ok(InferRequest {
        id: wire.id,
        parameters,
        inputs,
        outputs,
        binary_data_output,
    })
}

/// Encodes a request (the client side of [`decode_request`]). `binary_input(name)` says whether
/// the input `name` goes as binary tensor data. Requested outputs always carry an explicit
/// `binary_data` parameter; `binary_data_output` is sent when true.
pub fn encode_request(
    request: &InferRequest,
    binary_input: impl Fn(&str) -> bool,
) -> Result<EncodedBody> {
    let flags: Vec<bool> = request
        .inputs
        .iter()
        .map(|t| binary_input(&t.name))
        .collect();
    let inputs = write_tensors(&request.inputs, &flags, Role::Input)?;
    let mut parameters = request.parameters.clone();
    if request.binary_data_output {
        parameters.insert(BINARY_DATA_OUTPUT.into(), Value::Bool(true));
    }
    let outputs = request
        .outputs
        .iter()
        .map(|o| WriteRequestedOutput {
            name: &o.name,
            parameters: BinaryFlag {
                binary_data: o.binary,
                classification: o.classification,
            },
        })
        .collect();
    let wire = WriteRequest {
        id: request.id.as_ref(),
        parameters,
        inputs,
        outputs,
    };
    assemble(&wire, &request.inputs, &flags)
}

#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default, borrow)]
    inputs: Option<Vec<WireTensor<'a>>>,
    #[serde(default)]
    outputs: Option<Vec<WireRequestedOutput>>,
}

#[derive(Deserialize)]
struct WireRequestedOutput {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn read_requested_outputs(
    wire: Vec<WireRequestedOutput>,
    binary_data_output: bool,
) -> Result<Vec<RequestedOutput>> {
    let mut seen = HashSet::with_capacity(wire.len());
    let mut outputs = Vec::with_capacity(wire.len());
    for (index, w) in wire.into_iter().enumerate() {
        let name = w
            .name
            .ok_or_else(|| V2Error::Malformed(format!("requested output {index} has no `name`")))?;
        let parameters = w.parameters.unwrap_or_default();
        let err = |reason: &str| V2Error::tensor(Role::Output, &name, reason);
        let classification = match parameters.get(CLASSIFICATION) {
            None => None,
            Some(v) => Some(crate::classify::count(v.as_u64(), &name)?),
        };
        if parameters.contains_key("shared_memory_region") {
            return Err(err(
                "shared memory is not supported: leave the output in the body",
            ));
        }
        let binary = match parameters.get(BINARY_DATA) {
            None => binary_data_output,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(err("parameters.binary_data must be true or false")),
        };
        if !seen.insert(name.clone()) {
            return Err(V2Error::Duplicate {
                role: Role::Output,
                name,
            });
        }
        outputs.push(RequestedOutput {
            name,
            binary,
            classification,
        });
    }
    Ok(outputs)
}

#[derive(Serialize)]
struct WriteRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    parameters: Map<String, Value>,
    inputs: Vec<WriteTensor<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    outputs: Vec<WriteRequestedOutput<'a>>,
}

#[derive(Serialize)]
struct WriteRequestedOutput<'a> {
    name: &'a str,
    parameters: BinaryFlag,
}

#[derive(Serialize)]
struct BinaryFlag {
    binary_data: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    classification: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    fn decode(json: &str) -> Result<InferRequest> {
        decode_request(json.as_bytes(), None)
    }

    fn refused(json: &str) -> String {
        decode(json).expect_err("should be refused").to_string()
    }

    /// A JSON header followed by binary data, as tritonclient sends it.
    fn with_binary(json: &str, binary: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(binary);
        (body, Some(json.len()))
    }

    /// Decodes a body both ways: whole, and split into its JSON part and an owned binary part.
    fn both_ways(json: &str, binary: &[u8]) -> (Result<InferRequest>, Result<InferRequest>) {
        let (body, header_len) = with_binary(json, binary);
        (
            decode_request(&body, header_len),
            decode_request_split(json.as_bytes(), binary.to_vec()),
        )
    }

    #[test]
    fn a_split_body_decodes_as_the_whole_body_does() {
        let one = r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                        "parameters": {"binary_data_size": 8}}]}"#;
        let two = r#"{"inputs": [
                        {"name": "a", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": 4}},
                        {"name": "j", "shape": [1], "datatype": "INT32", "data": [7]},
                        {"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]}"#;
        let empty = r#"{"inputs": [{"name": "e", "shape": [0], "datatype": "FP32",
                          "parameters": {"binary_data_size": 0}},
                        {"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}"#;
        let floats: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (one, floats.clone()),
            (two, [5i32.to_le_bytes().as_slice(), &[1, 0]].concat()),
            (empty, 3f32.to_le_bytes().to_vec()),
            // Refused both ways, with the same words: too few bytes, bytes left over, a BOOL
            // byte that is not 0 or 1, a size that does not fit the shape.
            (one, floats[..6].to_vec()),
            (one, [floats.as_slice(), &[0]].concat()),
            (two, [5i32.to_le_bytes().as_slice(), &[1, 2]].concat()),
            (
                r#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32",
                     "parameters": {"binary_data_size": 8}}]}"#,
                floats.clone(),
            ),
        ];
        for (json, binary) in cases {
            let (whole, split) = both_ways(json, &binary);
            match (whole, split) {
                (Ok(w), Ok(s)) => assert_eq!(w.inputs, s.inputs),
                (Err(w), Err(s)) => assert_eq!(w.to_string(), s.to_string()),
                (w, s) => panic!("{json}: whole {w:?}, split {s:?}"),
            }
        }
        let (_, split) = both_ways(one, &floats);
        assert_eq!(
            split.expect("valid").inputs[0],
            Tensor::from_f32("x", vec![2], &[1.5, -2.0])
        );
    }

    #[test]
    fn json_request_with_everything() {
        let req = decode(
            r#"{"id": "r1", "parameters": {"priority": 2, "binary_data_output": true},
                "inputs": [
                  {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]},
                  {"name": "s", "shape": [], "datatype": "BYTES", "data": "hi"}
                ],
                "outputs": [{"name": "y"}, {"name": "z", "parameters": {"binary_data": false}}]}"#,
        )
        .expect("valid request");
        assert_eq!(req.id, Some(Value::from("r1")));
        assert_eq!(req.parameters.get("priority"), Some(&Value::from(2)));
        assert!(!req.parameters.contains_key(BINARY_DATA_OUTPUT));
        assert!(req.binary_data_output);
        assert_eq!(
            req.inputs[0],
            Tensor::from_f32("x", vec![2, 2], &[1.0, 2.0, 3.0, 4.5])
        );
        assert_eq!(
            req.inputs[1],
            Tensor::from_bytes_elements("s", vec![], &["hi"]).expect("small")
        );
        assert_eq!(
            req.outputs,
            vec![
                RequestedOutput {
                    name: "y".into(),
                    binary: true,
                    classification: None,
                },
                RequestedOutput {
                    name: "z".into(),
                    binary: false,
                    classification: None,
                },
            ]
        );
        assert!(req.wants_binary("y") && !req.wants_binary("z") && req.wants_binary("other"));
        assert!(req.wants_output("y") && !req.wants_output("other"));
    }

    #[test]
    fn numeric_id_is_kept_as_given() {
        let req = decode(r#"{"id": 42, "inputs": []}"#).expect("valid");
        assert_eq!(req.id, Some(Value::from(42)));
        assert!(
            req.outputs.is_empty() && req.wants_output("anything") && !req.wants_binary("anything")
        );
    }

    #[test]
    fn tritonclient_binary_request() {
        let json = r#"{"inputs":[{"name":"INPUT0","shape":[1,2],"datatype":"INT32","parameters":{"binary_data_size":8}},{"name":"INPUT1","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":7}}],"parameters":{"binary_data_output":true}}"#;
        let mut binary = Vec::new();
        binary.extend_from_slice(&7i32.to_le_bytes());
        binary.extend_from_slice(&(-1i32).to_le_bytes());
        binary.extend_from_slice(b"\x03\0\0\0abc");
        let (body, header_len) = with_binary(json, &binary);
        let req = decode_request(&body, header_len).expect("valid");
        assert_eq!(req.inputs[0].data, binary[..8]);
        assert_eq!(
            req.inputs[1].bytes_elements().expect("framed"),
            vec![b"abc"]
        );
        assert!(req.binary_data_output && req.wants_binary("OUTPUT0"));
    }

    #[test]
    fn mixed_binary_and_json_inputs() {
        let json = r#"{"inputs":[
            {"name":"a","shape":[2],"datatype":"UINT16","parameters":{"binary_data_size":4}},
            {"name":"b","shape":[1],"datatype":"INT8","data":[-5]},
            {"name":"c","shape":[1],"datatype":"BOOL","data":null,"parameters":{"binary_data_size":1}}]}"#;
        let (body, header_len) = with_binary(json, &[1, 0, 2, 0, 1]);
        let req = decode_request(&body, header_len).expect("valid");
        assert_eq!(req.inputs[0].data, [1, 0, 2, 0]);
        assert_eq!(req.inputs[1].data, [0xfb]);
        assert_eq!(req.inputs[2].data, [1]);
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            refused(r#"{"id": "x"}"#),
            "malformed body: the request has no `inputs`: send {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}]}"
        );
        assert!(refused("{").contains("is not valid V2 JSON"));
        assert!(refused(r#"{"inputs": 3}"#).contains("is not valid V2 JSON"));
        assert!(
            refused(r#"{"inputs": []} trailing"#)
                .contains("needs the Inference-Header-Content-Length header")
        );
        assert_eq!(
            refused(r#"{"inputs": [{"shape": [1]}]}"#),
            "malformed body: input 0 has no `name`"
        );
        assert_eq!(
            refused(r#"{"inputs": [], "parameters": {"binary_data_output": "yes"}}"#),
            "malformed body: parameters.binary_data_output is \"yes\": it must be true or false"
        );
    }

    #[test]
    fn tensor_header_errors() {
        assert_eq!(
            refused(
                r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}"#
            ),
            "input 'x': unknown datatype `FLOAT`: expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BF16, BYTES"
        );
        assert!(
            refused(r#"{"inputs": [{"name": "x", "shape": [1], "data": [1]}]}"#)
                .starts_with("input 'x': no `datatype`")
        );
        assert!(
            refused(r#"{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}"#)
                .starts_with("input 'x': no `shape`")
        );
        assert_eq!(
            refused(
                r#"{"inputs": [{"name": "x", "shape": [2, -1], "datatype": "FP32", "data": [1]}]}"#
            ),
            "input 'x': shape dimension 1 is -1: dimensions must be 0 or more"
        );
        assert_eq!(
            refused(
                r#"{"inputs": [{"name": "x", "shape": [1.5], "datatype": "FP32", "data": [1]}]}"#
            ),
            "input 'x': shape dimension 0 is 1.5: dimensions must be whole numbers"
        );
        assert_eq!(
            refused(
                r#"{"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "datatype": "FP32", "data": [1]}]}"#
            ),
            "input 'x': shape [4294967296, 4294967296] has more elements than fit in 64 bits"
        );
        assert_eq!(
            refused(
                r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                               {"name": "x", "shape": [1], "datatype": "FP32", "data": [2]}]}"#
            ),
            "input 'x' appears more than once: send each input once"
        );
        assert_eq!(
            refused(
                r#"{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]}"#
            ),
            "input 'x': shape [2, 2] needs 4 elements but data has 3"
        );
        assert_eq!(
            refused(r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}"#),
            "input 'x': no data: send `data` or parameters.binary_data_size with binary tensor data"
        );
        assert!(
            refused(r#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]}"#)
                .contains("shared memory is not supported")
        );
    }

    #[test]
    fn requested_output_errors() {
        for bad in ["0", "-1", "2.5", "\"3\"", "4294967296"] {
            let body = format!(
                r#"{{"inputs": [], "outputs": [{{"name": "y", "parameters": {{"classification": {bad}}}}}]}}"#
            );
            assert!(
                refused(&body).contains(
                    "output 'y': parameters.classification must be a count of classes above zero"
                ),
                "{bad}: {}",
                refused(&body)
            );
        }
        let req = decode(
            r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}"#,
        )
        .expect("a classification request");
        assert_eq!(req.outputs[0].classification, Some(3));
        assert_eq!(
            refused(r#"{"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}"#),
            "output 'y' appears more than once: send each output once"
        );
        assert!(
            refused(
                r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}"#
            )
            .contains("must be true or false")
        );
        assert_eq!(
            refused(r#"{"inputs": [], "outputs": [{}]}"#),
            "malformed body: requested output 0 has no `name`"
        );
    }

    #[test]
    fn binary_section_errors() {
        let one = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let (body, _) = with_binary(one, &[0; 8]);
        let err = decode_request(&body, None)
            .expect_err("no header")
            .to_string();
        assert!(
            err.contains("needs the Inference-Header-Content-Length header"),
            "{err}"
        );
        let err = decode_request(one.as_bytes(), None)
            .expect_err("no header")
            .to_string();
        assert_eq!(
            err,
            "input 'x': parameters.binary_data_size is set but the body has no \
             Inference-Header-Content-Length header: send it with the length of the JSON part"
        );
        let err = decode_request(&body, Some(body.len() + 1))
            .expect_err("too long")
            .to_string();
        assert!(
            err.starts_with(&format!(
                "binary tensor data: Inference-Header-Content-Length is {} but the body has only {} bytes",
                body.len() + 1,
                body.len()
            )),
            "{err}"
        );

        let (body, header_len) = with_binary(one, &[0; 12]);
        let err = decode_request(&body, header_len)
            .expect_err("left over")
            .to_string();
        assert!(
            err.starts_with("binary tensor data: 4 bytes are left over after the 8 bytes"),
            "{err}"
        );

        let (body, header_len) = with_binary(one, &[0; 6]);
        let err = decode_request(&body, header_len)
            .expect_err("missing")
            .to_string();
        assert!(
            err.starts_with("binary tensor data: input 'x' needs 8 bytes but only 6 remain"),
            "{err}"
        );

        let sized = |size: u64, shape: &str, dt: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{dt}","parameters":{{"binary_data_size":{size}}}}}]}}"#
            )
        };
        let json = sized(4, "[2]", "FP32");
        let (body, header_len) = with_binary(&json, &[0; 4]);
        let err = decode_request(&body, header_len)
            .expect_err("short")
            .to_string();
        assert_eq!(
            err,
            "input 'x': shape [2] of FP32 needs 8 bytes of data but there are 4"
        );

        // A huge declared shape with a few bytes fails before anything is allocated for it.
        let json = sized(4, "[1000000, 1000000]", "FP32");
        let (body, header_len) = with_binary(&json, &[0; 4]);
        assert!(decode_request(&body, header_len).is_err());

        let json = sized(2, "[2]", "BOOL");
        let (body, header_len) = with_binary(&json, &[1, 2]);
        let err = decode_request(&body, header_len)
            .expect_err("bool 2")
            .to_string();
        assert_eq!(
            err,
            "input 'x': BOOL element 1 is the byte 2: BOOL bytes must be 0 or 1"
        );

        let json = sized(5, "[1]", "BYTES");
        let (body, header_len) = with_binary(&json, b"\x09\0\0\0a");
        let err = decode_request(&body, header_len)
            .expect_err("bad framing")
            .to_string();
        assert!(err.contains("element 0 is truncated"), "{err}");

        let json = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}]}"#;
        let (body, header_len) = with_binary(json, &[0; 4]);
        let err = decode_request(&body, header_len)
            .expect_err("both")
            .to_string();
        assert_eq!(
            err,
            "input 'x': has both `data` and parameters.binary_data_size: send one of them"
        );
    }

    #[test]
    fn request_encoding_refuses_what_json_cannot_carry() {
        let req = InferRequest {
            id: None,
            parameters: Map::new(),
            inputs: vec![Tensor::from_f32("x", vec![1], &[f32::NAN])],
            outputs: vec![],
            binary_data_output: false,
        };
        let err = encode_request(&req, |_| false).expect_err("NaN as JSON");
        assert!(
            err.to_string().contains("send it as binary tensor data"),
            "{err}"
        );
        let encoded = encode_request(&req, |_| true).expect("NaN as binary");
        let back = decode_request(&encoded.body, encoded.header_len).expect("decodes");
        assert_eq!(back, req);
    }
}
