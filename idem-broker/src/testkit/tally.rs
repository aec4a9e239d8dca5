//! Counting the effects of handled messages per key.

use std::collections::BTreeMap;
use std::sync::Mutex;

use idem_core::{Key, Store};

use crate::{ConsumerBarrier, Delivery, Handled};

/// The effects of messages handled behind a consumer barrier, counted per key id: a
/// duplicate effect shows as a count of 2, a lost message as a missing id.
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<BTreeMap<String, u32>>,
}

impl Tally {
    /// Handles `message` behind `barrier` with a handler that counts one effect for the
    /// message's key, and asserts that the barrier completed it (fresh or replayed).
    ///
    /// # Panics
    ///
    /// When the barrier fails or does not complete the message.
    pub async fn handle<S: Store + ?Sized + 'static, M: Delivery>(
        &self,
        barrier: &ConsumerBarrier<S, M>,
        message: &M,
    ) {
        let h: Handled<(), String, String> = barrier
            .handle(message, |incoming, _| async move {
                *self
                    .counts
                    .lock()
                    .unwrap()
                    .entry(incoming.key.id().to_string())
                    .or_default() += 1;
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(h, Handled::Completed { .. }), "{h:?}");
    }

    /// The effects so far, per key id.
    pub fn counts(&self) -> BTreeMap<String, u32> {
        self.counts.lock().unwrap().clone()
    }

    /// Asserts that exactly the messages of `keys` had an effect, one each.
    ///
    /// # Panics
    ///
    /// When a message of `keys` had no effect or more than one, or another message had one.
    pub fn assert_once_each(&self, keys: impl IntoIterator<Item = Key>) {
        let counts = self.counts();
        let keys: Vec<Key> = keys.into_iter().collect();
        assert_eq!(counts.len(), keys.len(), "{counts:?}");
        assert!(counts.values().all(|&n| n == 1), "{counts:?}");
        for key in &keys {
            assert_eq!(counts.get(key.id()), Some(&1), "{key:?}: {counts:?}");
        }
    }
}
