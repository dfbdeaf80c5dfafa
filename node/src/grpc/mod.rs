//! The KServe V2 / Triton gRPC endpoint: `inference.GRPCInferenceService` (from
//! `node/proto/inference.proto`, wire-compatible with Triton's), served by tonic beside HTTP.
//!
//! It shares everything after decoding with HTTP: the model lookup, validation against the
//! manifest, admission, the sandbox call, statistics and metrics ([`crate::http::execute`] and
//! [`crate::http::observed`]). Errors map to status codes as Triton maps them: a bad request is
//! `INVALID_ARGUMENT`, an unknown model `NOT_FOUND`, a model or node that cannot take it now
//! `UNAVAILABLE`, a request over the size limits `RESOURCE_EXHAUSTED`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::Value;
use sophon_sdk::Datatype;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::http::{ApiError, ApiState, Outcome};
use crate::repository::LoadedModel;
use crate::v2;

pub mod answers;
pub mod inflate;
mod weigh;

/// The code generated from `node/proto/inference.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// The gRPC service over a node's shared state.
pub struct Grpc {
    state: Arc<ApiState>,
}

/// The tonic service to serve, with the node's size limit on messages.
pub fn service(state: Arc<ApiState>) -> GrpcInferenceServiceServer<Grpc> {
    let limit = state.config.max_body_bytes;
    // Compressed requests are read (tritonclient's `compression_algorithm`); answers go
    // uncompressed, as Triton's do by default. `serve` inflates gzip and deflate messages itself
    // before tonic sees them ([`inflate`]), counted against the bytes in flight; tonic's own
    // decompression stays on for a service served without that layer.
    GrpcInferenceServiceServer::new(Grpc { state })
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Deflate)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
}

/// How many of one stream's requests run at once (`ModelStreamInfer`); further ones are read
/// as earlier ones are answered.
pub const STREAM_WINDOW: usize = 32;

/// A stream's answer on its way to the client, shared with the stream's task so that a
/// client that takes none in time has them dropped.
type Slot = Arc<std::sync::Mutex<Option<Waiting>>>;

/// A stream's answer waiting for the client, its bytes counted in the node's bytes in flight
/// until it is taken or dropped.
struct Waiting {
    answer: Option<Result<pb::ModelStreamInferResponse, Status>>,
    state: Arc<ApiState>,
    held: usize,
}

impl Waiting {
    /// `answer`, counted; when the bytes in flight have no room for it, the request's answer
    /// is that error instead (as a new request would be refused).
    fn count(state: &Arc<ApiState>, answer: pb::ModelStreamInferResponse) -> Waiting {
        use prost::Message as _;
        // As tonic frames it: the body's count takes over from this one (`answers`).
        let n = answer.encoded_len() + 5;
        if inflate::acquire(state, n) {
            return Waiting {
                answer: Some(Ok(answer)),
                state: state.clone(),
                held: n,
            };
        }
        let refused = pb::ModelStreamInferResponse {
            error_message: no_room(state),
            infer_response: answer
                .infer_response
                .as_ref()
                .map(|r| named(&r.model_name, &r.model_version, &r.id)),
        };
        Waiting {
            answer: Some(Ok(refused)),
            state: state.clone(),
            held: 0,
        }
    }

    /// An answer not counted: an error, small.
    fn uncounted(
        state: &Arc<ApiState>,
        answer: Result<pb::ModelStreamInferResponse, Status>,
    ) -> Waiting {
        Waiting {
            answer: Some(answer),
            state: state.clone(),
            held: 0,
        }
    }

    fn into_answer(mut self) -> Result<pb::ModelStreamInferResponse, Status> {
        self.answer.take().expect("taken once")
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.state.inflight_bytes.add_permits(self.held);
    }
}

/// One stream request's task: its answer when it ends, and aborted when dropped unanswered (the
/// client went away).
struct Running(
    tokio::task::JoinHandle<Result<Waiting, Status>>,
    Arc<ApiState>,
    /// The answer to name in an error answer (shared with the task: one copy per request).
    Option<Arc<pb::ModelInferResponse>>,
);

impl std::future::Future for Running {
    type Output = Result<Waiting, Status>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        // A request whose task failed is answered with its error, and the stream goes on.
        let Running(task, state, named) = &mut *self;
        std::pin::Pin::new(task).poll(cx).map(|joined| {
            joined.unwrap_or_else(|e| {
                let failed = pb::ModelStreamInferResponse {
                    // A panic's message is whatever the panic said.
                    error_message: crate::http::clipped(format!("the request failed: {e}")),
                    infer_response: named.take().map(Arc::unwrap_or_clone),
                };
                Ok(Waiting::uncounted(state, Ok(failed)))
            })
        })
    }
}

/// An empty answer naming `request` (its model, version and id), for a stream's error answer.
fn named_after(request: &pb::ModelInferRequest) -> pb::ModelInferResponse {
    named(&request.model_name, &request.model_version, &request.id)
}

/// An empty answer with these names, each cut to [`crate::http::MESSAGE_LIMIT`] bytes: it is
/// held uncounted while its request runs, and an id of megabytes is cut as an error message
/// naming it would be.
fn named(model_name: &str, model_version: &str, id: &str) -> pb::ModelInferResponse {
    let short = |s: &str| s[..s.floor_char_boundary(crate::http::MESSAGE_LIMIT)].to_string();
    pb::ModelInferResponse {
        model_name: short(model_name),
        model_version: short(model_version),
        id: short(id),
        ..Default::default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a gRPC connection may be silent before the node pings it.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the node waits for a ping's answer before it closes the connection.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Streams one gRPC connection may have open at once (hyper's own default, which tonic lifts).
const MAX_STREAMS: u32 = 200;

/// Serve gRPC (and `grpc.health.v1`) on `listener` until `shutdown` resolves.
pub async fn serve(
    state: Arc<ApiState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<GrpcInferenceServiceServer<Grpc>>()
        .await;
    // Connections hold the node's connection slots (shared with HTTP), and one that does not
    // open HTTP/2 within the header timeout is closed. `Slots::accept` sets TCP_NODELAY: without
    // it a unary call's response waited on the peer's delayed ACK (perf_analyzer saw 115
    // infer/s).
    let slots = state.connections.clone();
    let (opening, sending) = (state.config.header_timeout, state.config.body_timeout);
    // Each connection's answers waiting on the client, swept for one that waits too long.
    let watches = Arc::new(answers::Watches::default());
    tokio::spawn(answers::Watches::sweep_every(
        Arc::downgrade(&watches),
        sending,
    ));
    let incoming = futures_util::stream::unfold(
        (listener, slots, watches),
        move |(listener, slots, watches)| async move {
            let (tcp, slot) = slots.accept(&listener, crate::serve::Protocol::Http2).await;
            let conn = crate::serve::Conn::new(tcp, slot, sending)
                .opening_http2(opening)
                .watched(watches.watch());
            Some((Ok::<_, std::io::Error>(conn), (listener, slots, watches)))
        },
    );
    let counted = state.clone();
    let answered = state.clone();
    tonic::transport::Server::builder()
        // Request messages count against the node's bytes in flight as they arrive, and
        // compressed ones are inflated by the node, counted too.
        .layer(tower::layer::layer_fn(move |inner| {
            inflate::Inflating::new(inner, counted.clone())
        }))
        // Answers count against the bytes in flight until the client takes them, and a
        // connection whose client takes nothing of its answers within the body timeout is
        // closed.
        .layer(tower::layer::layer_fn(move |inner| {
            answers::Answering::new(inner, answered.clone())
        }))
        // An open channel that stops answering pings (a client that stopped reading, or is
        // gone) is closed, and its slot freed.
        .http2_keepalive_interval(Some(KEEPALIVE))
        // tonic lifts hyper's cap on a connection's concurrent streams unless it is set: each
        // stream may hold a message and its answer.
        .max_concurrent_streams(Some(MAX_STREAMS))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(service(state))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// What a request that finds no room in the node's bytes in flight is told.
fn no_room(state: &ApiState) -> String {
    format!(
        "the node is holding its limit of {} bytes of requests in flight; retry later",
        state.config.max_inflight_bytes
    )
}

fn status(e: &ApiError) -> Status {
    let message = crate::http::clipped(e.message.clone());
    match e.status {
        StatusCode::BAD_REQUEST => Status::invalid_argument(message),
        StatusCode::NOT_FOUND => Status::not_found(message),
        StatusCode::PAYLOAD_TOO_LARGE => Status::resource_exhausted(message),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            Status::unavailable(message)
        }
        StatusCode::GATEWAY_TIMEOUT => Status::deadline_exceeded(message),
        _ => Status::internal(message),
    }
}

fn bad(message: impl Into<String>) -> Outcome {
    (
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        },
        "bad_request",
    )
}

impl tonic::transport::server::Connected for crate::serve::Conn {
    type ConnectInfo = answers::ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        answers::ConnInfo {
            tcp: self.tcp().connect_info(),
            watch: self.watch().cloned(),
        }
    }
}

impl Grpc {
    fn model(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, Status> {
        let mut p = HashMap::from([("model".to_string(), name.to_string())]);
        if !version.is_empty() {
            p.insert("version".to_string(), version.to_string());
        }
        crate::http::lookup(&self.state, &p).map_err(|e| status(&e))
    }

    async fn infer(
        &self,
        mut request: pb::ModelInferRequest,
    ) -> Result<pb::ModelInferResponse, Status> {
        // The request counts against the node's bytes in flight from here until it is answered
        // (here or forwarded), at what it takes in memory, not on the wire (`held_bytes`).
        let held = u32::try_from(held_bytes(&request))
            .ok()
            .and_then(|n| self.state.inflight_bytes.try_acquire_many(n).ok());
        let Some(_held) = held else {
            // Refused as HTTP refuses a body with no room: in the model's figures too.
            if let Ok(model) = self.model(&request.model_name, &request.model_version) {
                let refused = async {
                    Err::<(), _>((
                        ApiError {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            message: no_room(&self.state),
                        },
                        "overloaded",
                    ))
                };
                let _ = crate::http::observed(&model, refused).await;
            }
            return Err(Status::unavailable(no_room(&self.state)));
        };
        // An autoscaled deployment with no ready replica is activated first (as for HTTP).
        if let Some(router) = self.state.mesh.get() {
            let version = (!request.model_version.is_empty()).then_some(&request.model_version);
            if self
                .model(&request.model_name, &request.model_version)
                .is_err()
                && let Some(dormant) =
                    router.dormant(&request.model_name, version.map(|v| v.as_str()))
                && router.activate(dormant, &request.model_name).await.is_err()
            {
                return Err(Status::unavailable(format!(
                    "model `{}` has no ready replica and did not activate in time; retry later",
                    request.model_name
                )));
            }
        }
        // A request that names no version goes where the mesh routes the model (as HTTP's).
        if request.model_version.is_empty()
            && let Some(router) = self.state.mesh.get()
            && let Some(v) = router.version_for(&request.model_name)
        {
            request.model_version = v;
            // A mirrored canary gets a copy at its weight, as HTTP's requests do.
            if let Some(shadow) = router.mirror_for(&request.model_name) {
                self.mirror(router, &request, shadow);
            }
        }
        let mut found = self.model(&request.model_name, &request.model_version);
        if found.is_err()
            && let Some(router) = self.state.mesh.get()
        {
            let version = (!request.model_version.is_empty()).then_some(&request.model_version);
            if router
                .reload_evicted(&request.model_name, version.map(|v| v.as_str()))
                .await
            {
                found = self.model(&request.model_name, &request.model_version);
            }
        }
        let model = match found {
            Ok(model) => model,
            Err(not_here) => {
                // On a mesh node, a model with a ready replica elsewhere is served there, as
                // HTTP's requests are.
                let version = (!request.model_version.is_empty()).then_some(&request.model_version);
                return match self.state.mesh.get() {
                    Some(router)
                        if router.knows(&request.model_name, version.map(|v| v.as_str())) =>
                    {
                        self.forward(router, request).await
                    }
                    _ => Err(not_here),
                };
            }
        };
        let state = &self.state;
        let run = async {
            let decoded = decode(request)?;
            let answer = crate::http::execute(state, &model, decoded).await?;
            let response = encode(&model, &answer);
            answer.record(&model);
            Ok(response)
        };
        crate::http::observed(&model, run)
            .await
            .map_err(|e| status(&e))
    }
}

/// The headers of a V2 body made by `v2::encode_request`: binary when it has a JSON header of
/// `header_len` bytes followed by raw tensors.
fn binary_headers(header_len: Option<usize>) -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    if let Some(n) = header_len {
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(v2::HEADER_CONTENT_LENGTH, axum::http::HeaderValue::from(n));
    }
    headers
}

impl Grpc {
    /// Send a copy of `request` to `version` (a mirrored canary), here or through the mesh, and
    /// drop its answer. A request that cannot be encoded is not copied.
    fn mirror(
        &self,
        router: &Arc<crate::mesh::router::Router>,
        request: &pb::ModelInferRequest,
        version: String,
    ) {
        let Ok(decoded) = decode(request.clone()) else {
            return;
        };
        let Ok(encoded) = v2::encode_request(&decoded, |_| true) else {
            return;
        };
        let headers = binary_headers(encoded.header_len);
        let name = request.model_name.clone();
        let path = format!("/v2/models/{name}/versions/{version}/infer");
        crate::http::mirror(
            self.state.clone(),
            router.clone(),
            name,
            path,
            version,
            headers,
            bytes::Bytes::from(encoded.body),
        );
    }

    /// Serve a request on a node with a replica, through the mesh's router: the request goes as
    /// a V2 binary body, as an HTTP one would, and the answer comes back as this protocol's.
    async fn forward(
        &self,
        router: &crate::mesh::router::Router,
        request: pb::ModelInferRequest,
    ) -> Result<pb::ModelInferResponse, Status> {
        let name = request.model_name.clone();
        let version = (!request.model_version.is_empty()).then(|| request.model_version.clone());
        let decoded = decode(request).map_err(|(e, _)| status(&e))?;
        let encoded = v2::encode_request(&decoded, |_| true)
            .map_err(|e| Status::invalid_argument(crate::http::clipped(e.to_string())))?;
        drop(decoded);
        // The request stays counted in flight by its caller (`infer`) until it is answered: its
        // count covers this encoding (raw bytes of at most what the typed contents took).
        let headers = binary_headers(encoded.header_len);
        let path = match &version {
            Some(v) => format!("/v2/models/{name}/versions/{v}/infer"),
            None => format!("/v2/models/{name}/infer"),
        };
        let response = router
            .forward(
                &name,
                version.as_deref(),
                "POST",
                &path,
                &headers,
                bytes::Bytes::from(encoded.body),
            )
            .await;
        let code = response.status();
        let header_len = response
            .headers()
            .get(v2::HEADER_CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let body = axum::body::to_bytes(response.into_body(), router.max_body_bytes)
            .await
            .map_err(|e| {
                Status::unavailable(format!("the serving node's answer broke off: {e}"))
            })?;
        if !code.is_success() {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(status(&ApiError {
                status: code,
                message,
            }));
        }
        let answer = v2::decode_response(&body, header_len)
            .map_err(|e| Status::internal(format!("the serving node's answer is not V2: {e}")))?;
        let mut response = pb::ModelInferResponse {
            model_name: answer.model_name,
            model_version: answer.model_version.unwrap_or_default(),
            id: match answer.id {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            },
            ..Default::default()
        };
        for t in answer.outputs {
            response
                .outputs
                .push(pb::model_infer_response::InferOutputTensor {
                    name: t.name,
                    datatype: t.datatype.to_string(),
                    shape: t.shape.iter().map(|d| *d as i64).collect(),
                    ..Default::default()
                });
            response.raw_output_contents.push(t.data);
        }
        Ok(response)
    }
}

/// A gRPC infer request as the protocol-neutral request: tensors from `raw_input_contents`
/// (the V2 binary layout, BYTES elements with 4-byte length prefixes) or from typed `contents`.
/// What `request` takes in memory, counted in flight while it is served: its encoded size, plus
/// what prost made of it beyond that. Packed varints expand (a one-byte INT64 element is eight
/// bytes in memory, a one-byte INT32 four), and each input, output and BYTES element is a
/// struct or buffer of its own (two bytes on the wire, a header of 24 bytes or more in memory).
/// `weigh` bounds the same before the message is decoded.
fn held_bytes(request: &pb::ModelInferRequest) -> usize {
    // Vectors by their capacity (prost grows them by doubling), maps by their tables.
    fn vec<T>(v: &Vec<T>) -> usize {
        v.capacity() * std::mem::size_of::<T>()
    }
    fn map(m: &HashMap<String, pb::InferParameter>) -> usize {
        let buckets = (m.capacity() * 8 / 7).next_power_of_two();
        if m.capacity() == 0 {
            0
        } else {
            buckets * (std::mem::size_of::<(String, pb::InferParameter)>() + 1)
        }
    }
    let inputs: usize = request
        .inputs
        .iter()
        .map(|input| {
            vec(&input.shape)
                + map(&input.parameters)
                + input.contents.as_ref().map_or(0, |c| {
                    vec(&c.bool_contents)
                        + vec(&c.int_contents)
                        + vec(&c.int64_contents)
                        + vec(&c.uint_contents)
                        + vec(&c.uint64_contents)
                        + vec(&c.fp32_contents)
                        + vec(&c.fp64_contents)
                        + vec(&c.bytes_contents)
                        + c.bytes_contents.iter().map(Vec::capacity).sum::<usize>()
                })
        })
        .sum();
    let outputs: usize = request.outputs.iter().map(|o| map(&o.parameters)).sum();
    let structs = vec(&request.inputs)
        + vec(&request.outputs)
        + vec(&request.raw_input_contents)
        + map(&request.parameters);
    prost::Message::encoded_len(request)
        .saturating_add(structs)
        .saturating_add(inputs)
        .saturating_add(outputs)
}

fn decode(request: pb::ModelInferRequest) -> Result<v2::InferRequest, Outcome> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs: give one per input, or none",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let datatype: Datatype = input.datatype.parse().map_err(|_| {
            bad(format!(
                "input `{}` has an unknown datatype `{}`",
                input.name, input.datatype
            ))
        })?;
        let shape = input
            .shape
            .iter()
            .map(|d| u64::try_from(*d))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|_| bad(format!("input `{}` has a negative dimension", input.name)))?;
        let data = match (raw.next(), input.contents) {
            // As HTTP refuses `data` beside binary data (and Triton refuses both here).
            (Some(_), Some(c)) if c != pb::InferTensorContents::default() => {
                return Err(bad(format!(
                    "input `{}` has both raw_input_contents and typed contents: send one of them",
                    input.name
                )));
            }
            (Some(bytes), _) => bytes,
            (None, contents) => typed(&input.name, datatype, contents.unwrap_or_default())?,
        };
        if datatype == Datatype::Bool
            && let Some((index, byte)) = data.iter().enumerate().find(|(_, b)| **b > 1)
        {
            return Err(bad(format!(
                "input `{}`: BOOL element {index} is the byte {byte}: BOOL bytes must be 0 or 1",
                input.name
            )));
        }
        let tensor = v2::Tensor::new(input.name, datatype, shape, data);
        tensor
            .check_data(v2::Role::Input)
            .map_err(|e| bad(e.to_string()))?;
        inputs.push(tensor);
    }
    let id = (!request.id.is_empty()).then_some(Value::String(request.id));
    let outputs = request
        .outputs
        .into_iter()
        .map(|o| {
            let classification = classification(&o).map_err(bad)?;
            Ok(v2::RequestedOutput {
                name: o.name,
                binary: true,
                classification,
            })
        })
        .collect::<Result<_, Outcome>>()?;
    Ok(v2::InferRequest {
        id,
        parameters: Default::default(),
        inputs,
        outputs,
        binary_data_output: true,
    })
}

/// A requested output's `classification` parameter (Triton's classification extension): a count
/// of classes above zero, as an integer parameter of either sign.
fn classification(
    output: &pb::model_infer_request::InferRequestedOutputTensor,
) -> Result<Option<u32>, String> {
    use pb::infer_parameter::ParameterChoice;
    let Some(p) = output.parameters.get("classification") else {
        return Ok(None);
    };
    let k = match p.parameter_choice {
        Some(ParameterChoice::Int64Param(k)) => u64::try_from(k).ok(),
        Some(ParameterChoice::Uint64Param(k)) => Some(k),
        _ => None,
    };
    v2::classify::count(k, &output.name)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The bytes of a tensor given in typed `contents`, in its datatype's little-endian layout.
fn typed(name: &str, datatype: Datatype, c: pb::InferTensorContents) -> Result<Vec<u8>, Outcome> {
    let mismatch = || {
        bad(format!(
            "input `{name}` is {datatype} but its contents are in another field (or empty): \
             send it in raw_input_contents or the field of its type"
        ))
    };
    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|x| f(*x)).collect()
    }
    // Each value checked and narrowed as it is read: no widened copy of the whole field.
    let narrow = |v: &mut dyn ExactSizeIterator<Item = i64>,
                  min: i64,
                  max: i64,
                  width: usize|
     -> Result<Vec<u8>, Outcome> {
        let mut out = Vec::with_capacity(v.len() * width);
        for x in v {
            if x < min || x > max {
                return Err(bad(format!(
                    "input `{name}` holds {x}, outside the range of {datatype}"
                )));
            }
            out.extend_from_slice(&x.to_le_bytes()[..width]);
        }
        Ok(out)
    };
    // Values in a field of another type beside the tensor's own are a mistake, not padding.
    let fields = [
        !c.bool_contents.is_empty(),
        !c.int_contents.is_empty(),
        !c.int64_contents.is_empty(),
        !c.uint_contents.is_empty(),
        !c.uint64_contents.is_empty(),
        !c.fp32_contents.is_empty(),
        !c.fp64_contents.is_empty(),
        !c.bytes_contents.is_empty(),
    ];
    if fields.iter().filter(|f| **f).count() > 1 {
        return Err(bad(format!(
            "input `{name}` has contents in more than one typed field: send its values in the \
             field of its type ({datatype}) only"
        )));
    }
    let ints = || c.int_contents.iter().map(|x| i64::from(*x));
    let uints = || c.uint_contents.iter().map(|x| i64::from(*x));
    let (has_ints, has_uints) = (!c.int_contents.is_empty(), !c.uint_contents.is_empty());
    Ok(match datatype {
        Datatype::Bool if !c.bool_contents.is_empty() => {
            c.bool_contents.iter().map(|b| u8::from(*b)).collect()
        }
        Datatype::Int8 if has_ints => narrow(&mut ints(), i8::MIN.into(), i8::MAX.into(), 1)?,
        Datatype::Int16 if has_ints => narrow(&mut ints(), i16::MIN.into(), i16::MAX.into(), 2)?,
        Datatype::Int32 if has_ints => le(&c.int_contents, i32::to_le_bytes),
        Datatype::Int64 if !c.int64_contents.is_empty() => le(&c.int64_contents, i64::to_le_bytes),
        Datatype::Uint8 if has_uints => narrow(&mut uints(), 0, u8::MAX.into(), 1)?,
        Datatype::Uint16 if has_uints => narrow(&mut uints(), 0, u16::MAX.into(), 2)?,
        Datatype::Uint32 if has_uints => le(&c.uint_contents, u32::to_le_bytes),
        Datatype::Uint64 if !c.uint64_contents.is_empty() => {
            le(&c.uint64_contents, u64::to_le_bytes)
        }
        Datatype::Fp32 if !c.fp32_contents.is_empty() => le(&c.fp32_contents, f32::to_le_bytes),
        Datatype::Fp64 if !c.fp64_contents.is_empty() => le(&c.fp64_contents, f64::to_le_bytes),
        Datatype::Bytes if !c.bytes_contents.is_empty() => {
            let mut out = Vec::new();
            for element in &c.bytes_contents {
                let len = u32::try_from(element.len())
                    .map_err(|_| bad(format!("input `{name}` has an element over 4 GiB")))?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(element);
            }
            out
        }
        // An empty tensor has nothing in any field.
        _ if c == pb::InferTensorContents::default() => Vec::new(),
        _ => return Err(mismatch()),
    })
}

/// The answer as a gRPC response: every output in `raw_output_contents`, as Triton sends them.
fn encode(model: &LoadedModel, answer: &crate::http::Answer) -> pb::ModelInferResponse {
    let mut response = pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.clone(),
        id: match &answer.id {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
        ..Default::default()
    };
    for t in &answer.outputs {
        response
            .outputs
            .push(pb::model_infer_response::InferOutputTensor {
                name: t.name.clone(),
                datatype: t.datatype.to_string(),
                shape: t.shape.iter().map(|d| *d as i64).collect(),
                ..Default::default()
            });
        response.raw_output_contents.push(t.data.clone());
    }
    response
}

fn tensor_metadata(
    specs: &[sophon_sdk::TensorSpec],
) -> Vec<pb::model_metadata_response::TensorMetadata> {
    specs
        .iter()
        .map(|s| pb::model_metadata_response::TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.to_string(),
            shape: s.shape.clone(),
        })
        .collect()
}

fn duration(v: &Value) -> Option<pb::StatisticDuration> {
    Some(pb::StatisticDuration {
        count: v["count"].as_u64().unwrap_or(0),
        ns: v["ns"].as_u64().unwrap_or(0),
    })
}

/// A model's statistics, from the JSON that HTTP serves (one source for both).
fn statistics(json: &Value) -> pb::ModelStatistics {
    let s = &json["inference_stats"];
    pb::ModelStatistics {
        name: json["name"].as_str().unwrap_or_default().to_string(),
        version: json["version"].as_str().unwrap_or_default().to_string(),
        last_inference: json["last_inference"].as_u64().unwrap_or(0),
        inference_count: json["inference_count"].as_u64().unwrap_or(0),
        execution_count: json["execution_count"].as_u64().unwrap_or(0),
        inference_stats: Some(pb::InferStatistics {
            success: duration(&s["success"]),
            fail: duration(&s["fail"]),
            queue: duration(&s["queue"]),
            compute_input: duration(&s["compute_input"]),
            compute_infer: duration(&s["compute_infer"]),
            compute_output: duration(&s["compute_output"]),
            cache_hit: duration(&s["cache_hit"]),
            cache_miss: duration(&s["cache_miss"]),
        }),
        batch_stats: json["batch_stats"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| pb::InferBatchStatistics {
                batch_size: b["batch_size"].as_u64().unwrap_or(0),
                compute_input: duration(&b["compute_input"]),
                compute_infer: duration(&b["compute_infer"]),
                compute_output: duration(&b["compute_output"]),
            })
            .collect(),
        ..Default::default()
    }
}

/// A model's configuration, from the JSON that HTTP serves (one source for both).
fn config(json: &Value) -> pb::ModelConfig {
    let tensors = |list: &Value| {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let data_type = pb::DataType::from_str_name(t["data_type"].as_str().unwrap_or(""))
                    .unwrap_or(pb::DataType::TypeInvalid) as i32;
                let dims: Vec<i64> = t["dims"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_i64)
                    .collect();
                (
                    t["name"].as_str().unwrap_or_default().to_string(),
                    data_type,
                    dims,
                )
            })
            .collect::<Vec<_>>()
    };
    let group = &json["instance_group"][0];
    pb::ModelConfig {
        name: json["name"].as_str().unwrap_or_default().to_string(),
        platform: json["platform"].as_str().unwrap_or_default().to_string(),
        backend: json["backend"].as_str().unwrap_or_default().to_string(),
        max_batch_size: json["max_batch_size"].as_i64().unwrap_or(0) as i32,
        input: tensors(&json["input"])
            .into_iter()
            .map(|(name, data_type, dims)| pb::ModelInput {
                name,
                data_type,
                dims,
                ..Default::default()
            })
            .collect(),
        output: tensors(&json["output"])
            .into_iter()
            .zip(json["output"].as_array().into_iter().flatten())
            .map(|((name, data_type, dims), t)| pb::ModelOutput {
                name,
                data_type,
                dims,
                label_filename: t["label_filename"].as_str().unwrap_or_default().to_string(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: json.get("dynamic_batching").map(|b| {
            pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
                preferred_batch_size: b["preferred_batch_size"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_i64().map(|p| p as i32))
                    .collect(),
                max_queue_delay_microseconds: b["max_queue_delay_microseconds"]
                    .as_u64()
                    .unwrap_or(0),
                ..Default::default()
            })
        }),
        instance_group: vec![pb::ModelInstanceGroup {
            name: group["name"].as_str().unwrap_or_default().to_string(),
            kind: pb::model_instance_group::Kind::from_str_name(
                group["kind"].as_str().unwrap_or("KIND_CPU"),
            )
            .unwrap_or(pb::model_instance_group::Kind::Cpu) as i32,
            count: group["count"].as_i64().unwrap_or(1) as i32,
            ..Default::default()
        }],
        parameters: json["parameters"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelParameter {
                        string_value: v["string_value"].as_str().unwrap_or_default().to_string(),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

type InferStream =
    Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GrpcInferenceService for Grpc {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: crate::http::is_ready(&self.state),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self.model(&r.name, &r.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "sophon".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: crate::http::EXTENSIONS.map(str::to_string).to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let m = self.model(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: self.state.repo.versions(&m.name),
            platform: crate::http::triton_platform(&m).0.to_string(),
            inputs: tensor_metadata(m.inputs()),
            outputs: tensor_metadata(m.outputs()),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.infer(request.into_inner()).await.map(Response::new)
    }

    type ModelStreamInferStream = InferStream;

    /// Each request on the stream is answered on it, in order; a failed request is answered
    /// with its error and the stream goes on. Up to [`STREAM_WINDOW`] of a stream's requests run
    /// at once, as they would on as many unary calls: one stream of a model that takes a core
    /// per request would otherwise get one core.
    async fn model_stream_infer(
        &self,
        request: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let incoming = request.into_inner();
        let state = self.state.clone();
        let patience = state.config.body_timeout;
        // Answers wait here for the client to take them. Few: the window already holds up to
        // `STREAM_WINDOW` answers done ahead of an earlier one, and what a client that does not
        // read makes the node hold should stay near that. Each waiting answer counts against
        // the node's bytes in flight until the client's side takes it; a client that takes
        // none within `body_timeout` (one that grants no HTTP/2 window never blocks the node
        // on its socket, so the connection's send deadline never fires) has the stream ended,
        // and its answers are dropped.
        let (tx, rx) = tokio::sync::mpsc::channel::<Slot>(4);
        tokio::spawn(async move {
            // Each request runs in its own task: a guest call runs inside its future's poll,
            // so futures polled by one task would run one at a time.
            let counted = state.clone();
            let each = futures_util::StreamExt::map(incoming, move |next| {
                let this = Grpc {
                    state: state.clone(),
                };
                let running = this.state.clone();
                // An error answer names its request, as Triton's do, so that a client matching
                // answers by id knows which one failed.
                let named = next.as_ref().ok().map(|r| Arc::new(named_after(r)));
                let names = named.clone();
                Running(
                    tokio::spawn(async move {
                        let request = next?;
                        let answer = match this.infer(request).await {
                            Ok(response) => pb::ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(response),
                            },
                            Err(e) => pb::ModelStreamInferResponse {
                                error_message: crate::http::clipped(e.message().to_string()),
                                infer_response: names.as_deref().cloned(),
                            },
                        };
                        Ok(Waiting::count(&this.state, answer))
                    }),
                    running,
                    named,
                )
            });
            let mut answers = futures_util::StreamExt::buffered(each, STREAM_WINDOW);
            let mut sent: Vec<std::sync::Weak<std::sync::Mutex<Option<Waiting>>>> = Vec::new();
            loop {
                // A client that cancels the stream has its requests still running aborted now,
                // not when the first of them in order is done.
                let answer = tokio::select! {
                    answer = answers.next() => answer,
                    () = tx.closed() => None,
                };
                let Some(answer) = answer else { break };
                let broken = answer.is_err();
                let waiting = match answer {
                    Ok(waiting) => waiting,
                    Err(status) => Waiting::uncounted(&counted, Err(status)),
                };
                let slot = Arc::new(std::sync::Mutex::new(Some(waiting)));
                sent.retain(|s| s.strong_count() > 0);
                sent.push(Arc::downgrade(&slot));
                match tokio::time::timeout(patience, tx.send(slot)).await {
                    Ok(Ok(())) if !broken => {}
                    // The client went away (the requests still running are aborted), or the
                    // stream broke.
                    Ok(_) => break,
                    Err(_) => {
                        // The client took none of its answers in time: those waiting are
                        // dropped, and the stream ends when it next asks for one.
                        for slot in sent.iter().filter_map(std::sync::Weak::upgrade) {
                            slot.lock().map(|mut s| s.take()).ok();
                        }
                        break;
                    }
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |slot| {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            match taken {
                Some(waiting) => waiting.into_answer(),
                None => Err(Status::deadline_exceeded(format!(
                    "the client took none of its answers within {} s; the stream was ended",
                    patience.as_secs_f64()
                ))),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let m = self.model(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config(&crate::http::config_json(&m))),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = request.into_inner();
        let models: Vec<Arc<LoadedModel>> = if r.name.is_empty() {
            self.state.repo.loaded()
        } else if r.version.is_empty() {
            let versions: Vec<_> = self
                .state
                .repo
                .loaded()
                .into_iter()
                .filter(|m| m.name == r.name)
                .collect();
            if versions.is_empty() {
                self.model(&r.name, "")?;
            }
            versions
        } else {
            vec![self.model(&r.name, &r.version)?]
        };
        Ok(Response::new(pb::ModelStatisticsResponse {
            model_stats: models
                .iter()
                .map(|m| statistics(&m.stats.json(&m.name, &m.version)))
                .collect(),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let ready_only = request.into_inner().ready;
        let models = self
            .state
            .repo
            .index()
            .into_iter()
            .filter(|e| !ready_only || e.state == "READY")
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.to_string(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let request = request.into_inner();
        if let Some(refused) =
            crate::http::no_load_overrides(request.parameters.keys().map(String::as_str))
        {
            return Err(Status::invalid_argument(crate::http::clipped(refused)));
        }
        let name = request.model_name;
        let repo = self.state.repo.clone();
        tokio::task::spawn_blocking(move || repo.load(&name))
            .await
            .map_err(|e| Status::internal(format!("load task failed: {e}")))?
            .map_err(|e| status(&ApiError::from(e)))?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let name = request.into_inner().model_name;
        self.state
            .repo
            .unload(&name)
            .map_err(|e| status(&ApiError::from(e)))?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::InferTensorContents as C;
    use pb::model_infer_request::InferInputTensor;

    fn input(datatype: &str, shape: &[i64], contents: Option<C>) -> InferInputTensor {
        InferInputTensor {
            name: "x".into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            contents,
            ..Default::default()
        }
    }

    fn decoded(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> Result<Vec<u8>, String> {
        let request = pb::ModelInferRequest {
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        };
        decode(request)
            .map(|r| r.inputs[0].data.clone())
            .map_err(|(e, _)| e.message)
    }

    #[test]
    fn typed_contents_become_each_datatypes_bytes() {
        let typed = |datatype: &str, c: C| decoded(vec![input(datatype, &[2], Some(c))], vec![]);
        let ints = C {
            int_contents: vec![-3, 7],
            ..Default::default()
        };
        let uints = C {
            uint_contents: vec![3, 250],
            ..Default::default()
        };
        assert_eq!(typed("INT8", ints.clone()).expect("decoded"), [253, 7]);
        assert_eq!(
            typed("INT16", ints.clone()).expect("decoded"),
            [253, 255, 7, 0]
        );
        assert_eq!(
            typed("INT32", ints).expect("decoded"),
            [253, 255, 255, 255, 7, 0, 0, 0]
        );
        assert_eq!(typed("UINT8", uints.clone()).expect("decoded"), [3, 250]);
        assert_eq!(typed("UINT16", uints).expect("decoded"), [3, 0, 250, 0]);
        let fp32 = C {
            fp32_contents: vec![1.5, -2.0],
            ..Default::default()
        };
        let want: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(typed("FP32", fp32).expect("decoded"), want);
        let bools = C {
            bool_contents: vec![true, false],
            ..Default::default()
        };
        assert_eq!(typed("BOOL", bools).expect("decoded"), [1, 0]);
        let strings = C {
            bytes_contents: vec![b"ab".to_vec(), vec![]],
            ..Default::default()
        };
        assert_eq!(
            typed("BYTES", strings).expect("decoded"),
            [2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]
        );
    }

    #[test]
    fn typed_contents_that_do_not_fit_are_clear_errors() {
        let typed = |datatype: &str, c: C| decoded(vec![input(datatype, &[2], Some(c))], vec![]);
        let wide = C {
            int_contents: vec![1, 300],
            ..Default::default()
        };
        let e = typed("INT8", wide).expect_err("refused");
        assert!(e.contains("holds 300, outside the range of INT8"), "{e}");
        let elsewhere = C {
            int_contents: vec![1, 2],
            ..Default::default()
        };
        let e = typed("FP32", elsewhere).expect_err("refused");
        assert!(e.contains("in another field"), "{e}");
        let junk = C {
            fp32_contents: vec![1.0, 2.0],
            int_contents: vec![0; 1000],
            ..Default::default()
        };
        let e = typed("FP32", junk).expect_err("refused");
        assert!(e.contains("more than one typed field"), "{e}");
        let short = C {
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        assert!(
            typed("FP32", short).is_err(),
            "one value for a shape of two"
        );
    }

    #[test]
    fn raw_contents_are_checked_as_http_checks_binary_data() {
        let e = decoded(vec![input("BOOL", &[3], None)], vec![vec![1, 2, 0]]).expect_err("refused");
        assert!(e.contains("BOOL element 1 is the byte 2"), "{e}");
        let both = C {
            bool_contents: vec![true, false, true],
            ..Default::default()
        };
        let e = decoded(vec![input("BOOL", &[3], Some(both))], vec![vec![1, 0, 1]])
            .expect_err("refused");
        assert!(
            e.contains("both raw_input_contents and typed contents"),
            "{e}"
        );
        // Raw contents with an empty typed message beside them are what clients send.
        let answer = decoded(
            vec![input("BOOL", &[3], Some(C::default()))],
            vec![vec![1, 0, 1]],
        );
        assert_eq!(answer.expect("decoded"), [1, 0, 1]);
    }
}
