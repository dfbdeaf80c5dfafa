//! A synthetic cluster for tests and benchmarks (`sophon bench` times [`place`](super::place)
//! on it): reproducible from a seed, no randomness from the machine.
//!
//! Nodes are spread round-robin over up to 16 zones; 70% are CPU-only (64 GiB), 20% have four
//! 24 GiB GPUs (and 128 GiB of host memory), 10% an NPU with 16 GiB (and 32 GiB of host memory).
//! Deployments have 1 to 40 replicas of 256 MiB to 4 GiB; 70% wish for `[cpu]`, 20% for
//! `[gpu, cpu]`, 10% for `[npu, cpu]`. At about 10 replicas per node everything fits.

use super::{DeploymentView, Device, DeviceMemory, NodeView};

/// A cluster of nodes and the deployments to place on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticCluster {
    pub nodes: Vec<NodeView>,
    pub deployments: Vec<DeploymentView>,
}

/// splitmix64: a tiny, well-mixed, seedable generator, so the cluster is the same everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Builds `nodes` nodes and deployments that want `replicas` replicas in all.
pub fn synthetic_cluster(nodes: usize, replicas: usize, seed: u64) -> SyntheticCluster {
    let mut rng = SplitMix(seed);
    let zones = (nodes / 100).clamp(1, 16);
    let node_views = (0..nodes)
        .map(|i| {
            let kind = rng.range(0, 9);
            let capacity = match kind {
                0..=6 => DeviceMemory {
                    cpu_mb: 64 * 1024,
                    ..DeviceMemory::default()
                },
                7 | 8 => DeviceMemory {
                    cpu_mb: 128 * 1024,
                    gpu_mb: 4 * 24 * 1024,
                    npu_mb: 0,
                },
                _ => DeviceMemory {
                    cpu_mb: 32 * 1024,
                    gpu_mb: 0,
                    npu_mb: 16 * 1024,
                },
            };
            NodeView {
                id: format!("node-{i:05}"),
                zone: format!("zone-{:02}", i % zones),
                schedulable: true,
                capacity,
            }
        })
        .collect();
    let mut deployments = Vec::new();
    let mut left = replicas as u64;
    let mut id = 0;
    while left > 0 {
        let count = rng.range(1, 40).min(left);
        left -= count;
        let hardware = match rng.range(0, 9) {
            0..=6 => vec![Device::Cpu],
            7 | 8 => vec![Device::Gpu, Device::Cpu],
            _ => vec![Device::Npu, Device::Cpu],
        };
        deployments.push(DeploymentView {
            id,
            replicas: count as u32,
            memory_mb: 256 * rng.range(1, 16),
            hardware,
            excluded: Vec::new(),
        });
        id += 1;
    }
    SyntheticCluster {
        nodes: node_views,
        deployments,
    }
}
