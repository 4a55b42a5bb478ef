//! Whole windows on separate threads.
//!
//! Scoring runs the same forward pass over many windows. Handing rayon the windows with
//! `par_iter` lets a thread that waits inside one window's nested parallel work (a GEMM
//! split, attention heads) steal and start another window, so each thread ends up with
//! several half-done windows whose activations crowd each other out of the caches; the
//! more windows, the worse (small-llama, level 1 of the paper's scorer, 8 windows: 29.4 s
//! with `par_iter`, 26.2 s with one window per thread; 32 windows: see NOTES.md). Here each
//! thread takes one whole window at a time and runs it on a one-thread pool of its own.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f(i, &items[i])` for every item, on as many threads as the current rayon pool has (at
/// most one per item). Each thread takes the next item when it is done with one, and runs
/// it inside a one-thread rayon pool, so the item's own parallel work runs on that thread
/// alone. Results come back in item order; after an error no new item is started and the
/// error of the first failed item (in item order) is returned.
///
/// # Panics
/// Propagates a panic of `f`.
pub(crate) fn each_on_one_thread<I, T, E>(
    items: &[I],
    f: impl Fn(usize, &I) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E>
where
    I: Sync,
    T: Send,
    E: Send,
{
    let threads = rayon::current_num_threads().clamp(1, items.len().max(1));
    let next = AtomicUsize::new(0);
    let run = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let result = f(i, item);
            let failed = result.is_err();
            done.push((i, result));
            if failed {
                // Items already taken still finish; no new one starts.
                next.store(items.len(), Ordering::Relaxed);
                break;
            }
        }
        done
    };
    let mut all: Vec<(usize, Result<T, E>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(
                    || match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                        Ok(pool) => pool.install(run),
                        // No pool (the OS refused a thread): run here, on the global pool.
                        Err(_) => run(),
                    },
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    // Every index below the largest one taken was taken, and ran: in order, the results
    // are either all the items' or reach the first error.
    all.sort_unstable_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_item_order() {
        let items: Vec<usize> = (0..37).collect();
        let out: Result<Vec<usize>, ()> = each_on_one_thread(&items, |i, &x| {
            assert_eq!(i, x);
            // Inside, rayon sees one thread.
            assert_eq!(rayon::current_num_threads(), 1);
            Ok(x * x)
        });
        assert_eq!(out, Ok(items.iter().map(|x| x * x).collect()));
    }

    #[test]
    fn the_first_error_in_item_order_is_returned() {
        let items: Vec<usize> = (0..50).collect();
        let out: Result<Vec<usize>, usize> =
            each_on_one_thread(&items, |_, &x| if x % 7 == 3 { Err(x) } else { Ok(x) });
        assert_eq!(out, Err(3));
    }

    #[test]
    fn no_items_no_results() {
        let out: Result<Vec<u8>, ()> = each_on_one_thread(&[] as &[u8], |_, &x| Ok(x));
        assert_eq!(out, Ok(vec![]));
    }
}
