//! The reference store passes its own suite.

use async_trait::async_trait;
use idem_conformance::StoreFactory;
use idem_core::{Error, MemoryStore};

struct MemoryFactory;

#[async_trait]
impl StoreFactory for MemoryFactory {
    type Store = MemoryStore;

    fn name(&self) -> &str {
        "memory"
    }

    async fn create(&self) -> Result<MemoryStore, Error> {
        Ok(MemoryStore::new())
    }
}

idem_conformance::conformance_tests!(memory, MemoryFactory);
