//! Span-triggered flamegraphs. A perf_event program samples every tracked thread at a low rate
//! all the time (`span_sample` in agent-ebpf/src/stacks.rs), and a sched_switch program
//! (`span_offcpu`) records where tracked threads block, sending each blocking episode of 1 ms
//! or more when it ends; both go with their time and thread through a ring buffer into a
//! bounded window here (`otlp.history_secs`). When a span at or above its threshold arrives,
//! the samples and the blocked time of its thread (else its process) inside its window are
//! symbolized and drawn in microseconds: an on-CPU sample weighs one sampling period, an
//! off-CPU episode the part of it inside the span, under an `[off-CPU]` frame. The SVG is kept
//! in a directory with limits on count and bytes, oldest removed first. On-CPU samples of
//! processes that send spans come with a copy of their user stack, unwound here with the
//! modules' .eh_frame (`unwind.rs`) as a cpu capture's are.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::stacks::{SPAN_STACKS_MAX, SpanSample, SpanStackCopy};

use crate::{
    ebpf::ring_record,
    python::{Finder, Interpreter, PyFrame},
    stacks::SpanStack,
    tracker::SharedTracked,
    unwind::Unwinders,
};
use aya::maps::MapData;
use serde::{Deserialize, Serialize};

/// How often the sampler's ring is drained; it holds SPAN_SAMPLES_BYTES, about 8,000 samples.
const DRAIN: Duration = Duration::from_millis(50);

/// Samples kept at most, whatever the window (a bound on memory).
const MAX_SAMPLES: usize = 500_000;

struct Sample {
    ts_ns: u64,
    /// An off-CPU episode of this length ending at `ts_ns`; 0 for an on-CPU sample.
    off_ns: u64,
    tgid: u32,
    tid: u32,
    user: Arc<Vec<u64>>,
    kernel: Arc<Vec<u64>>,
    python: Arc<Vec<PyFrame>>,
}

#[derive(Default)]
pub struct Samples {
    samples: VecDeque<Sample>,
    /// Tracked processes running a CPython the sampler walks, with what names their frames.
    pub pythons: HashMap<u32, Interpreter>,
}

pub type SharedSamples = Arc<Mutex<Samples>>;

impl Samples {
    /// The stacks of `tid` (or of all of `pid`'s threads) in the monotonic window [start, end],
    /// in microseconds: an on-CPU sample weighs `period_us`, an off-CPU episode its overlap
    /// with the window.
    pub fn window(
        &self,
        pid: u32,
        tid: Option<u32>,
        (start, end): (u64, u64),
        period_us: u64,
    ) -> Vec<SpanStack> {
        self.samples
            .iter()
            .filter(|s| s.tgid == pid && tid.is_none_or(|t| t == s.tid))
            .filter_map(|s| {
                let weight = if s.off_ns == 0 {
                    (s.ts_ns >= start && s.ts_ns <= end).then_some(period_us)?
                } else {
                    let from = s.ts_ns.saturating_sub(s.off_ns).max(start);
                    let to = s.ts_ns.min(end);
                    (to > from).then(|| (to - from) / 1000)?
                };
                Some(SpanStack {
                    tgid: s.tgid,
                    user: s.user.to_vec(),
                    kernel: s.kernel.to_vec(),
                    python: s.python.to_vec(),
                    off_cpu: s.off_ns != 0,
                    weight,
                })
            })
            .collect()
    }
}

/// Finds the CPython of tracked processes not seen yet, for the sampler to walk their Python
/// frames; forgets the gone. An unsupported Python is profiled with native frames.
fn register_pythons(
    tracked: &SharedTracked,
    finder: &mut Finder,
    seen: &mut HashSet<u32>,
    py_procs: &mut aya::maps::HashMap<MapData, u32, agent_common::python::PyProc>,
    shared: &SharedSamples,
) {
    let pids: HashSet<u32> = tracked
        .read()
        .map(|t| t.keys().copied().collect())
        .unwrap_or_default();
    let new: Vec<u32> = pids.difference(seen).copied().collect();
    let mut found = Vec::new();
    for pid in new {
        seen.insert(pid);
        match finder.inspect(pid) {
            Ok(Some(interp)) => match py_procs.insert(pid, interp.proc, 0) {
                Ok(()) => found.push((pid, interp)),
                Err(e) => tracing::debug!(pid, "span sampler: Python frames not walked: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::debug!(pid, "span sampler: {e}"),
        }
    }
    let gone: Vec<u32> = seen.difference(&pids).copied().collect();
    for pid in &gone {
        seen.remove(pid);
        let _ = py_procs.remove(pid);
    }
    if let Ok(mut s) = shared.lock() {
        for pid in &gone {
            s.pythons.remove(pid);
        }
        s.pythons.extend(found);
    }
}

/// Reads the sampler's ring buffer into the window until the agent stops, and keeps the
/// tracked Python processes registered with it.
pub async fn collect(
    sampler: crate::stacks::SpanSampler,
    tracked: SharedTracked,
    window: Duration,
    shared: SharedSamples,
) {
    let crate::stacks::SpanSampler {
        ring,
        copies: copies_map,
        senders_marked,
        offcpu,
        mut stacks,
        mut py_procs,
        mut py_stacks,
        mut py_line_stacks,
        mut kstacks,
        senders: _,
    } = sampler;
    let mut finder = Finder::default();
    let mut unwinders = Unwinders::default();
    let mut copies: Option<aya::maps::RingBuf<MapData>> = None;
    let mut senders_seen = false;
    // Dropping a link detaches its program: they live as long as this task.
    let mut links: Vec<std::os::fd::OwnedFd> = Vec::new();
    let mut seen = HashSet::new();
    let mut python_scan = tokio::time::interval(Duration::from_secs(1));
    let mut python_frames: HashMap<u64, Arc<Vec<PyFrame>>> = HashMap::new();
    let mut blocked_frames: HashMap<u64, Arc<Vec<u64>>> = HashMap::new();
    // The kernel writes samples without waking us (BPF_RB_NO_WAKEUP): a wakeup per sample cost
    // the agent a context switch each (39 % of a core under process churn, `cargo xtask
    // soak`); the ring is drained on a timer instead. Spans arrive later than that anyway.
    let mut ring = ring;
    let mut drain = tokio::time::interval(DRAIN);
    // Frames per stack id, until the stack map is cleared.
    let mut frames: HashMap<i32, Arc<Vec<u64>>> = HashMap::new();
    let empty = Arc::new(Vec::new());
    let no_python = Arc::new(Vec::new());
    loop {
        tokio::select! {
            _ = drain.tick() => {}
            _ = python_scan.tick() => {
                register_pythons(&tracked, &mut finder, &mut seen, &mut py_procs, &shared);
                unwinders.retain(|pid| seen.contains(&pid));
                for note in unwinders.notes.drain(..) {
                    tracing::debug!("span sampler: {note}");
                }
                continue;
            }
        }
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            batch.extend(ring_record::<SpanSample>(&item));
        }
        // What only span senders need starts with the first of them: the ring of their on-CPU
        // samples' stack copies (their user stacks are unwound here), and their off-CPU
        // episodes' program, which would otherwise run at every switch of every node.
        if !senders_seen && senders_marked.load(std::sync::atomic::Ordering::Relaxed) {
            senders_seen = true;
            match crate::ebpf::map_ring(&copies_map) {
                Ok(ring) => copies = Some(ring),
                Err(e) => tracing::warn!(
                    "cannot map the span sampler's stack copies ({e}): once the ring is full, \
                     span senders' native frames are walked by frame pointers"
                ),
            }
            if let Some(p) = &offcpu {
                match p.attach() {
                    Ok(link) => links.push(link),
                    Err(e) => {
                        tracing::warn!("{e}; span flamegraphs show on-CPU samples only")
                    }
                }
            }
        }
        let mut unwound = Vec::new();
        while let Some(item) = copies.as_mut().and_then(|c| c.next()) {
            if let Some(c) = ring_record::<SpanStackCopy>(&item) {
                let mut user = unwinders.unwind(&c.copy);
                user.reverse();
                unwound.push((c.sample, Arc::new(user)));
            }
        }
        if batch.is_empty() && unwound.is_empty() {
            continue;
        }
        let mut stack = |id: i32| -> Arc<Vec<u64>> {
            if id < 0 {
                return empty.clone();
            }
            frames
                .entry(id)
                .or_insert_with(|| {
                    Arc::new(
                        stacks
                            .get(&(id as u32), 0)
                            .map(|t| t.frames().iter().map(|f| f.ip).rev().collect())
                            .unwrap_or_default(),
                    )
                })
                .clone()
        };
        let mut python = |key: u64| -> Arc<Vec<PyFrame>> {
            if key == 0 {
                return no_python.clone();
            }
            python_frames
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(
                        py_stacks
                            .get(&key, 0)
                            .map(|s| crate::python::frames_of(&s))
                            .unwrap_or_default(),
                    )
                })
                .clone()
        };
        let mut blocked_in = |key: u64| -> Arc<Vec<u64>> {
            blocked_frames
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(
                        kstacks
                            .get(&key, 0)
                            .map(|s| crate::stacks::kernel_frames(&s))
                            .unwrap_or_default(),
                    )
                })
                .clone()
        };
        let mut converted: Vec<Sample> = batch
            .into_iter()
            .map(|s| (s, None))
            .chain(unwound.into_iter().map(|(s, user)| (s, Some(user))))
            .map(|(s, user)| Sample {
                ts_ns: s.ts_ns,
                off_ns: s.off_ns,
                tgid: s.tgid,
                tid: s.tid,
                user: user.unwrap_or_else(|| stack(s.user_stack)),
                kernel: if s.kernel_frames != 0 {
                    blocked_in(s.kernel_frames)
                } else {
                    stack(s.kernel_stack)
                },
                python: python(s.py_stack),
            })
            .collect();
        // Two rings: in time order again, as the window's trimming expects.
        converted.sort_by_key(|s| s.ts_ns);
        // Like the stack map, the Python stacks only fill: cleared before they run out.
        if python_frames.len() as u32 > agent_common::python::PY_STACKS_MAX * 3 / 4 {
            let keys: Vec<u64> = py_stacks.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = py_stacks.remove(&k);
            }
            let _ = py_line_stacks.set(0, 0, 0);
            python_frames.clear();
        }
        if blocked_frames.len() as u32 > SPAN_STACKS_MAX * 3 / 4 {
            let keys: Vec<u64> = kstacks.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = kstacks.remove(&k);
            }
            blocked_frames.clear();
        }
        // The stack map only fills: clear it before it refuses new stacks. Samples already
        // read keep their frames; the few in flight lose theirs.
        if frames.len() as u32 > SPAN_STACKS_MAX * 3 / 4 {
            let ids: Vec<u32> = stacks.stack_ids().filter_map(Result::ok).collect();
            for id in ids {
                let _ = stacks.remove(&id);
            }
            frames.clear();
        }
        let Ok(mut s) = shared.lock() else { return };
        s.samples.extend(converted);
        let horizon = super::history::monotonic_ns().saturating_sub(window.as_nanos() as u64);
        while s
            .samples
            .front()
            .is_some_and(|x| x.ts_ns < horizon || s.samples.len() > MAX_SAMPLES)
        {
            s.samples.pop_front();
        }
    }
}

/// A stored span flamegraph, as `pipeprobe flamegraphs list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub id: String,
    pub bytes: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Nanoseconds, to order files written within one second.
    #[serde(skip)]
    order: u128,
}

/// The flamegraph directory, with its limits.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
    pub max_files: usize,
    pub max_bytes: u64,
}

/// Ids are `TRACEID-SPANID` in hex: nothing else may name a file here.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

impl Store {
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.svg"))
    }

    /// Writes `svg` as `id`, then removes the oldest files past the limits.
    ///
    /// The file is written aside and renamed, so a volume that fills mid-write leaves no
    /// truncated flamegraph to be served. A full volume (ENOSPC, EDQUOT) is made room on by
    /// removing this store's oldest flamegraphs: the newest win, as within the limits, also
    /// when the volume is smaller than `max_bytes`.
    pub fn save(&self, id: &str, svg: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let mut written = std::fs::write(&tmp, svg);
        if written.as_ref().is_err_and(volume_full) && self.can_make_room(id, svg.len() as u64) {
            while written.as_ref().is_err_and(volume_full) && self.remove_oldest(id) {
                written = std::fs::write(&tmp, svg);
            }
        }
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, self.path(id))) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let mut all = self.list();
        all.sort_by_key(|e| (e.order, e.id.clone()));
        let mut total: u64 = all.iter().map(|e| e.bytes).sum();
        let mut count = all.len();
        for e in all {
            if count <= self.max_files && total <= self.max_bytes {
                break;
            }
            if e.id == id {
                continue;
            }
            let _ = std::fs::remove_file(self.path(&e.id));
            count -= 1;
            total -= e.bytes;
        }
        Ok(())
    }

    /// Whether removing this store's flamegraphs (but `keep`) could free `need` bytes: when
    /// something else filled the volume, ours are not deleted in vain.
    fn can_make_room(&self, keep: &str, need: u64) -> bool {
        let ours: u64 = self
            .list()
            .iter()
            .filter(|e| e.id != keep)
            .map(|e| e.bytes)
            .sum();
        free_bytes(&self.dir).saturating_add(ours) >= need
    }

    /// Removes the oldest flamegraph other than `keep`; false when there is none.
    fn remove_oldest(&self, keep: &str) -> bool {
        self.list()
            .into_iter()
            .find(|e| e.id != keep)
            .is_some_and(|e| std::fs::remove_file(self.path(&e.id)).is_ok())
    }

    pub fn list(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<Entry> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".svg")?.to_owned();
                let meta = e.metadata().ok()?;
                let modified = meta
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?;
                valid_id(&name).then_some(Entry {
                    id: name,
                    bytes: meta.len(),
                    created: modified.as_secs(),
                    order: modified.as_nanos(),
                })
            })
            .collect();
        v.sort_by_key(|e| (e.order, e.id.clone()));
        v
    }

    pub fn get(&self, id: &str) -> Option<String> {
        valid_id(id)
            .then(|| std::fs::read_to_string(self.path(id)).ok())
            .flatten()
    }
}

/// What decides and draws span flamegraphs.
pub struct SpanFlamegraphs {
    pub samples: SharedSamples,
    pub store: Store,
    pub threshold: Duration,
    /// Per span name.
    pub thresholds: HashMap<String, Duration>,
    pub hz: u64,
    pub drawer: Drawer,
    /// When each (service, span name) last got one.
    pub last: std::sync::Mutex<HashMap<(String, String), std::time::Instant>>,
    /// The threads whose off-CPU time the kernel records (None: off-CPU is off).
    pub senders: Option<Mutex<Senders>>,
}

/// The processes that sent a span lately: only their threads' blocking switches take off-CPU
/// stacks in the kernel (`SPAN_SENDERS`, LRU-bounded, each entry fresh for
/// `SPAN_SENDER_TTL_NS`). A process's first span comes before its mark, so it has on-CPU
/// samples only.
pub struct Senders {
    map: aya::maps::HashMap<MapData, u32, u64>,
    /// Set at the first mark: the span sampler maps its stack copies' ring then.
    marked: Arc<std::sync::atomic::AtomicBool>,
    /// When each was last written, not to write the map per span.
    written: HashMap<u32, u64>,
}

impl Senders {
    pub fn new(
        map: aya::maps::HashMap<MapData, u32, u64>,
        marked: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            map,
            marked,
            written: HashMap::new(),
        }
    }

    /// Process `pid` sent a span now.
    pub fn mark(&mut self, pid: u32) {
        use agent_common::stacks::{SPAN_SENDER_REFRESH_NS, SPAN_SENDER_TTL_NS, SPAN_SENDERS_MAX};
        let now = super::history::monotonic_ns();
        if self
            .written
            .get(&pid)
            .is_some_and(|t| now.saturating_sub(*t) < SPAN_SENDER_REFRESH_NS)
        {
            return;
        }
        if let Err(e) = self.map.insert(pid, now, 0) {
            tracing::debug!(pid, "cannot mark a span sender: {e}");
            return;
        }
        self.marked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // Bounded like the kernel's LRU: drop what is long stale.
        if self.written.len() >= SPAN_SENDERS_MAX as usize {
            self.written
                .retain(|_, t| now.saturating_sub(*t) < SPAN_SENDER_TTL_NS);
        }
        self.written.insert(pid, now);
    }
}

/// At most one flamegraph per (service, span name) this often: a burst of slow spans gets a
/// representative few, not one each (the rest keep their exemplar's trace id).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

impl SpanFlamegraphs {
    pub fn threshold(&self, span: &str) -> Duration {
        self.thresholds.get(span).copied().unwrap_or(self.threshold)
    }

    /// Whether a slow span of (service, span) gets a flamegraph now (and notes that it does).
    pub fn due(&self, service: &str, span: &str) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        let key = (service.to_owned(), span.to_owned());
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < MIN_INTERVAL)
        {
            return false;
        }
        last.insert(key, now);
        true
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The one thread that draws span flamegraphs, so its symbolizer's caches last; a bounded
/// queue, a job that does not fit is dropped (the span keeps its trace id).
pub struct Drawer {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

impl Drawer {
    pub fn start() -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(8);
        std::thread::Builder::new()
            .name("pipeprobe-flamegraphs".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Self { jobs })
    }

    /// Draws and stores on the drawing thread; None when the queue is full or nothing drew.
    pub async fn draw(
        &self,
        store: Store,
        id: String,
        title: String,
        samples: Vec<SpanStack>,
        pythons: HashMap<u32, Interpreter>,
    ) -> Option<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(draw(&store, &id, &title, samples, &pythons));
        });
        self.jobs.try_send(job).ok()?;
        rx.await.ok().flatten()
    }
}

/// Draws and stores the flamegraph of one span; its id, or None without samples.
pub fn draw(
    store: &Store,
    id: &str,
    title: &str,
    samples: Vec<SpanStack>,
    pythons: &HashMap<u32, Interpreter>,
) -> Option<String> {
    if samples.is_empty() {
        return None;
    }
    let capture = crate::stacks::fold_samples(samples, pythons);
    let svg = crate::flamegraph::svg(title, None, "us", &capture.folded()).ok()?;
    // One line when storing starts failing and one when it works again, not one per span.
    static FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match store.save(id, &svg) {
        Ok(()) => {
            if FAILING.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(dir = %store.dir.display(), "span flamegraphs are stored again");
            }
            Some(id.to_owned())
        }
        Err(e) => {
            if !FAILING.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    dir = %store.dir.display(),
                    "cannot store a span flamegraph: {e}; slow spans go without one (the spans \
                     are still enriched and forwarded) until a flamegraph can be stored again"
                );
            }
            None
        }
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s volume (0 when unknown).
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type; read only on success.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: statvfs succeeded and filled it.
    let st = unsafe { st.assume_init() };
    st.f_bavail.saturating_mul(st.f_frsize)
}

/// The error of a volume out of space or quota.
fn volume_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The directory of `path` exists or can be made.
pub fn usable(path: &Path) -> bool {
    std::fs::create_dir_all(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_its_limits_and_refuses_odd_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store {
            dir: dir.path().join("fg"),
            max_files: 2,
            max_bytes: 1 << 20,
        };
        for id in ["aa-01", "bb-02", "cc-03"] {
            store.save(id, b"<svg/>").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let ids: Vec<String> = store.list().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, vec!["bb-02", "cc-03"]);
        assert_eq!(store.get("cc-03").as_deref(), Some("<svg/>"));
        assert!(store.get("../etc/passwd").is_none());
        assert!(!valid_id("a/b") && valid_id("0af3-19"));
    }

    /// A tmpfs of 64 KiB, unmounted when dropped.
    struct SmallVolume(tempfile::TempDir);

    impl SmallVolume {
        fn mount() -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Self(dir))
        }
    }

    impl Drop for SmallVolume {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    fn svg_of(n: usize, tag: u8) -> Vec<u8> {
        let mut v = b"<svg>".to_vec();
        v.resize(n - 6, b'a' + tag % 26);
        v.extend_from_slice(b"</svg>");
        v
    }

    #[test]
    fn a_full_volume_keeps_the_newest_flamegraphs_whole_and_spares_ours_for_nothing() {
        let Some(vol) = SmallVolume::mount() else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
            return;
        };
        // Limits far above the volume: only the volume's size stops the store.
        let store = Store {
            dir: vol.0.path().join("fg"),
            max_files: 1000,
            max_bytes: 64 << 20,
        };
        let ids: Vec<String> = (0..20).map(|i| format!("{i:04x}-01")).collect();
        for (i, id) in ids.iter().enumerate() {
            store
                .save(id, &svg_of(10_000, i as u8))
                .unwrap_or_else(|e| panic!("save {id} on a full volume: {e}"));
            std::thread::sleep(Duration::from_millis(5));
        }
        let kept: Vec<String> = store.list().into_iter().map(|e| e.id).collect();
        assert!(
            kept.len() >= 3 && kept.len() < 7,
            "64 KiB holds 3 to 6 of 10 kB: {kept:?}"
        );
        assert_eq!(kept, ids[ids.len() - kept.len()..], "the newest are kept");
        for id in &kept {
            let body = store.get(id).unwrap();
            assert!(
                body.len() == 10_000 && body.ends_with("</svg>"),
                "{id} is not whole"
            );
        }
        let names: Vec<String> = std::fs::read_dir(&store.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n.ends_with(".svg")),
            "left behind: {names:?}"
        );

        // Something else fills the rest of the volume: a flamegraph that removing ours could
        // not make room for fails whole, and ours stay.
        let filler = vol.0.path().join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 1 << 20]);
        let before = store.list();
        let e = store.save("ffff-02", &svg_of(200_000, 1)).unwrap_err();
        assert!(volume_full(&e), "{e}");
        assert_eq!(
            store.list().len(),
            before.len(),
            "ours were removed for nothing"
        );
        assert!(
            store.get("ffff-02").is_none(),
            "a truncated flamegraph is served"
        );
        // One that fits once the oldest of ours is gone takes its place.
        store.save("ffff-02", &svg_of(10_000, 1)).unwrap();
        assert!(store.get(&before[0].id).is_none(), "the oldest made room");
        assert_eq!(store.get("ffff-02").map(|b| b.len()), Some(10_000));
    }
}
