//! The pprof format (`profile.proto`, gzipped) that `go tool pprof`, Pyroscope and Parca read,
//! built from folded stacks. The messages are the subset of profile.proto the output uses,
//! declared with prost's derive rather than generated from the .proto at build time.
use std::{collections::HashMap, io::Write as _, time::Duration};

use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// `(function, file, line)` of a frame named `function (file:line)`, as Python frames are.
fn source_of(frame: &str) -> Option<(&str, &str, i64)> {
    let body = frame.strip_suffix(')')?;
    let (function, place) = body.rsplit_once(" (")?;
    let (file, line) = place.rsplit_once(':')?;
    Some((function, file, line.parse().ok()?))
}

#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    locations: HashMap<String, u64>,
    /// Function ids by (name, file): the lines of one Python function are one function.
    functions: HashMap<(i64, i64), u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    /// One location per distinct frame name; one function per function name and file.
    fn location(&mut self, frame: &str) -> u64 {
        if let Some(id) = self.locations.get(frame) {
            return *id;
        }
        let id = self.profile.location.len() as u64 + 1;
        // Python frames carry their source: pprof shows the function name alone, with the file
        // and line where tools expect them (`-lines` splits a function by line). The line is
        // the frame's current one, so the function's first line is left unknown (0).
        let (name, filename, line) = match source_of(frame) {
            Some((function, file, line)) => (self.string(function), self.string(file), line),
            None => (self.string(frame), 0, 0),
        };
        let next = self.profile.function.len() as u64 + 1;
        let function_id = *self.functions.entry((name, filename)).or_insert(next);
        if function_id == next {
            self.profile.function.push(Function {
                id: function_id,
                name,
                system_name: name,
                filename,
                start_line: 0,
            });
        }
        self.profile.location.push(Location {
            id,
            line: vec![Line { function_id, line }],
        });
        self.locations.insert(frame.to_owned(), id);
        id
    }
}

/// What the folded counts are.
#[derive(Debug, Clone, Copy)]
pub enum Weights {
    /// CPU samples taken at `hz`.
    CpuSamples { hz: u64 },
    /// Nanoseconds of the named kind (off-CPU, in syscalls).
    Nanos(&'static str),
}

/// A gzipped pprof profile of folded stacks captured over `duration`. CPU samples carry two
/// values, the count and the CPU time it stands for; the others carry their nanoseconds.
pub fn from_folded(folded: &str, weights: Weights, duration: Duration) -> std::io::Result<Vec<u8>> {
    let mut b = Builder::default();
    b.string("");
    let ns = b.string("nanoseconds");
    let period = match weights {
        Weights::CpuSamples { hz } => {
            let (samples, count, cpu) = (b.string("samples"), b.string("count"), b.string("cpu"));
            b.profile.sample_type = vec![
                ValueType {
                    r#type: samples,
                    unit: count,
                },
                ValueType {
                    r#type: cpu,
                    unit: ns,
                },
            ];
            b.profile.period_type = Some(ValueType {
                r#type: cpu,
                unit: ns,
            });
            1_000_000_000 / hz.max(1) as i64
        }
        Weights::Nanos(kind) => {
            let offcpu = b.string(kind);
            b.profile.sample_type = vec![ValueType {
                r#type: offcpu,
                unit: ns,
            }];
            b.profile.period_type = Some(ValueType {
                r#type: offcpu,
                unit: ns,
            });
            1
        }
    };
    b.profile.period = period;
    b.profile.duration_nanos = duration.as_nanos() as i64;
    b.profile.time_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    for line in folded.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<i64>() else { continue };
        let mut ids: Vec<u64> = stack.split(';').map(|f| b.location(f)).collect();
        ids.reverse();
        let value = match weights {
            Weights::CpuSamples { .. } => vec![n, n * period],
            Weights::Nanos(_) => vec![n],
        };
        b.profile.sample.push(Sample {
            location_id: ids,
            value,
        });
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&b.profile.encode_to_vec())?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn round_trips() {
        let folded = "app;42;main;hot_a 30\napp;42;main;hot_b 10\n";
        let gz = from_folded(
            folded,
            Weights::CpuSamples { hz: 100 },
            Duration::from_secs(2),
        )
        .unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        let p = Profile::decode(&raw[..]).unwrap();
        assert_eq!(p.sample.len(), 2);
        assert_eq!(p.period, 10_000_000);
        assert_eq!(p.duration_nanos, 2_000_000_000);
        // Leaf first: hot_a, then main, then the pid and process roots.
        let name = |loc: u64| {
            let f = p.location[(loc - 1) as usize].line[0].function_id;
            p.string_table[p.function[(f - 1) as usize].name as usize].clone()
        };
        let first = &p.sample[0];
        assert_eq!(name(first.location_id[0]), "hot_a");
        assert_eq!(name(*first.location_id.last().unwrap()), "app");
        assert_eq!(first.value, vec![30, 300_000_000]);
        // Shared frames are one location.
        assert_eq!(p.location.len(), 5);
    }

    #[test]
    fn python_frames_carry_file_and_line() {
        assert_eq!(
            source_of("Model.forward (torch/nn/module.py:1501)"),
            Some(("Model.forward", "torch/nn/module.py", 1501))
        );
        assert_eq!(source_of("std::vector<int>::push_back(int const&)"), None);
        assert_eq!(source_of("[unknown] libz.so+0x10"), None);
        let gz = from_folded(
            "python3;7;main (app.py:3);hot_a (app.py:10) 5\npython3;7;main (app.py:3);hot_a (app.py:11) 2\n",
            Weights::CpuSamples { hz: 99 },
            Duration::from_secs(1),
        )
        .unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        let p = Profile::decode(&raw[..]).unwrap();
        let leaf = |sample: usize| {
            let loc = &p.location[(p.sample[sample].location_id[0] - 1) as usize];
            (
                &p.function[(loc.line[0].function_id - 1) as usize],
                loc.line[0].line,
            )
        };
        let (f, line) = leaf(0);
        assert_eq!(p.string_table[f.name as usize], "hot_a");
        assert_eq!(p.string_table[f.filename as usize], "app.py");
        assert_eq!(line, 10);
        // Two lines of one function: two locations, one function.
        let (g, line) = leaf(1);
        assert_eq!((g.id, line), (f.id, 11));
        assert_eq!(p.function.len(), 4);
    }
}
