//! A dropped runtime gives back its epoch ticker thread (and with it the engine). Alone in its
//! own test binary, so that no other test's runtime is counted.

use sophon_node::{Runtime, RuntimeConfig};

fn epoch_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|name| name.trim() == "sophon-epoch")
        })
        .count()
}

/// The count of ticker threads once it settles on `want` (a new thread names itself only once it
/// runs), or whatever it is after a second.
fn settled(want: usize) -> usize {
    for _ in 0..100 {
        if epoch_threads() == want {
            return want;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    epoch_threads()
}

#[test]
fn dropping_runtimes_stops_their_tickers() {
    let config = RuntimeConfig {
        cache_dir: None,
        cache_key_file: None,
        max_instances: 4,
        ..RuntimeConfig::default()
    };
    let before = epoch_threads();
    for _ in 0..5 {
        let runtime = Runtime::new(config.clone()).expect("runtime");
        let clone = runtime.clone();
        assert_eq!(settled(before + 1), before + 1);
        drop(runtime);
        assert_eq!(epoch_threads(), before + 1, "a clone keeps it running");
        drop(clone);
        // The drop joins the thread. The kernel may list the joined thread in /proc for a
        // moment after it has exited (the join wakes on the thread's exit, before its task is
        // reaped), so wait for the count to settle.
        assert_eq!(settled(before), before, "the last clone stops it");
    }
}
