//! The inference route, and the one path every protocol takes after decoding ([`execute`]):
//! validation, admission, batching, the sandbox call, and the outputs in the manifest's types.

use super::body::{read_body, read_split};
use super::edge::PinnedVersion;
use super::{ApiError, ApiState, Outcome, Shared, bad, lookup};
use crate::repository::LoadedModel;
use crate::runtime::InvokeError;
use crate::{convert, v2};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Instant;

/// Decrements the in-flight gauges when a request ends, however it ends.
struct InFlight<'a>(&'a LoadedModel, &'a prometheus::IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.inflight.dec();
        self.1.dec();
    }
}

pub(super) async fn infer(
    State(state): Shared,
    Path(mut p): Path<HashMap<String, String>>,
    pinned: Option<axum::Extension<PinnedVersion>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(axum::Extension(PinnedVersion(v))) = pinned {
        p.entry("version".into()).or_insert(v);
    }
    let model = lookup(&state, &p)?;
    observed(&model, run_infer(&state, &model, &headers, body)).await
}

/// Run one inference request of `model` (HTTP or gRPC), counting it in the model's metrics,
/// statistics and performance window by its outcome.
pub(crate) async fn observed<T>(
    model: &LoadedModel,
    request: impl std::future::Future<Output = Result<T, Outcome>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = request.await;
    let outcome = match &result {
        Ok(_) => "success",
        Err((_, outcome)) => outcome,
    };
    model.metrics.outcome(outcome);
    let elapsed = started.elapsed();
    model.metrics.total.observe(elapsed.as_secs_f64());
    match result {
        Ok(response) => {
            model.stats.success.record(elapsed);
            model.perf.done(elapsed, true);
            Ok(response)
        }
        Err((e, _)) => {
            model.stats.fail.record(elapsed);
            model.perf.done(elapsed, false);
            Err(e)
        }
    }
}

pub(super) async fn run_infer(
    state: &ApiState,
    model: &LoadedModel,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Outcome> {
    let header_len = match headers.get(v2::HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    bad(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("{} must be a byte count", v2::HEADER_CONTENT_LENGTH),
                    ))
                })?,
        ),
    };
    // The body's bytes stay counted in flight until the answer, held by `held`, and then its
    // tensors' where they take more.
    let (request, mut held) = match header_len {
        // Binary tensor data, as it came: read into its parts, decoded without a second copy.
        Some(n) if !headers.contains_key(header::CONTENT_ENCODING) => {
            let (json, binary, held) = read_split(state, body, n).await?;
            (v2::decode_request_split(&json, binary).map_err(bad)?, held)
        }
        _ => {
            let (bytes, held) = read_body(state, headers, body).await?;
            (v2::decode_request(&bytes, header_len).map_err(bad)?, held)
        }
    };
    super::body::hold_decoded(state, &mut held, &request)?;
    let answer = execute(state, model, request).await?;
    let binary = |name: &str| {
        answer
            .wants
            .iter()
            .find(|(n, _)| n == name)
            .map_or(answer.binary_default, |(_, b)| *b)
    };
    let encoded = v2::encode_response(
        &model.name,
        Some(&model.version),
        answer.id.as_ref(),
        &answer.outputs,
        binary,
    )
    .map_err(|e| {
        answer.failed(model);
        let outcome = if e.status() == 400 {
            "bad_request"
        } else {
            "error"
        };
        (ApiError::from(e), outcome)
    })?;
    answer.record(model);

    let mut response = Response::new(Body::from(encoded.body));
    let headers = response.headers_mut();
    match encoded.header_len {
        Some(n) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(v2::HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(response)
}

/// The largest output (bytes) classified on the worker; larger ones hand the worker off.
const CLASSIFY_ON_WORKER: usize = 256 << 10;

/// A request's answer, before it is encoded for its protocol.
pub(crate) struct Answer {
    /// The outputs asked for, in the manifest's datatypes.
    pub outputs: Vec<v2::Tensor>,
    pub id: Option<Value>,
    /// Each output, and whether the request asked for it in binary (HTTP).
    wants: Vec<(String, bool)>,
    binary_default: bool,
    times: crate::runtime::CallTimes,
    output_started: Instant,
    /// The rows this request inferred.
    rows: u64,
    /// The batch size of the model call this request reports (`None`: a batch-mate reports it).
    execution: Option<u64>,
}

impl Answer {
    /// Record the request's compute phases, once its answer is encoded. The three are recorded
    /// together so that their counts always agree (perf_analyzer refuses statistics where they
    /// do not).
    pub(crate) fn record(&self, model: &LoadedModel) {
        model.stats.answered(
            self.times.instantiate,
            self.times.call,
            self.output_started.elapsed(),
            self.rows,
            self.execution,
        );
    }

    /// Record the model call this request carries, when its answer could not be made: the
    /// call's execution is counted once whether its carrier is answered or not.
    pub(crate) fn failed(&self, model: &LoadedModel) {
        if let Some(batch) = self.execution {
            model.stats.executed_for_failed(
                batch,
                self.times.instantiate,
                self.times.call,
                self.output_started.elapsed(),
            );
        }
    }
}

/// Validate a decoded request against the model, admit it, run it in the sandbox, and return
/// its outputs: the one path every protocol takes after decoding.
pub(crate) async fn execute(
    state: &ApiState,
    model: &LoadedModel,
    request: v2::InferRequest,
) -> Result<Answer, Outcome> {
    v2::validate_inputs(&request.inputs, model.inputs()).map_err(bad)?;
    v2::validate_batch(&request.inputs, model.manifest.resources.max_batch_size).map_err(bad)?;
    v2::select_outputs(&request.outputs, model.outputs()).map_err(bad)?;

    let all_inflight = &state.repo.metrics().inflight;
    model.metrics.inflight.inc();
    all_inflight.inc();
    let _inflight = InFlight(model, all_inflight);
    let overloaded = |queued: usize| {
        (
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "model `{}` is overloaded: {queued} requests are already queued; retry later",
                    model.name
                ),
            ),
            "overloaded",
        )
    };

    let rows = if model.manifest.resources.max_batch_size > 0 {
        request
            .inputs
            .first()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(1)
    } else {
        1
    };
    let id = request.id.clone();
    let wants: Vec<(String, bool)> = model
        .outputs()
        .iter()
        .map(|o| (o.name.clone(), request.wants_binary(&o.name)))
        .collect();
    let selected = request
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .collect::<Vec<_>>();
    let classes: Vec<(String, u32)> = request
        .outputs
        .iter()
        .filter_map(|o| Some((o.name.clone(), o.classification?)))
        .collect();
    let binary_default = request.binary_data_output;
    let inputs: Vec<_> = request.inputs.into_iter().map(convert::to_guest).collect();

    let batching = model
        .batcher
        .as_ref()
        .and_then(|b| crate::batcher::joinable(&inputs, b.settings().limit).map(|rows| (b, rows)));
    // With nothing queued to join and a slot free, a batching model's request has no
    // batch-mates to wait for when there is no delay, or when another slot is free beside its
    // own (the batcher would not wait then either): it runs at once, as a lone batch would.
    let free_now = match &batching {
        Some((b, _)) if b.queued() == 0 => model
            .admission
            .try_enter()
            .filter(|_| b.settings().delay.is_zero() || model.admission.free() > 0),
        _ => None,
    };
    let (result, queue, execution) = match (batching, free_now) {
        (Some((batcher, rows)), None) => {
            let queued = batcher.queued();
            if queued >= model.admission.max_queue() {
                return Err(overloaded(queued));
            }
            let done = batcher.submit(inputs, rows).await;
            (done.result, done.queue, done.executed)
        }
        (_, free_now) => {
            let queued_at = Instant::now();
            let _permit = match free_now {
                Some(permit) => permit,
                None => model
                    .admission
                    .enter()
                    .await
                    .map_err(|o| overloaded(o.queued))?,
            };
            let queue = queued_at.elapsed();
            // A lone request of a quick model that imports nothing but wasi-nn runs on the
            // worker (see `handoff`), and leaves its instance's teardown, and the making of the
            // next request's, until its answer is out. Under load there is no idle moment to
            // move them to, so they stay in the call, which hands the worker off.
            let alone = all_inflight.get() <= 1 && model.model.wasi_free();
            let defer = alone && model.pace.quick();
            let (answered, _) = crate::handoff::run(&model.pace, alone, |upkeep| {
                crate::backend::catch_panic("the model call", || {
                    let (result, spent) = model.model.answer(inputs);
                    *upkeep += spent.made();
                    if defer {
                        return (result, Some(spent));
                    }
                    // Not deferred: the instance is dropped here, inside the call.
                    *upkeep += spent.tear_down();
                    (result, None)
                })
            });
            let result = match answered {
                Ok((result, spent)) => {
                    if let Some(spent) = spent {
                        let next = model.model.clone();
                        crate::handoff::after_answer(model.pace.clone(), move || next.tidy(spent));
                    }
                    result
                }
                Err(panicked) => Err(InvokeError::Failed {
                    model: model.name.clone(),
                    message: panicked,
                }),
            };
            (result, queue, Some(rows))
        }
    };
    model.stats.queue.record(queue);
    model.perf.queue(queue);
    model.metrics.queue.observe(queue.as_secs_f64());
    let (outputs, times) = result.map_err(|e| {
        let outcome = match e {
            InvokeError::InvalidInput { .. } => "bad_request",
            InvokeError::Timeout { .. } => "timeout",
            InvokeError::MemoryExceeded { .. } => "memory",
            InvokeError::Trap { .. } => "trap",
            InvokeError::Busy { .. } => "overloaded",
            _ => "error",
        };
        tracing::warn!(model = %model.name, "inference failed: {e}");
        (ApiError::from(&e), outcome)
    })?;
    model.perf.compute(times.call);
    model
        .metrics
        .compute
        .observe((times.instantiate + times.call).as_secs_f64());

    let output_started = Instant::now();
    let mut answer = Answer {
        outputs: Vec::with_capacity(outputs.len()),
        id,
        wants,
        binary_default,
        times,
        output_started,
        rows,
        execution,
    };
    let prepared = || -> Result<(), Outcome> {
        for t in outputs {
            let mut t = convert::from_guest(t);
            if !selected.is_empty() && !selected.contains(&t.name) {
                continue;
            }
            t.datatype = model
                .declared_output_type(&t.name, t.datatype)
                .map_err(|m| (ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m), "error"))?;
            if let Some((_, k)) = classes.iter().find(|(name, _)| *name == t.name) {
                let batched = model.manifest.resources.max_batch_size > 0;
                let labels = model.labels(&t.name);
                let classify = || v2::classify::classify(&t, *k as usize, batched, labels);
                // Ranking a large output (a mask, a vocabulary's logits) takes milliseconds.
                t = if t.data.len() > CLASSIFY_ON_WORKER {
                    crate::handoff::long(classify)
                } else {
                    classify()
                }
                .map_err(bad)?;
            }
            answer.outputs.push(t);
        }
        Ok(())
    };
    match prepared() {
        Ok(()) => Ok(answer),
        Err(failed) => {
            answer.failed(model);
            Err(failed)
        }
    }
}
