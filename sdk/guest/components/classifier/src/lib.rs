//! An image classifier with its pre- and post-processing in the guest.
//!
//! In: `image`, UINT8 `[N, P]` (a grey image of P pixels per row; the example bundle uses 8x8).
//! The guest scales pixels to `[0, 1]`, runs the bundle's graph `model` (FP32 `[N, P]` → logits
//! `[N, C]`), applies a softmax and picks
//! the top k classes. Out: `probabilities`, FP32 `[N, C]`, and `labels`, BYTES `[N, k]`, each
//! `"score:index:label"` as Triton's classification extension writes them.
//!
//! Labels come from the `LABELS` environment variable (comma-separated) and k from `TOP_K`
//! (default 3): the bundle manifest grants both under `[capabilities.env]`.

use sophon_guest::nn::Graph;
use sophon_guest::{
    Datatype, Model, ModelMetadata, PredictError, Tensor, TensorSpec, invalid_input, take_input,
};

struct Classifier;

fn labels() -> Vec<String> {
    std::env::var("LABELS")
        .map(|s| s.split(',').map(|l| l.trim().to_string()).collect())
        .unwrap_or_default()
}

fn top_k() -> usize {
    std::env::var("TOP_K")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(3)
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

impl Model for Classifier {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "classifier".to_string(),
            inputs: vec![TensorSpec::new("image", Datatype::Uint8, &[-1, -1])],
            outputs: vec![
                TensorSpec::new("probabilities", Datatype::Fp32, &[-1, -1]),
                TensorSpec::new("labels", Datatype::Bytes, &[-1, -1]),
            ],
        }
    }

    fn predict(mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let image = take_input(&mut inputs, "image")?;
        let pixels = image.as_u8()?;
        let scaled: Vec<f32> = pixels.iter().map(|p| f32::from(*p) / 255.0).collect();
        let input = Tensor::from_f32("input", &image.shape, &scaled);

        let outputs = Graph::by_name("model")?.context()?.compute(vec![input])?;
        let logits = outputs
            .into_iter()
            .next()
            .ok_or_else(|| PredictError::Internal("the graph returned no output".into()))?;
        let [rows, classes] = logits.shape[..] else {
            return Err(invalid_input("the graph must return [N, classes] logits"));
        };
        let mut probabilities = logits.to_f32()?;
        let labels = labels();
        let k = top_k().min(classes as usize).max(1);
        let mut label_items = Vec::with_capacity(rows as usize * k);
        for row in probabilities.chunks_exact_mut(classes as usize) {
            softmax(row);
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
            for &class in order.iter().take(k) {
                let label = labels.get(class).map(String::as_str).unwrap_or("");
                label_items.push(format!("{:.6}:{class}:{label}", row[class]));
            }
        }
        Ok(vec![
            Tensor::from_f32("probabilities", &[rows, classes], &probabilities),
            Tensor::from_bytes_elements("labels", &[rows, k as u64], label_items),
        ])
    }
}

sophon_guest::export_model!(Classifier);
