//! openraft's own storage test suite against `SledLogStore` + `StateMachineStore`.

use crate::kv::KvCore;
use openraft::testing::{StoreBuilder, Suite};
use optiprism_consensus::flusher::Flusher;
use optiprism_consensus::{GroupId, SledLogStore, StateMachineStore, StorageError, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, SledLogStore, StateMachineStore<KvCore>, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, SledLogStore, StateMachineStore<KvCore>), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let flusher = Flusher::start(db.clone());
        let log = SledLogStore::open(&db, GroupId(3), flusher).unwrap();
        let core = KvCore::open(db.open_tree("kv").unwrap(), 1);
        let sm = StateMachineStore::new(core, db.open_tree("snap").unwrap()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(SledBuilder).unwrap();
}
