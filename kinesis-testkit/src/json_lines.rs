//! The JSON lines a child process prints (the Java programs of `interop/java`, a worker process of
//! a test or a benchmark), collected by a thread as they arrive.

use serde_json::Value;
use std::io::{BufRead as _, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Lines read so far from a child's output, each parsed as JSON (a line that is not JSON is kept
/// as a JSON string). Reading stops at end of file.
#[derive(Debug)]
pub struct JsonLines {
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<JoinHandle<()>>,
}

impl JsonLines {
    /// Starts a thread that reads `source` (a child's `stdout`) line by line until it ends.
    pub fn collect(source: impl Read + Send + 'static) -> JsonLines {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str::<Value>(&line).unwrap_or(Value::String(line));
                sink.lock().expect("lines").push(value);
            }
        });
        JsonLines { lines, reader: Some(reader) }
    }

    /// Runs `f` on the lines read so far, without copying them (for checks polled often).
    pub fn with<R>(&self, f: impl FnOnce(&[Value]) -> R) -> R {
        f(&self.lines.lock().expect("lines"))
    }

    /// A copy of every line read so far.
    pub fn snapshot(&self) -> Vec<Value> {
        self.with(<[Value]>::to_vec)
    }

    /// The lines whose `"event"` is `event`.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.with(|lines| lines.iter().filter(|v| v["event"] == event).cloned().collect())
    }

    /// How many lines have `"event"` equal to `event`.
    pub fn count(&self, event: &str) -> usize {
        self.with(|lines| lines.iter().filter(|v| v["event"] == event).count())
    }

    /// Waits until the source has ended (the child closed its output) and every line is read.
    pub fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_parsed_as_they_come_and_the_others_kept_as_strings() {
        let source =
            std::io::Cursor::new(&b"{\"event\":\"record\",\"n\":1}\nnot json\n{\"event\":\"record\",\"n\":2}\n"[..]);
        let mut lines = JsonLines::collect(source);
        lines.finish();
        assert_eq!(lines.count("record"), 2);
        assert_eq!(lines.events("record")[1]["n"], 2);
        assert_eq!(lines.snapshot()[1], Value::String("not json".into()));
        assert_eq!(lines.with(<[Value]>::len), 3);
    }
}
