//! A child's output, bounded: its head and its tail kept in memory within a budget, the
//! whole of it (up to the log's own limit) streamed to a log file as it arrives.
//!
//! Output comes from instances, and an instance may print without end: nothing here ever
//! holds more than the budget, whatever arrives. Owns no process: the steps read their
//! children's pipes into it. Owns the log directories' rules too: private files, each
//! bounded, the oldest removed beyond a count.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncReadExt as _};

const CHUNK: usize = 64 * 1024;

/// The first and the last bytes of a stream, within `budget` bytes together.
#[derive(Debug)]
pub struct HeadTail {
    head: Vec<u8>,
    head_max: usize,
    tail: VecDeque<u8>,
    tail_max: usize,
    total: u64,
}

impl HeadTail {
    pub fn new(budget: usize) -> HeadTail {
        let head_max = budget / 2;
        HeadTail {
            head: Vec::new(),
            head_max,
            tail: VecDeque::new(),
            tail_max: budget - head_max,
            total: 0,
        }
    }

    pub fn push(&mut self, mut buf: &[u8]) {
        self.total += buf.len() as u64;
        let room = self.head_max - self.head.len();
        if room > 0 {
            let n = room.min(buf.len());
            self.head.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
        }
        if buf.len() >= self.tail_max {
            self.tail.clear();
            buf = &buf[buf.len() - self.tail_max..];
        }
        let over = (self.tail.len() + buf.len()).saturating_sub(self.tail_max);
        self.tail.drain(..over);
        self.tail.extend(buf);
    }

    /// Every byte that arrived, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes that arrived but were not kept.
    pub fn omitted(&self) -> u64 {
        self.total - (self.head.len() + self.tail.len()) as u64
    }

    /// What was kept, with a line marking what was left out between head and tail.
    pub fn text(&self) -> String {
        let head = String::from_utf8_lossy(&self.head);
        let (a, b) = self.tail.as_slices();
        let tail = String::from_utf8_lossy(&[a, b].concat()).into_owned();
        match self.omitted() {
            0 => format!("{head}{tail}"),
            n => format!("{head}\n[… {n} bytes of output left out …]\n{tail}"),
        }
    }
}

/// A log file that takes at most `max` bytes, then notes once that it stopped.
pub struct LogSink {
    file: std::fs::File,
    left: u64,
    cut: bool,
}

impl LogSink {
    pub fn new(file: std::fs::File, max: u64) -> LogSink {
        LogSink {
            file,
            left: max,
            cut: false,
        }
    }

    pub fn write(&mut self, buf: &[u8]) {
        let n = (buf.len() as u64).min(self.left) as usize;
        if n > 0 && self.file.write_all(&buf[..n]).is_ok() {
            self.left -= n as u64;
        }
        if n < buf.len() && !self.cut {
            self.cut = true;
            let _ = self
                .file
                .write_all(b"\n[log truncated at its size limit]\n");
        }
    }

    /// A section header or a summary line, counted like the output.
    pub fn note(&mut self, text: &str) {
        self.write(text.as_bytes());
    }
}

/// A directory of run logs (0700, files 0600): each at most `max` bytes, the newest `keep`
/// kept. File names start with a millisecond timestamp, so sorting them sorts by age.
pub struct LogDir {
    dir: PathBuf,
    max: u64,
    keep: usize,
}

impl LogDir {
    pub fn create(dir: PathBuf, max: u64, keep: usize) -> std::io::Result<LogDir> {
        crate::secret::create_private_dir(&dir)?;
        Ok(LogDir { dir, max, keep })
    }

    /// A new log named `<now>-<name>.log`, starting with `header`, and the oldest logs
    /// beyond `keep` removed. Returns its path (for the history) and the sink. A log that
    /// cannot be written is said once and the output goes nowhere.
    pub fn open(&self, name: &str, header: &str) -> (String, Mutex<LogSink>) {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let path = self
            .dir
            .join(format!("{stamp}-{}.log", name.replace('/', "_")));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .or_else(|e| {
                tracing::warn!(error = %e, path = %path.display(), "cannot write the run's log");
                std::fs::OpenOptions::new().write(true).open("/dev/null")
            })
            .expect("/dev/null opens");
        let mut sink = LogSink::new(file, self.max);
        sink.note(header);
        self.prune();
        (path.display().to_string(), Mutex::new(sink))
    }

    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        if names.len() <= self.keep {
            return;
        }
        names.sort();
        for p in &names[..names.len() - self.keep] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads `r` to its end into `keep`, copying every chunk to `sink` as it arrives.
pub async fn drain<R>(
    mut r: R,
    keep: &mut HeadTail,
    mut sink: Option<&Mutex<LogSink>>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        keep.push(&buf[..n]);
        if let Some(s) = sink.as_mut() {
            s.lock().unwrap().write(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_output_is_kept_whole() {
        let mut k = HeadTail::new(100);
        k.push(b"hello ");
        k.push(b"world");
        assert_eq!(k.text(), "hello world");
        assert_eq!((k.total(), k.omitted()), (11, 0));
    }

    #[test]
    fn large_output_keeps_head_and_tail_within_the_budget() {
        let mut k = HeadTail::new(20);
        for i in 0..1000u32 {
            k.push(format!("{i:04}\n").as_bytes());
        }
        assert_eq!(k.total(), 5000);
        assert_eq!(k.omitted(), 4980);
        let text = k.text();
        assert!(text.starts_with("0000\n0001\n"), "{text}");
        assert!(text.ends_with("0998\n0999\n"), "{text}");
        assert!(text.contains("4980 bytes of output left out"), "{text}");
        // One push larger than the whole budget.
        let mut k = HeadTail::new(10);
        k.push(&[b'a'; 1000]);
        k.push(b"0123456789");
        assert_eq!(k.omitted(), 1000);
        assert!(k.text().ends_with("56789"), "{}", k.text());
    }

    #[test]
    fn a_log_dir_keeps_the_newest_logs_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let logs = LogDir::create(dir.path().join("logs"), 100, 2).unwrap();
        let mut paths = Vec::new();
        for i in 0..4 {
            let (path, sink) = logs.open(&format!("run/{i}"), "header\n");
            sink.lock().unwrap().write(&[b'x'; 500]);
            paths.push(path);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join("logs"))
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left.contains(&paths[3]) && left.contains(&paths[2]),
            "{left:?}"
        );
        let meta = std::fs::metadata(&paths[3]).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&paths[3]).unwrap();
        assert!(
            text.starts_with("header\nxxx") && text.contains("[log truncated"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn drain_streams_everything_to_the_log_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let sink = std::sync::Mutex::new(LogSink::new(std::fs::File::create(&path).unwrap(), 1000));
        let data = vec![b'x'; 300_000];
        let mut keep = HeadTail::new(64);
        drain(&data[..], &mut keep, Some(&sink)).await.unwrap();
        assert_eq!(keep.total(), 300_000);
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.starts_with(&"x".repeat(1000)));
        assert!(
            log.ends_with("[log truncated at its size limit]\n"),
            "{log}"
        );
        assert_eq!(log.matches("truncated").count(), 1);
    }
}
