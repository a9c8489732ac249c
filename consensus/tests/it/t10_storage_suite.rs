//! openraft's own storage test suite against `WalLogStore` + `StateMachineStore`.

use crate::kv::KvCore;
use openraft::testing::{StoreBuilder, Suite};
use optiprism_consensus::{
    GroupId, NodeStorage, StateMachineStore, StorageError, TypeConfig, Wal, WalLogStore,
};

struct WalBuilder;

impl StoreBuilder<TypeConfig, WalLogStore, StateMachineStore<KvCore>, tempfile::TempDir>
    for WalBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, WalLogStore, StateMachineStore<KvCore>), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("sled")).unwrap();
        let storage = NodeStorage {
            db: db.clone(),
            sled_log: dir.path().join("sled/db"),
            wal: Wal::open(&dir.path().join("wal")).unwrap(),
        };
        let log = WalLogStore::new(&storage, GroupId(3));
        let core = KvCore::open(db.open_tree("kv").unwrap(), 1);
        let sm = StateMachineStore::new(core, db.open_tree("snap").unwrap()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(WalBuilder).unwrap();
}
