//! `pipeprobe top`: a live per-target summary read from the agent's own `/metrics`, for a
//! terminal (`kubectl exec ... pipeprobe top`) and for `cargo xtask demo`.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TopError {
    #[error("invalid metrics URL `{url}`: expected http://HOST:PORT/PATH")]
    Url { url: String },
    #[error("cannot fetch {url}: {source} (is `pipeprobe agent` running and listening there?)")]
    Fetch {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} answered `{status}`")]
    Status { url: String, status: String },
}

/// Fetches a page over plain HTTP/1.0 (the agent's endpoint is local and unauthenticated).
pub fn fetch(url: &str) -> Result<String, TopError> {
    let bad = || TopError::Url {
        url: url.to_owned(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (hostport, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let io = |source| TopError::Fetch {
        url: url.to_owned(),
        source,
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(bad)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nAccept: text/plain\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(TopError::Status {
            url: url.to_owned(),
            status: status.to_owned(),
        });
    }
    Ok(body.to_owned())
}

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the samples of a text exposition (classic or OpenMetrics); comments are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (n, r) = line.split_once(' ')?;
            (n, BTreeMap::new(), r)
        }
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim().to_owned(), value);
    }
}

/// A histogram series: cumulative `(le, count)` buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Histogram `name` summed over every series whose labels include `label = value` (one
    /// series, or e.g. all syscalls of a target).
    pub fn find(samples: &[Sample], name: &str, label: &str, value: &str) -> Option<Self> {
        Self::find_where(samples, name, |s| {
            s.labels.get(label).is_some_and(|v| v == value)
        })
    }

    /// Histogram `name` summed over every series `has` accepts.
    pub fn find_where(
        samples: &[Sample],
        name: &str,
        has: impl Fn(&Sample) -> bool,
    ) -> Option<Self> {
        let bucket_name = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == bucket_name && has(s)) {
            let le = match s.labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                None => continue,
            };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
        }
        if by_le.is_empty() {
            return None;
        }
        let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let sum_of = |suffix: &str| {
            let n = format!("{name}_{suffix}");
            samples
                .iter()
                .filter(|s| s.name == n && has(s))
                .map(|s| s.value)
                .sum()
        };
        Some(Self {
            buckets,
            sum: sum_of("sum"),
            count: sum_of("count"),
        })
    }

    /// What was observed since `earlier` (counters only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|((le, a), (_, b))| (*le, (a - b).max(0.0)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// Index of the first bucket holding quantile `q` (as Prometheus picks it).
    pub fn bucket_of(&self, q: f64) -> Option<usize> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        self.buckets.iter().position(|(_, c)| *c >= rank)
    }

    /// Quantile `q` by linear interpolation inside its bucket, like PromQL `histogram_quantile`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let i = self.bucket_of(q)?;
        let rank = q * self.buckets.last()?.1;
        let (le, count) = self.buckets[i];
        let (lower, below) = if i == 0 {
            (0.0, 0.0)
        } else {
            self.buckets[i - 1]
        };
        if le.is_infinite() {
            return Some(lower);
        }
        let in_bucket = count - below;
        Some(if in_bucket <= 0.0 {
            le
        } else {
            lower + (le - lower) * (rank - below) / in_bucket
        })
    }
}

/// Human form of a duration in seconds.
pub fn fmt_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1}us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

const RUNQ: &str = "pipeprobe_sched_runqueue_delay_seconds";
const SYSCALLS: &str = "pipeprobe_syscall_duration_seconds";
const SYSCALL_ERRORS: &str = "pipeprobe_syscall_errors_total";
const CONNECT: &str = "pipeprobe_tcp_connect_duration_seconds";
const RTT: &str = "pipeprobe_tcp_rtt_seconds";
const RETRANSMITS: &str = "pipeprobe_tcp_retransmits_total";

/// Sum of counter `name` over the series of `target`.
fn counter(samples: &[Sample], name: &str, target: &str) -> Option<f64> {
    let mut found = false;
    let sum = samples
        .iter()
        .filter(|s| s.name == name && s.labels.get("target").is_some_and(|t| t == target))
        .inspect(|_| found = true)
        .map(|s| s.value)
        .sum();
    found.then_some(sum)
}

/// One window of one target: what happened since `earlier` (or since start).
struct Window<'a> {
    now: &'a [Sample],
    earlier: Option<&'a [Sample]>,
    secs: f64,
    target: &'a str,
}

impl Window<'_> {
    fn hist(&self, name: &str) -> Option<Histogram> {
        let h = Histogram::find(self.now, name, "target", self.target)?;
        Some(
            match self
                .earlier
                .and_then(|e| Histogram::find(e, name, "target", self.target))
            {
                Some(e) => h.since(&e),
                None => h,
            },
        )
    }

    fn rate(&self, name: &str) -> String {
        match self.hist(name) {
            Some(h) => format!("{:.0}", h.count / self.secs.max(1e-3)),
            None => "n/a".into(),
        }
    }

    fn quantile(&self, name: &str, q: f64) -> String {
        match self.hist(name) {
            Some(h) => h.quantile(q).map_or("-".into(), fmt_secs),
            None => "n/a".into(),
        }
    }

    fn counter_rate(&self, name: &str) -> String {
        let Some(now) = counter(self.now, name, self.target) else {
            return "n/a".into();
        };
        let before = self
            .earlier
            .and_then(|e| counter(e, name, self.target))
            .unwrap_or(0.0);
        format!("{:.0}", (now - before).max(0.0) / self.secs.max(1e-3))
    }
}

/// The summary table for one window (`earlier` = the previous scrape, if any); `n/a` where the
/// probe is not attached.
pub fn summary(now: &[Sample], earlier: Option<&[Sample]>, window_secs: f64) -> String {
    let mut targets: Vec<(&str, f64)> = now
        .iter()
        .filter(|s| s.name == "pipeprobe_target_processes")
        .filter_map(|s| Some((s.labels.get("target")?.as_str(), s.value)))
        .collect();
    targets.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = format!(
        "{:<14} {:>5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>6}\n",
        "TARGET",
        "PROCS",
        "RUNQ p50",
        "RUNQ p99",
        "SYSCALL/s",
        "SYS p99",
        "ERR/s",
        "CONN p99",
        "RTT p50",
        "RETX/s"
    );
    for (target, procs) in targets {
        let w = Window {
            now,
            earlier,
            secs: window_secs,
            target,
        };
        out += &format!(
            "{target:<14} {procs:>5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>6}\n",
            w.quantile(RUNQ, 0.5),
            w.quantile(RUNQ, 0.99),
            w.rate(SYSCALLS),
            w.quantile(SYSCALLS, 0.99),
            w.counter_rate(SYSCALL_ERRORS),
            w.quantile(CONNECT, 0.99),
            w.quantile(RTT, 0.5),
            w.counter_rate(RETRANSMITS),
        );
    }
    out + &span_rows(now, earlier)
}

/// Per (service, span) received over OTLP in the window: count, duration p50/p99, and the mean
/// kernel breakdown of those spans. Empty when no span arrived yet.
fn span_rows(now: &[Sample], earlier: Option<&[Sample]>) -> String {
    const DURATION: &str = "pipeprobe_span_duration_seconds";
    let mut keys: Vec<(String, String)> = now
        .iter()
        .filter(|s| s.name == "pipeprobe_span_duration_seconds_count")
        .filter_map(|s| {
            Some((
                s.labels.get("service")?.clone(),
                s.labels.get("span")?.clone(),
            ))
        })
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{:<10} {:<18} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "SERVICE", "SPAN", "SPANS", "DUR p50", "DUR p99", "RUNQ avg", "OFFCPU avg", "SYS avg"
    );
    for (service, span) in keys {
        let of = |s: &Sample| {
            s.labels.get("service") == Some(&service) && s.labels.get("span") == Some(&span)
        };
        let window = |name: &str| {
            let h = Histogram::find_where(now, name, of)?;
            Some(
                match earlier.and_then(|e| Histogram::find_where(e, name, of)) {
                    Some(before) => h.since(&before),
                    None => h,
                },
            )
        };
        let Some(d) = window(DURATION) else { continue };
        let mean = |name: &str| {
            window(name)
                .filter(|h| h.count > 0.0)
                .map_or("-".into(), |h| fmt_secs(h.sum / h.count))
        };
        out += &format!(
            "{service:<10} {span:<18} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            d.count,
            d.quantile(0.5).map_or("-".into(), fmt_secs),
            d.quantile(0.99).map_or("-".into(), fmt_secs),
            mean("pipeprobe_span_runqueue_delay_seconds"),
            mean("pipeprobe_span_offcpu_seconds"),
            mean("pipeprobe_span_syscall_seconds"),
        );
    }
    out
}

/// Prints the summary every `interval` (the first one covers everything since the agent started).
pub fn run(url: &str, interval: Duration, count: Option<u64>) -> Result<(), TopError> {
    let mut previous: Option<(Vec<Sample>, std::time::Instant)> = None;
    let mut printed = 0u64;
    loop {
        let now = parse(&fetch(url)?);
        let at = std::time::Instant::now();
        let (earlier, window) = match &previous {
            Some((s, t)) => (Some(s.as_slice()), at.duration_since(*t).as_secs_f64()),
            None => (None, 1.0),
        };
        let when = if earlier.is_some() {
            format!("last {window:.1}s")
        } else {
            "since agent start".into()
        };
        println!("--- {url} ({when})\n{}", summary(&now, earlier, window));
        previous = Some((now, at));
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP x y
pipeprobe_target_processes{target="stt"} 2
pipeprobe_sched_runqueue_delay_seconds_sum{target="stt"} 0.5
pipeprobe_sched_runqueue_delay_seconds_count{target="stt"} 100
pipeprobe_sched_runqueue_delay_seconds_bucket{target="stt",le="0.000001"} 10
pipeprobe_sched_runqueue_delay_seconds_bucket{target="stt",le="0.000002"} 50
pipeprobe_sched_runqueue_delay_seconds_bucket{target="stt",le="0.000004"} 98
pipeprobe_sched_runqueue_delay_seconds_bucket{target="stt",le="+Inf"} 100
odd_labels{a="x\"y",b="c,d"} 1
"#;

    #[test]
    fn spans_get_a_row_per_service_and_span() {
        let text = "pipeprobe_span_duration_seconds_bucket{service=\"tts\",span=\"synth\",le=\"0.1\"} 1\n\
                    pipeprobe_span_duration_seconds_bucket{service=\"tts\",span=\"synth\",le=\"0.2\"} 2\n\
                    pipeprobe_span_duration_seconds_bucket{service=\"tts\",span=\"synth\",le=\"+Inf\"} 2\n\
                    pipeprobe_span_duration_seconds_sum{service=\"tts\",span=\"synth\"} 0.25\n\
                    pipeprobe_span_duration_seconds_count{service=\"tts\",span=\"synth\"} 2\n\
                    pipeprobe_span_offcpu_seconds_bucket{service=\"tts\",span=\"synth\",le=\"+Inf\"} 2\n\
                    pipeprobe_span_offcpu_seconds_sum{service=\"tts\",span=\"synth\"} 0.1\n\
                    pipeprobe_span_offcpu_seconds_count{service=\"tts\",span=\"synth\"} 2\n";
        let rows = span_rows(&parse(text), None);
        let line = rows.lines().find(|l| l.starts_with("tts")).unwrap();
        assert!(line.contains("synth") && line.contains(" 2 "), "{rows}");
        // Mean off-CPU time of the two spans: 50 ms.
        assert!(line.contains("50.00ms"), "{rows}");
        assert_eq!(span_rows(&parse(TEXT), None), "");
    }

    #[test]
    fn parses_samples_and_escapes() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 8);
        let odd = s.iter().find(|s| s.name == "odd_labels").unwrap();
        assert_eq!(odd.labels["a"], "x\"y");
        assert_eq!(odd.labels["b"], "c,d");
    }

    #[test]
    fn quantiles_like_promql() {
        let s = parse(TEXT);
        let h = Histogram::find(&s, RUNQ, "target", "stt").unwrap();
        assert_eq!(h.count, 100.0);
        assert_eq!(h.bucket_of(0.5), Some(1));
        // p50: rank 50 is the top of the (1us, 2us] bucket.
        assert!((h.quantile(0.5).unwrap() - 2e-6).abs() < 1e-12);
        // p99 is in +Inf: reported as the highest finite bound.
        assert!((h.quantile(0.99).unwrap() - 4e-6).abs() < 1e-12);
        let d = h.since(&h);
        assert_eq!(d.count, 0.0);
        assert_eq!(d.bucket_of(0.5), None);
    }

    #[test]
    fn histograms_sum_across_series() {
        let text = "h_bucket{target=\"a\",syscall=\"read\",le=\"1\"} 1\nh_bucket{target=\"a\",syscall=\"read\",le=\"+Inf\"} 2\n\
                    h_bucket{target=\"a\",syscall=\"write\",le=\"1\"} 3\nh_bucket{target=\"a\",syscall=\"write\",le=\"+Inf\"} 3\n\
                    h_count{target=\"a\",syscall=\"read\"} 2\nh_count{target=\"a\",syscall=\"write\"} 3\n";
        let h = Histogram::find(&parse(text), "h", "target", "a").unwrap();
        assert_eq!(h.buckets, vec![(1.0, 4.0), (f64::INFINITY, 5.0)]);
        assert_eq!(h.count, 5.0);
    }

    #[test]
    fn summary_has_a_row_per_target() {
        let s = parse(TEXT);
        let out = summary(&s, None, 1.0);
        assert!(out.contains("stt") && out.contains("2.0us"), "{out}");
        // Probes whose metrics are absent show n/a, not zero.
        assert!(out.contains("n/a"), "{out}");
    }

    #[test]
    fn fetch_errors_are_clear() {
        let e = fetch("ftp://x").unwrap_err().to_string();
        assert!(e.contains("http://HOST:PORT"), "{e}");
        let e = fetch("http://127.0.0.1:1/metrics").unwrap_err().to_string();
        assert!(e.contains("is `pipeprobe agent` running"), "{e}");
    }
}
