//! Progress bars with ETA for the library's progress events.
//!
//! On a terminal: an indicatif bar per stage. Elsewhere (logs, CI): one line per stage and a
//! line with the count, the elapsed time and the ETA at most every 30 seconds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitstack::compress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

struct Stage {
    bar: ProgressBar,
    name: String,
    total: u64,
    started: Instant,
    last_line: Instant,
}

/// Turns [`Progress`] events into bars or log lines on stderr.
pub struct Bars {
    stage: Mutex<Option<Stage>>,
}

const LOG_EVERY: Duration = Duration::from_secs(30);

impl Bars {
    pub fn new() -> Self {
        Self {
            stage: Mutex::new(None),
        }
    }

    pub fn handle(&self, event: Progress<'_>) {
        let mut slot = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Progress::Stage { name, total } => {
                if let Some(old) = slot.take() {
                    old.bar.finish();
                }
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(name.to_string());
                if bar.is_hidden() {
                    eprintln!("{name}: {total} steps");
                }
                let now = Instant::now();
                *slot = Some(Stage {
                    bar,
                    name: name.to_string(),
                    total,
                    started: now,
                    last_line: now,
                });
            }
            Progress::Step { done, what } => {
                if let Some(stage) = slot.as_mut() {
                    stage.bar.set_position(done);
                    stage.bar.set_message(what.to_string());
                    if stage.bar.is_hidden() && stage.last_line.elapsed() >= LOG_EVERY {
                        stage.last_line = Instant::now();
                        let elapsed = stage.started.elapsed().as_secs_f64();
                        let eta = if done > 0 {
                            elapsed / done as f64 * stage.total.saturating_sub(done) as f64
                        } else {
                            f64::NAN
                        };
                        eprintln!(
                            "{}: {done}/{} after {elapsed:.0} s, ETA {eta:.0} s ({what})",
                            stage.name, stage.total
                        );
                    }
                }
            }
            _ => {}
        }
    }

    pub fn finish(&self) {
        if let Some(stage) = self.stage.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stage.bar.finish();
        }
    }
}
