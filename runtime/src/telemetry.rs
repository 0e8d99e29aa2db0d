//! Logging set-up both binaries share: a level filter and a text or JSON format, and
//! [`Escaped`] for text that callers chose.
//!
//! In the text format a field written with `%` (Display) goes out as it is, so a caller's
//! string with a CR or LF in it would end the line and forge the next one. Fields written
//! with `?` (Debug) and `&str` fields are quoted and escaped by the formatter, and the JSON
//! format escapes everything. What a caller sent, or a message that may quote it (a refusal
//! naming the role a pod asked for, a status message from the other side), is logged either
//! after its shape was checked or as `%Escaped(..)`.

use std::fmt::{self, Write as _};

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive (`info`,
/// `podiam_server=debug,info`…); `RUST_LOG`, when set, wins.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only for a person at a terminal, never into log files or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A `Display` value written with every character that could break or disguise a log line
/// escaped as Rust writes it (`\n`, `\r`, `\u{1b}`): control characters (C0, DEL, C1), the
/// Unicode line and paragraph separators, and the bidirectional formatting characters. The
/// rest — quotes, backslashes, other Unicode — is written as it is, so a message reads as
/// before: one event is always one line.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<T>(pub T);

/// Whether `c` is written escaped by [`Escaped`].
pub fn breaks_lines(c: char) -> bool {
    // Line and paragraph separators; bidirectional marks, embeddings, overrides, isolates.
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Escapes on the way through, so nothing is formatted twice or kept.
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, text: &str) -> fmt::Result {
                for part in text.split_inclusive(breaks_lines) {
                    let mut chars = part.chars();
                    match chars.next_back() {
                        Some(last) if breaks_lines(last) => {
                            self.0.write_str(chars.as_str())?;
                            write!(self.0, "{}", last.escape_default())?;
                        }
                        _ => self.0.write_str(part)?,
                    }
                }
                Ok(())
            }
        }
        write!(Escaping(f), "{}", self.0)
    }
}

/// Parses a duration flag: `90s`, `30m`, `1h`, `1h30m`, or plain seconds (`3600`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); try 90s, 30m or 1h"))
}

/// Cancels `shutdown` at the first SIGTERM or SIGINT: the one shutdown source of a binary.
pub async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

/// Lines a caller can make as fast as it likes (a refused handshake, a call not proven),
/// logged the first time each key (an address and a reason, say) comes in a window (the
/// length given to [`LogThrottle::new`]), and only counted after that: what an attacker can
/// push into the log is one line per key per window, at most [`LOG_THROTTLE_KEYS`] keys per
/// window. The counters beside such lines keep the whole rate.
#[derive(Debug)]
pub struct LogThrottle<K> {
    every: std::time::Duration,
    state: std::sync::Mutex<Window<K>>,
}

/// Keys a [`LogThrottle`] tells apart in one window; others are only counted.
pub const LOG_THROTTLE_KEYS: usize = 1024;

#[derive(Debug)]
struct Window<K> {
    began: Option<std::time::Instant>,
    logged: std::collections::HashSet<K>,
    /// Lines not logged in this window.
    held_back: u64,
    /// Lines not logged in the window before, told with this window's first line.
    held_back_before: u64,
}

impl<K: std::hash::Hash + Eq> LogThrottle<K> {
    /// A throttle with windows of `every`.
    pub fn new(every: std::time::Duration) -> LogThrottle<K> {
        LogThrottle {
            every,
            state: std::sync::Mutex::new(Window {
                began: None,
                logged: std::collections::HashSet::new(),
                held_back: 0,
                held_back_before: 0,
            }),
        }
    }

    /// Whether a line for `key` is to be logged now: `Some(n)`, where `n` lines were held
    /// back in the window before (the first line of a window says so, the others 0), or
    /// `None`: counted, not logged.
    pub fn admit(&self, key: K, now: std::time::Instant) -> Option<u64> {
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if window
            .began
            .is_none_or(|began| now.saturating_duration_since(began) >= self.every)
        {
            window.began = Some(now);
            window.logged.clear();
            window.held_back_before = std::mem::take(&mut window.held_back);
        }
        if window.logged.len() >= LOG_THROTTLE_KEYS || !window.logged.insert(key) {
            window.held_back += 1;
            return None;
        }
        Some(std::mem::take(&mut window.held_back_before))
    }
}

/// What the text log format writes for the events `log` makes, at every level: for tests
/// that a logged field cannot forge a line.
#[cfg(any(test, feature = "test-util"))]
pub fn logged_text(log: impl FnOnce()) -> String {
    let (guard, logs) = capture_logs();
    log();
    drop(guard);
    logs.text()
}

/// What the text log format writes, at every level, for the events of this thread until the
/// guard is dropped: for tests of async code on a current-thread runtime (its tasks run on
/// the test's thread).
#[cfg(any(test, feature = "test-util"))]
pub fn capture_logs() -> (tracing::subscriber::DefaultGuard, CapturedLogs) {
    let sink = CapturedLogs::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    (tracing::subscriber::set_default(subscriber), sink)
}

/// The lines [`capture_logs`] captured.
#[cfg(any(test, feature = "test-util"))]
#[derive(Clone, Debug, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(any(test, feature = "test-util"))]
impl CapturedLogs {
    /// Everything written so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8(bytes).expect("utf-8")
    }
}

#[cfg(any(test, feature = "test-util"))]
impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Escaped, LOG_THROTTLE_KEYS, LogThrottle, logged_text, parse_duration};
    use std::time::Duration;

    #[test]
    fn escaped_text_cannot_break_or_disguise_a_line() {
        let cases = [
            ("app-reader", "app-reader"),
            ("a\r\nb", "a\\r\\nb"),
            ("\n", "\\n"),
            ("x\u{1b}[31my", "x\\u{1b}[31my"),
            ("x\u{85}y\u{2028}z", "x\\u{85}y\\u{2028}z"),
            ("evil\u{202e}txt", "evil\\u{202e}txt"),
            ("a\tb\0", "a\\tb\\u{0}"),
            // Printable text is left as it is.
            ("role \"app\" \\ é ✓", "role \"app\" \\ é ✓"),
        ];
        for (text, written) in cases {
            assert_eq!(Escaped(text).to_string(), written, "{text:?}");
        }
    }

    #[test]
    fn an_escaped_field_with_cr_lf_stays_on_its_line() {
        let forged = "x\r\n2026-01-01T00:00:00Z  INFO podiam_server: credentials issued";
        // Written as it is (`%`), the field ends the line and forges a second one.
        let raw = logged_text(|| tracing::info!(why = %forged, "refused"));
        assert_eq!(raw.lines().count(), 2, "{raw}");
        let escaped = logged_text(|| tracing::info!(why = %Escaped(forged), "refused"));
        assert_eq!(escaped.lines().count(), 1, "{escaped}");
        assert!(
            escaped.contains(r"why=x\r\n2026-01-01T00:00:00Z  INFO"),
            "{escaped}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn a_throttled_line_is_logged_once_per_key_and_window() {
        let throttle = LogThrottle::new(std::time::Duration::from_secs(60));
        let start = std::time::Instant::now();
        let at = |s: u64| start + std::time::Duration::from_secs(s);
        assert_eq!(throttle.admit("a", at(0)), Some(0));
        assert_eq!(throttle.admit("a", at(1)), None);
        assert_eq!(throttle.admit("b", at(2)), Some(0));
        assert_eq!(throttle.admit("a", at(59)), None);
        // A new window: the first line says how many the last one held back.
        assert_eq!(throttle.admit("a", at(60)), Some(2));
        assert_eq!(throttle.admit("b", at(61)), Some(0));
        // However many keys come, a window logs at most LOG_THROTTLE_KEYS lines.
        let logged = (0..LOG_THROTTLE_KEYS * 2)
            .filter(|i| {
                let key: &'static str = Box::leak(format!("k{i}").into_boxed_str());
                throttle.admit(key, at(62)).is_some()
            })
            .count();
        assert_eq!(logged, LOG_THROTTLE_KEYS - 2);
    }
}
