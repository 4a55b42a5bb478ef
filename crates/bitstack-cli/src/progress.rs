//! Progress bars with ETA for the library's progress events.

use std::sync::Mutex;

use bitstack::compress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Turns [`Progress`] events into indicatif bars (to stderr; hidden when not a terminal,
/// where one line per stage is printed instead).
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }

    pub fn handle(&self, event: Progress<'_>) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Progress::Stage { name, total } => {
                if let Some(old) = slot.take() {
                    old.finish();
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
                *slot = Some(bar);
            }
            Progress::Step { done, what } => {
                if let Some(bar) = slot.as_ref() {
                    bar.set_position(done);
                    bar.set_message(what.to_string());
                }
            }
            _ => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish();
        }
    }
}
