//! Runs a proptest strategy from async code: generation, then shrinking of the first failure.

use std::fmt::Debug;
use std::future::Future;

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// The most shrinking steps spent on one failure.
const MAX_SHRINK_STEPS: u32 = 512;

/// Checks `test` on `cases` values of `strategy`. On failure, shrinks and returns the
/// minimal failing input with the seed that reproduces it.
pub(crate) async fn check<S, F, Fut>(
    strategy: S,
    cases: u32,
    seed: u64,
    mut test: F,
) -> Result<(), String>
where
    S: Strategy,
    S::Value: Debug,
    F: FnMut(S::Value) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    for case in 0..cases {
        let mut tree = strategy.new_tree(&mut runner).map_err(|e| e.to_string())?;
        let Err(first) = test(tree.current()).await else {
            continue;
        };
        let mut minimal = (format!("{:#?}", tree.current()), first);
        let mut steps = 0;
        let mut more = tree.simplify();
        while more && steps < MAX_SHRINK_STEPS {
            steps += 1;
            match test(tree.current()).await {
                Err(msg) => {
                    minimal = (format!("{:#?}", tree.current()), msg);
                    more = tree.simplify();
                }
                Ok(()) => more = tree.complicate(),
            }
        }
        return Err(format!(
            "failed on case {case}, shrunk in {steps} steps to:\n{}\nbecause: {}",
            minimal.0, minimal.1
        ));
    }
    Ok(())
}
