//! `sophon bench json-floor`: the bare baseline of the JSON comparison against MLServer
//! (`scripts/bench-mlserver`). An axum server on the node's stack (tokio, hyper, axum, the same
//! V2 JSON decoder) that parses each request and answers without running anything: the most a
//! JSON server on this machine could serve, against which the node's full path is measured.
//! It is a measuring instrument, not a serving path: nothing routes predictions to it.

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use std::net::SocketAddr;

/// Serve `POST /v2/models/{model}/infer` on `addr` until the process is killed.
pub(super) fn json_floor(addr: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app =
            axum::Router::new().route("/v2/models/{model}/infer", axum::routing::post(parse_only));
        // As the node does: no delayed ACK holding small responses back.
        let listener = tokio::net::TcpListener::bind(addr).await?.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        println!("json-floor: parsing V2 JSON requests on http://{addr}");
        axum::serve(listener, app).await?;
        Ok(())
    })
}

/// Decode the request as the node does, then answer with its input count and no outputs.
async fn parse_only(Path(model): Path<String>, body: Bytes) -> Response {
    match sophon_v2::decode_request(&body, None) {
        Ok(request) => {
            let answer = serde_json::json!({
                "model_name": model,
                "outputs": [],
                "parameters": {"inputs_parsed": request.inputs.len()},
            });
            (
                [(header::CONTENT_TYPE, "application/json")],
                answer.to_string(),
            )
                .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}
