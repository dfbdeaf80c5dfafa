//! What this machine has for inference, probed once: the CPU (model, cores, the vector
//! extensions that backends use), NVIDIA GPUs through NVML (loaded at run time, so a machine
//! without the driver simply has none, and says why), OpenVINO's devices, ONNX Runtime's
//! execution providers, and each wasi-nn backend with whether it is here.
//!
//! It also keeps the ledger of GPU memory that loaded models reserve (see [`reserve_gpu`]).

use std::sync::OnceLock;

use parking_lot::Mutex;
use sophon_sdk::Backend;

/// An NVIDIA GPU, as NVML reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub memory_mb: u64,
    /// CUDA compute capability, like `9.0`.
    pub compute_capability: String,
}

/// The machine's inference hardware and backends.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hardware {
    pub cpu_model: String,
    pub cpu_cores: usize,
    /// Vector extensions present (x86: avx2, fma, avx512f, avx512_bf16, amx; arm: neon).
    pub cpu_features: Vec<&'static str>,
    pub gpus: Vec<Gpu>,
    /// The NVIDIA driver version, where NVML answered.
    pub nvidia_driver: Option<String>,
    /// Why there are no NVIDIA GPUs, where NVML did not answer.
    pub gpus_absent: Option<String>,
    /// OpenVINO's devices (`CPU`, `GPU.0`, `NPU`), or why OpenVINO is absent.
    pub openvino_devices: Result<Vec<String>, String>,
    /// ONNX Runtime's execution providers, or why it is absent.
    pub ort_providers: Result<Vec<String>, String>,
    /// Each backend, and what it is here (`Err`: why it is absent).
    pub backends: Vec<(Backend, Result<String, String>)>,
}

static HARDWARE: OnceLock<Hardware> = OnceLock::new();

thread_local! {
    /// Set while this thread runs the probe.
    static PROBING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This machine's hardware (probed on first use).
///
/// Nothing the probe calls may call this: a re-entrant `OnceLock` initialisation hangs the
/// process (it did, through ONNX Runtime's line of the backend inventory, on a machine whose
/// library has the CUDA provider). Such a call panics here instead, naming the mistake.
pub fn hardware() -> &'static Hardware {
    once_guarded(&HARDWARE, &PROBING, probe)
}

/// `cell`'s value, made by `init` on first use. A call from inside `init` on the same thread
/// (flagged by `busy`) panics instead of hanging.
fn once_guarded<T>(
    cell: &'static OnceLock<T>,
    busy: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    init: impl FnOnce() -> T,
) -> &'static T {
    if let Some(done) = cell.get() {
        return done;
    }
    assert!(
        !busy.get(),
        "hardware() was called from inside its own probe; pass what is needed instead"
    );
    /// Clears the flag however `init` ends (a panic included).
    struct Busy(&'static std::thread::LocalKey<std::cell::Cell<bool>>);
    impl Drop for Busy {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    cell.get_or_init(|| {
        busy.set(true);
        let _busy = Busy(busy);
        init()
    })
}

/// Start probing on a thread of its own, so a serving process's start-up does not wait for the
/// native libraries to load (tens of milliseconds); the first [`hardware`] call waits for it.
/// Only for processes that serve: one that exits while the probe is inside a native library's
/// initialisation can crash on the way out.
pub fn probe_in_background() {
    std::thread::spawn(|| {
        hardware();
    });
}

fn probe() -> Hardware {
    let (gpus, nvidia_driver, gpus_absent) = match nvml() {
        Ok((gpus, driver)) => (gpus, Some(driver), None),
        Err(why) => (Vec::new(), None, Some(why)),
    };
    let backends = crate::backend::inventory();
    let openvino_devices = match crate::backend::devices_named(Backend::Openvino) {
        Some(devices) => Ok(devices),
        None => Err(backends
            .iter()
            .find(|(b, _)| *b == Backend::Openvino)
            .and_then(|(_, s)| s.clone().err())
            .unwrap_or_default()),
    };
    Hardware {
        cpu_model: cpu_model(),
        cpu_cores: num_cpus::get().max(1),
        cpu_features: cpu_features(),
        gpus,
        nvidia_driver,
        gpus_absent,
        openvino_devices,
        ort_providers: crate::backend::ort_providers(),
        backends,
    }
}

/// The value of the first `key: value` line of a `/proc` file (`/proc/cpuinfo`'s `model name`,
/// `/proc/meminfo`'s `MemTotal`).
pub fn proc_field(file: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// The default model memory of a node: 75 % of its RAM, in bytes (`None` where unknown).
pub fn default_model_memory() -> Option<u64> {
    let kb: u64 = proc_field("/proc/meminfo", "MemTotal")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024 / 4 * 3)
}

fn cpu_model() -> String {
    proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(target_arch = "x86_64")]
fn cpuinfo_flag(flag: &str) -> bool {
    proc_field("/proc/cpuinfo", "flags").is_some_and(|f| f.split_whitespace().any(|f| f == flag))
}

#[allow(unused_mut)]
fn cpu_features() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, here) in [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512_vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
            (
                "avx512_bf16",
                std::arch::is_x86_feature_detected!("avx512bf16"),
            ),
            // Not detectable on stable Rust yet: the kernel's flags say it.
            ("amx_tile", cpuinfo_flag("amx_tile")),
        ] {
            if here {
                found.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
    }
    found
}

static NVML: OnceLock<Result<nvml_wrapper::Nvml, String>> = OnceLock::new();

/// NVML (`libnvidia-ml.so`, loaded at run time once), or why there is none.
fn nvml_handle() -> Result<&'static nvml_wrapper::Nvml, String> {
    NVML.get_or_init(|| {
        crate::backend::catch_panic("NVML", nvml_wrapper::Nvml::init)?
            .map_err(|e| format!("no NVIDIA driver (NVML: {e})"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// NVIDIA GPUs and the driver version, through NVML.
fn nvml() -> Result<(Vec<Gpu>, String), String> {
    let nvml = nvml_handle()?;
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let count = nvml.device_count().map_err(|e| format!("NVML: {e}"))?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|e| format!("NVML: GPU {index}: {e}"))?;
        let memory = device.memory_info().map(|m| m.total).unwrap_or(0);
        let capability = device
            .cuda_compute_capability()
            .map(|c| format!("{}.{}", c.major, c.minor))
            .unwrap_or_default();
        gpus.push(Gpu {
            index,
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_string()),
            memory_mb: memory >> 20,
            compute_capability: capability,
        });
    }
    Ok((gpus, driver))
}

/// Free memory on a GPU now (MiB), where NVML answers.
pub fn gpu_free_mb(index: u32) -> Option<u64> {
    let nvml = nvml_handle().ok()?;
    let device = nvml.device_by_index(index).ok()?;
    device.memory_info().ok().map(|m| m.free >> 20)
}

impl Hardware {
    /// The lines `sophon dev` and `sophon node run` print at start.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "CPU: {} ({} cores{}{})",
            self.cpu_model,
            self.cpu_cores,
            if self.cpu_features.is_empty() {
                ""
            } else {
                "; "
            },
            self.cpu_features.join(", ")
        )];
        match (&self.gpus_absent, self.gpus.is_empty()) {
            (Some(why), _) => lines.push(format!("GPUs: none ({why})")),
            (None, true) => lines.push("GPUs: none (NVML found no device)".to_string()),
            (None, false) => {
                for g in &self.gpus {
                    lines.push(format!(
                        "GPU {}: {} ({} MiB, compute {}, driver {})",
                        g.index,
                        g.name,
                        g.memory_mb,
                        g.compute_capability,
                        self.nvidia_driver.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        if let Ok(devices) = &self.openvino_devices {
            lines.push(format!("OpenVINO devices: {}", devices.join(", ")));
        }
        if let Ok(providers) = &self.ort_providers {
            lines.push(format!(
                "ONNX Runtime execution providers: {}",
                providers.join(", ")
            ));
        }
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(b, state)| match state {
                Ok(what) => format!("{}: {what}", b.as_str()),
                Err(why) => format!("{}: absent ({why})", b.as_str()),
            })
            .collect();
        lines.push(format!("Backends: {}", backends.join("; ")));
        lines
    }
}

/// GPU memory that loaded models hold, by GPU index (MiB).
static RESERVED: Mutex<Vec<(u32, u64)>> = Mutex::new(Vec::new());

/// A model's hold on GPU memory; dropping it gives the memory back.
#[derive(Debug)]
pub struct GpuReservation {
    gpu: u32,
    mb: u64,
}

impl Drop for GpuReservation {
    fn drop(&mut self) {
        let mut reserved = RESERVED.lock();
        if let Some(slot) = reserved.iter_mut().find(|(g, _)| *g == self.gpu) {
            slot.1 = slot.1.saturating_sub(self.mb);
        }
    }
}

/// Reserve `mb` MiB on the GPU with the most room, or refuse with why: the GPU's size less what
/// loaded models reserved must hold it, and so must what NVML says is free now. Several models
/// share a GPU this way, and a load that would not fit is refused rather than running out of
/// memory mid-request.
pub fn reserve_gpu(mb: u64) -> Result<GpuReservation, String> {
    let hw = hardware();
    reserve_on(&hw.gpus, mb, gpu_free_mb)
}

fn reserve_on(
    gpus: &[Gpu],
    mb: u64,
    free_now: impl Fn(u32) -> Option<u64>,
) -> Result<GpuReservation, String> {
    if gpus.is_empty() {
        return Err("this node has no NVIDIA GPU".to_string());
    }
    let mut reserved = RESERVED.lock();
    let held = |gpu: u32, reserved: &[(u32, u64)]| {
        reserved
            .iter()
            .find(|(g, _)| *g == gpu)
            .map_or(0, |(_, mb)| *mb)
    };
    let mut best: Option<(u32, u64)> = None;
    let mut seen = Vec::new();
    for g in gpus {
        let by_ledger = g.memory_mb.saturating_sub(held(g.index, &reserved));
        let room = free_now(g.index).map_or(by_ledger, |free| free.min(by_ledger));
        seen.push(format!(
            "GPU {} has {room} MiB of {} MiB left",
            g.index, g.memory_mb
        ));
        if room >= mb && best.is_none_or(|(_, r)| room > r) {
            best = Some((g.index, room));
        }
    }
    let (gpu, _) = best.ok_or_else(|| {
        format!(
            "the model needs {mb} MiB of GPU memory, and no GPU has that much left ({})",
            seen.join("; ")
        )
    })?;
    Ok(add(&mut reserved, gpu, mb))
}

fn add(reserved: &mut Vec<(u32, u64)>, gpu: u32, mb: u64) -> GpuReservation {
    match reserved.iter_mut().find(|(g, _)| *g == gpu) {
        Some(slot) => slot.1 += mb,
        None => reserved.push((gpu, mb)),
    }
    GpuReservation { gpu, mb }
}

/// Record `mb` MiB held on GPU `gpu` (memory a load was seen to take), without checking room.
pub fn record_gpu(gpu: u32, mb: u64) -> GpuReservation {
    add(&mut RESERVED.lock(), gpu, mb)
}

impl GpuReservation {
    /// The GPU it holds memory on.
    pub fn gpu(&self) -> u32 {
        self.gpu
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_probe_that_asks_for_its_own_answer_panics_instead_of_hanging() {
        use std::cell::Cell;
        use std::sync::OnceLock;
        static CELL: OnceLock<u32> = OnceLock::new();
        thread_local! {
            static BUSY: Cell<bool> = const { Cell::new(false) };
        }
        fn reentrant() -> u32 {
            *super::once_guarded(&CELL, &BUSY, reentrant) + 1
        }
        // On a thread of its own, so that a hang fails the test by its timeout rather than
        // hanging the suite; the panic comes back as the thread's result.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| super::once_guarded(&CELL, &BUSY, reentrant));
            let _ = tx.send(outcome.is_err());
        });
        let panicked = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a re-entrant probe hung instead of panicking");
        assert!(panicked, "a re-entrant probe must panic");
        // The flag was cleared by the panic: a later, well-behaved first use still works.
        static OTHER: OnceLock<u32> = OnceLock::new();
        assert_eq!(*super::once_guarded(&OTHER, &BUSY, || 7), 7);
    }

    use super::*;

    fn gpu(index: u32, memory_mb: u64) -> Gpu {
        Gpu {
            index,
            name: "test".into(),
            memory_mb,
            compute_capability: "9.0".into(),
        }
    }

    #[test]
    fn reservations_share_gpus_and_refuse_what_does_not_fit() {
        // Indices of their own, so the process-wide ledger is not shared with other tests.
        let gpus = [gpu(100, 1000), gpu(101, 600)];
        let a = reserve_on(&gpus, 700, |_| None).expect("fits on 100");
        assert_eq!(a.gpu(), 100);
        let b = reserve_on(&gpus, 500, |_| None).expect("fits on 101");
        assert_eq!(b.gpu(), 101);
        let refused = reserve_on(&gpus, 400, |_| None).expect_err("full");
        assert!(refused.contains("needs 400 MiB"), "{refused}");
        assert!(refused.contains("GPU 100 has 300 MiB"), "{refused}");
        // Memory another process holds counts too.
        let refused =
            reserve_on(&gpus, 200, |g| Some(if g == 100 { 100 } else { 50 })).expect_err("taken");
        assert!(refused.contains("needs 200 MiB"), "{refused}");
        drop(a);
        let c = reserve_on(&gpus, 900, |_| None).expect("freed");
        assert_eq!(c.gpu(), 100);
        assert!(reserve_on(&[], 1, |_| None).is_err(), "no GPU");
    }
}
