//! The reference stores pass the whole suite: `MemoryStore` (lease mode; what it does not
//! declare is skipped) and the self-test's correct `LabStore` (every guarantee declared and
//! checked, transactional mode included).

use idem_conformance::broken::LabFactory;
use idem_conformance::prelude::*;
use idem_core::MemoryStore;

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

conformance_tests!(memory, MemoryFactory);
conformance_tests!(lab_reference, LabFactory::reference(), transactional);
