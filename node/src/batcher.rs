//! Dynamic batching, as Triton's `dynamic_batching`: requests of one model that wait together
//! are concatenated along dim 0 into one call of the model (one fresh instance, one wasi-nn
//! compute), and the outputs are split back by each request's rows.
//!
//! - A model batches when its manifest has `[batching]` (or the node overrides it, `--dynamic-
//!   batching`) and `resources.max_batch_size` > 0.
//! - One task per model forms batches. It waits for a free instance slot first (requests keep
//!   arriving meanwhile, so a busy model forms bigger batches), then, when that slot was the
//!   last free one, at most `max_queue_delay_us` from the oldest request's arrival, or until
//!   the batch is full. While another slot is free it does not wait: a batch that waits then
//!   leaves a core idle (on 16 cores, SqueezeNet batched with a 1 ms delay served 0.12× the
//!   requests of the same model unbatched at concurrency 16).
//! - A model that batches on a GPU gets [`crate::repository::GPU_BATCHING_SLOTS`] slots unless
//!   its manifest says, so that requests queue for the batcher rather than for the GPU.
//! - Requests join when every input has the same datatype and the same dims after dim 0 as the
//!   oldest's, and all of a request's inputs agree on dim 0. Others wait for a later batch; a
//!   request that cannot batch at all (a scalar input, inputs disagreeing on dim 0) does not come
//!   here ([`joinable`]).
//! - Each request gets exactly what it would get alone: when a batched call fails, or its
//!   outputs do not lead with the batch's rows, each request runs again alone and gets its own
//!   answer. Only a deadline or a full node fails the whole batch, each with the error.

use crate::runtime::{CallTimes, GuestDatatype, GuestTensor, InvokeError, Model};
use sophon_sdk::Batching;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// A model's batcher: its settings, and the queue its task forms batches from.
pub struct Batcher {
    inner: Arc<Inner>,
    /// Started by the first request (a model may be loaded outside a runtime).
    tx: OnceLock<mpsc::UnboundedSender<Job>>,
}

/// The effective settings of a model's dynamic batching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSettings {
    /// Most rows in one batch.
    pub limit: u64,
    /// Batch sizes to cut at when the queue allows, ascending.
    pub preferred: Vec<u64>,
    /// How long the oldest request waits for others.
    pub delay: Duration,
}

impl BatchSettings {
    /// The settings a `[batching]` table gives a model whose `max_batch_size` is `model_max`.
    pub fn new(b: &Batching, model_max: u32) -> BatchSettings {
        let mut preferred: Vec<u64> = b.preferred_batch_sizes.iter().map(|p| *p as u64).collect();
        preferred.sort_unstable();
        preferred.dedup();
        BatchSettings {
            limit: u64::from(b.limit(model_max)).max(1),
            preferred,
            delay: Duration::from_micros(b.max_queue_delay_us),
        }
    }
}

struct Inner {
    settings: BatchSettings,
    model: Arc<Model>,
    /// The model's instance slots, shared with requests that run alone.
    slots: Arc<Semaphore>,
    /// Requests in the queue, not yet in a batch.
    queued: AtomicUsize,
}

/// One request waiting to be batched.
struct Job {
    inputs: Vec<GuestTensor>,
    rows: u64,
    enqueued: Instant,
    reply: oneshot::Sender<Done>,
}

/// What one request of a batch gets back.
pub struct Done {
    pub result: Result<(Vec<GuestTensor>, CallTimes), InvokeError>,
    /// From joining the queue to its batch starting.
    pub queue: Duration,
    /// Set on one request of each call of the model: the rows that call computed. The request
    /// that carries it counts the execution in the statistics.
    pub executed: Option<u64>,
}

/// The batch rows of a request when it can join a batch: every input leads with the same dim 0,
/// between 1 and `limit`.
pub fn joinable(inputs: &[GuestTensor], limit: u64) -> Option<u64> {
    let rows = *inputs.first()?.shape.first()?;
    let same = inputs.iter().all(|t| t.shape.first() == Some(&rows));
    (same && rows >= 1 && rows <= limit).then_some(rows)
}

impl Batcher {
    pub fn new(settings: BatchSettings, model: Arc<Model>, slots: Arc<Semaphore>) -> Batcher {
        Batcher {
            inner: Arc::new(Inner {
                settings,
                model,
                slots,
                queued: AtomicUsize::new(0),
            }),
            tx: OnceLock::new(),
        }
    }

    pub fn settings(&self) -> &BatchSettings {
        &self.inner.settings
    }

    /// Requests waiting to join a batch.
    pub fn queued(&self) -> usize {
        self.inner.queued.load(Ordering::Acquire)
    }

    /// Queue a request of `rows` rows (from [`joinable`]) and wait for its part of a batch.
    /// Cancel-safe: a request dropped while it waits leaves the queue before its batch forms.
    pub async fn submit(&self, inputs: Vec<GuestTensor>, rows: u64) -> Done {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(form_batches(self.inner.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        let enqueued = Instant::now();
        self.inner.queued.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            inputs,
            rows,
            enqueued,
            reply,
        };
        let lost = |model: &Model| Done {
            result: Err(InvokeError::Failed {
                model: model.name().to_string(),
                message: "the model's batcher stopped (it is being unloaded); retry".into(),
            }),
            queue: enqueued.elapsed(),
            executed: None,
        };
        if tx.send(job).is_err() {
            self.inner.queued.fetch_sub(1, Ordering::AcqRel);
            return lost(&self.inner.model);
        }
        answer.await.unwrap_or_else(|_| lost(&self.inner.model))
    }
}

/// The datatype and dims after dim 0 of each input, in order: requests batch when they agree.
fn same_kind(a: &[GuestTensor], b: &[GuestTensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.datatype == y.datatype && x.shape.get(1..) == y.shape.get(1..)
        })
}

/// The task that forms a model's batches, until the model is dropped.
async fn form_batches(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        // A free slot first: while every instance is busy, requests pile up and join. Requests
        // whose clients leave meanwhile are let go (their inputs with them: the bytes in flight
        // that counted them were given back when their handlers ended).
        let Some(permit) = wait_for_slot(&inner, &mut rx, &mut waiting).await else {
            return;
        };
        if waiting.is_empty() {
            continue;
        }
        let settings = &inner.settings;
        let full = settings.preferred.last().copied().unwrap_or(settings.limit);
        loop {
            while let Ok(job) = rx.try_recv() {
                waiting.push_back(job);
            }
            sweep(&inner, &mut waiting);
            let Some(oldest) = waiting.front() else {
                break;
            };
            let deadline = oldest.enqueued + settings.delay;
            let rows: u64 = waiting
                .iter()
                .filter(|j| same_kind(&j.inputs, &oldest.inputs))
                .map(|j| j.rows)
                .sum();
            // Waiting while another slot is free would leave it idle: the batch goes now,
            // with whatever has piled up. The delay is spent only on the last free slot.
            if rows >= full.min(settings.limit)
                || Instant::now() >= deadline
                || inner.slots.available_permits() > 0
            {
                break;
            }
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => waiting.push_back(job),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        if waiting.is_empty() {
            continue;
        }
        let batch = take_batch(&mut waiting, settings);
        inner.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        let run = inner.clone();
        tokio::task::spawn_blocking(move || {
            let answers = run.run(batch);
            drop(permit);
            for (reply, done) in answers {
                let _ = reply.send(done);
            }
        });
    }
}

/// How often a batcher waiting for a slot lets go of requests whose clients left.
const SWEEP: Duration = Duration::from_millis(10);

/// Requests whose clients left, out of the queue.
fn sweep(inner: &Inner, waiting: &mut VecDeque<Job>) {
    let before = waiting.len();
    waiting.retain(|j| !j.reply.is_closed());
    inner
        .queued
        .fetch_sub(before - waiting.len(), Ordering::AcqRel);
}

/// A slot for the next batch, taking in arrivals and letting go of departed requests while
/// every slot is busy; `None` when the model is gone.
async fn wait_for_slot(
    inner: &Inner,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    waiting: &mut VecDeque<Job>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(permit) = inner.slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    let acquire = inner.slots.clone().acquire_owned();
    tokio::pin!(acquire);
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            permit = &mut acquire => return permit.ok(),
            job = rx.recv() => match job {
                Some(job) => waiting.push_back(job),
                // The model is gone; its queued requests are answered as lost when dropped.
                None if waiting.is_empty() => return None,
                None => return acquire.await.ok(),
            },
            _ = tick.tick() => sweep(inner, waiting),
        }
    }
}

/// The oldest request and those that join it, in arrival order, up to the batch limit; cut at
/// the largest preferred size the arrivals add up to, where there is one.
fn take_batch(waiting: &mut VecDeque<Job>, settings: &BatchSettings) -> Vec<Job> {
    let mut picked = Vec::new();
    let mut rows = 0u64;
    let mut sums = Vec::new();
    for (i, job) in waiting.iter().enumerate() {
        if i > 0 && !same_kind(&job.inputs, &waiting[0].inputs) {
            continue;
        }
        if rows + job.rows > settings.limit {
            continue;
        }
        rows += job.rows;
        picked.push(i);
        sums.push(rows);
    }
    if let Some(cut) = sums
        .iter()
        .rposition(|s| settings.preferred.binary_search(s).is_ok())
    {
        picked.truncate(cut + 1);
    }
    let mut batch = Vec::with_capacity(picked.len());
    for (taken, i) in picked.into_iter().enumerate() {
        batch.push(waiting.remove(i - taken).expect("picked from the queue"));
    }
    batch
}

impl Inner {
    /// Run one batch on this (blocking) thread: each of its requests' answer, to send once
    /// the batch's slot is given back (a client that sends its next request at once then finds
    /// the slot free).
    fn run(&self, jobs: Vec<Job>) -> Vec<(oneshot::Sender<Done>, Done)> {
        let mut answers = Vec::with_capacity(jobs.len());
        let started = Instant::now();
        let total: u64 = jobs.iter().map(|j| j.rows).sum();
        if jobs.len() == 1 {
            let job = jobs.into_iter().next().expect("one job");
            if job.reply.is_closed() {
                // Its client left after the batch formed: nobody waits for the answer.
                return answers;
            }
            let enqueued = job.enqueued;
            let result = self.predict(job.inputs);
            answers.push((
                job.reply,
                Done {
                    result,
                    queue: started - enqueued,
                    executed: Some(total),
                },
            ));
            return answers;
        }
        let inputs = concat(&jobs, total);
        let result = self.predict(inputs);
        let parts = match result {
            Ok((outputs, times)) => split(outputs, &jobs).map(|parts| (parts, times)),
            // The batch as a whole ran out of time, or the node out of slots: each request
            // gets that error (running each again would take as long again).
            Err(e @ (InvokeError::Timeout { .. } | InvokeError::Busy { .. })) => {
                for job in jobs {
                    answers.push((
                        job.reply,
                        Done {
                            result: Err(e.clone()),
                            queue: started - job.enqueued,
                            executed: None,
                        },
                    ));
                }
                return answers;
            }
            Err(e) => Err(e.to_string()),
        };
        match parts {
            Ok((parts, times)) => {
                // One request reports the call's execution: one whose client is still there,
                // so that the statistics do not lose the batch with a client that left.
                let carrier = jobs.iter().position(|j| !j.reply.is_closed()).unwrap_or(0);
                for (i, (job, outputs)) in jobs.into_iter().zip(parts).enumerate() {
                    answers.push((
                        job.reply,
                        Done {
                            result: Ok((outputs, times)),
                            queue: started - job.enqueued,
                            executed: (i == carrier).then_some(total),
                        },
                    ));
                }
            }
            Err(why) => {
                // One request may have failed the batch: each runs alone and gets its own
                // answer, as if it had never been batched.
                tracing::debug!(
                    model = %self.model.name(), requests = jobs.len(),
                    "a batch failed ({why}); running its requests one by one"
                );
                for job in jobs {
                    if job.reply.is_closed() {
                        continue;
                    }
                    let (enqueued, rows) = (job.enqueued, job.rows);
                    let result = self.predict(job.inputs);
                    answers.push((
                        job.reply,
                        Done {
                            result,
                            queue: started - enqueued,
                            executed: Some(rows),
                        },
                    ));
                }
            }
        }
        answers
    }

    fn predict(
        &self,
        inputs: Vec<GuestTensor>,
    ) -> Result<(Vec<GuestTensor>, CallTimes), InvokeError> {
        crate::backend::catch_panic("the model call", || self.model.predict(inputs)).unwrap_or_else(
            |panicked| {
                Err(InvokeError::Failed {
                    model: self.model.name().to_string(),
                    message: panicked,
                })
            },
        )
    }
}

/// The jobs' inputs concatenated along dim 0, in the first job's input order.
fn concat(jobs: &[Job], total: u64) -> Vec<GuestTensor> {
    jobs[0]
        .inputs
        .iter()
        .enumerate()
        .map(|(k, first)| {
            let bytes: usize = jobs.iter().map(|j| j.inputs[k].data.len()).sum();
            let mut data = Vec::with_capacity(bytes);
            for job in jobs {
                data.extend_from_slice(&job.inputs[k].data);
            }
            let mut shape = first.shape.clone();
            shape[0] = total;
            GuestTensor {
                name: first.name.clone(),
                datatype: first.datatype,
                shape,
                data,
            }
        })
        .collect()
}

/// A batch's outputs split back by each job's rows, or why they cannot be.
fn split(outputs: Vec<GuestTensor>, jobs: &[Job]) -> Result<Vec<Vec<GuestTensor>>, String> {
    let total: u64 = jobs.iter().map(|j| j.rows).sum();
    let mut parts: Vec<Vec<GuestTensor>> = jobs
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for t in outputs {
        if t.shape.first() != Some(&total) {
            return Err(format!(
                "output `{}` has shape {:?}, which does not lead with the batch's {total} rows",
                t.name, t.shape
            ));
        }
        let bounds = row_bounds(&t, total)?;
        let mut row = 0usize;
        for (job, part) in jobs.iter().zip(parts.iter_mut()) {
            let next = row + job.rows as usize;
            let mut shape = t.shape.clone();
            shape[0] = job.rows;
            part.push(GuestTensor {
                name: t.name.clone(),
                datatype: t.datatype,
                shape,
                data: t.data[bounds[row]..bounds[next]].to_vec(),
            });
            row = next;
        }
    }
    Ok(parts)
}

/// Byte offsets where each of `rows` rows of `t` starts, and its end.
fn row_bounds(t: &GuestTensor, rows: u64) -> Result<Vec<usize>, String> {
    // The model's outputs are the guest's to shape: a product past u64 is refused, not wrapped.
    let per_row = t.shape[1..]
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d))
        .ok_or_else(|| format!("output `{}` has shape {:?}, too large", t.name, t.shape))?;
    if t.datatype == GuestDatatype::Bytes {
        // Length-prefixed elements (u32 little-endian, then the bytes), walked to each row's
        // first element.
        let mut bounds = Vec::with_capacity(rows as usize + 1);
        let mut at = 0usize;
        for _ in 0..rows {
            bounds.push(at);
            for _ in 0..per_row {
                let len = t
                    .data
                    .get(at..at + 4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or_else(|| format!("output `{}` is shorter than its shape", t.name))?;
                at = at
                    .checked_add(4 + len)
                    .filter(|end| *end <= t.data.len())
                    .ok_or_else(|| format!("output `{}` is shorter than its shape", t.name))?;
            }
        }
        if at != t.data.len() {
            // Alone, such an output is refused on its way to the client; split, the bytes past
            // its last element would vanish.
            return Err(format!(
                "output `{}` holds bytes past its last element",
                t.name
            ));
        }
        bounds.push(at);
        return Ok(bounds);
    }
    let len = t.data.len() as u64;
    if rows == 0 || !len.is_multiple_of(rows) || (per_row == 0 && len != 0) {
        return Err(format!(
            "output `{}` holds {len} bytes, which do not split into {rows} rows",
            t.name
        ));
    }
    let row_bytes = (len / rows) as usize;
    Ok((0..=rows as usize).map(|r| r * row_bytes).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[u64], data: Vec<u8>) -> GuestTensor {
        GuestTensor {
            name: name.into(),
            datatype: GuestDatatype::Fp32,
            shape: shape.to_vec(),
            data,
        }
    }

    fn job(rows: u64, width: u64) -> Job {
        let (reply, _) = oneshot::channel();
        Job {
            inputs: vec![t("x", &[rows, width], vec![0; (rows * width * 4) as usize])],
            rows,
            enqueued: Instant::now(),
            reply,
        }
    }

    fn settings(limit: u64, preferred: &[u64]) -> BatchSettings {
        BatchSettings {
            limit,
            preferred: preferred.to_vec(),
            delay: Duration::ZERO,
        }
    }

    #[test]
    fn batches_take_the_oldest_and_those_that_fit() {
        let mut q: VecDeque<Job> = [job(2, 4), job(1, 3), job(3, 4), job(4, 4), job(1, 4)].into();
        let batch = take_batch(&mut q, &settings(6, &[]));
        // 2 + 3 (the width-3 request waits; 4 more would pass 6) + 1.
        assert_eq!(batch.iter().map(|j| j.rows).collect::<Vec<_>>(), [2, 3, 1]);
        assert_eq!(q.iter().map(|j| j.rows).collect::<Vec<_>>(), [1, 4]);
        // The width-3 request is the oldest now: it goes alone.
        let batch = take_batch(&mut q, &settings(6, &[]));
        assert_eq!(batch.iter().map(|j| j.rows).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn preferred_sizes_cut_the_batch() {
        let mut q: VecDeque<Job> = (0..5).map(|_| job(1, 4)).collect();
        let batch = take_batch(&mut q, &settings(8, &[2, 4]));
        assert_eq!(batch.len(), 4);
        assert_eq!(q.len(), 1);
        // No preferred size is reached: everything that fits.
        let mut q: VecDeque<Job> = [job(3, 4), job(3, 4)].into();
        assert_eq!(take_batch(&mut q, &settings(8, &[4])).len(), 2);
    }

    #[test]
    fn outputs_split_by_rows_in_every_layout() {
        let jobs = [job(1, 2), job(3, 2), job(2, 2)];
        let data: Vec<u8> = (0..6 * 2 * 4).map(|b| b as u8).collect();
        let parts = split(vec![t("y", &[6, 2], data.clone())], &jobs).expect("split");
        assert_eq!(parts[1][0].shape, [3, 2]);
        assert_eq!(parts[1][0].data, data[8..32]);
        assert_eq!(parts[2][0].data, data[32..]);
        // BYTES: variable-length elements, two per row.
        let mut bytes = Vec::new();
        for i in 0..12u32 {
            let s = "x".repeat(i as usize);
            bytes.extend_from_slice(&(s.len() as u32).to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
        let mut strings = t("s", &[6, 2], bytes.clone());
        strings.datatype = GuestDatatype::Bytes;
        let parts = split(vec![strings], &jobs).expect("split bytes");
        let joined: Vec<u8> = parts.iter().flat_map(|p| p[0].data.clone()).collect();
        assert_eq!(joined, bytes);
        assert_eq!(parts[0][0].data, [0, 0, 0, 0, 1, 0, 0, 0, b'x']);
        // Nor one with bytes past its last element.
        let mut trailing = t("s", &[6, 2], [bytes.clone(), vec![0]].concat());
        trailing.datatype = GuestDatatype::Bytes;
        let e = split(vec![trailing], &jobs).expect_err("trailing bytes");
        assert!(e.contains("past its last element"), "{e}");
        // An output that does not lead with the batch cannot be split.
        let e = split(vec![t("y", &[2], vec![0; 8])], &jobs).expect_err("not batched");
        assert!(e.contains("does not lead with the batch's 6 rows"), "{e}");
        // Nor one whose shape's product passes u64 (a guest shapes its outputs).
        let e =
            split(vec![t("y", &[6, 1 << 32, 1 << 32], vec![0; 48])], &jobs).expect_err("too large");
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn requests_join_when_their_rows_agree() {
        let x = |rows: u64| t("x", &[rows, 4], vec![]);
        assert_eq!(joinable(&[x(2), x(2)], 8), Some(2));
        assert_eq!(joinable(&[x(2), x(3)], 8), None);
        assert_eq!(joinable(&[x(9)], 8), None);
        assert_eq!(joinable(&[x(0)], 8), None);
        assert_eq!(joinable(&[t("s", &[], vec![])], 8), None);
    }
}
