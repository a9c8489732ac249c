//! A tiny key-value core used to drive the adapter in tests.

use optiprism_consensus::state_machine::{CoreError, StateMachineCore};
use std::collections::BTreeMap;

/// Applies `key=value` commands; answers with the previous value. Persists lazily (every
/// `persist_every` applies) so the replay-from-log path is exercised.
#[derive(Debug)]
pub(crate) struct KvCore {
    pub(crate) tree: sled::Tree,
    pub(crate) map: BTreeMap<String, String>,
    pub(crate) unpersisted: usize,
    pub(crate) persist_every: usize,
}

impl KvCore {
    pub(crate) fn open(tree: sled::Tree, persist_every: usize) -> KvCore {
        let map = match tree.get("state").unwrap() {
            Some(bytes) => optiprism_consensus::decode(&bytes).unwrap(),
            None => BTreeMap::new(),
        };
        KvCore {
            tree,
            map,
            unpersisted: 0,
            persist_every,
        }
    }
}

impl StateMachineCore for KvCore {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(command).unwrap();
        let (k, v) = text.split_once('=').unwrap();
        self.unpersisted += 1;
        self.map
            .insert(k.to_string(), v.to_string())
            .unwrap_or_default()
            .into_bytes()
    }

    fn persisted_marker(&self) -> Option<Vec<u8>> {
        self.tree.get("marker").unwrap().map(|v| v.to_vec())
    }

    fn wants_persist(&self) -> bool {
        self.unpersisted >= self.persist_every
    }

    fn persist(&mut self, marker: &[u8]) -> Result<(), CoreError> {
        let mut batch = sled::Batch::default();
        batch.insert("state", optiprism_consensus::encode(&self.map));
        batch.insert("marker", marker);
        self.tree.apply_batch(batch)?;
        self.unpersisted = 0;
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, CoreError> {
        Ok(optiprism_consensus::encode(&self.map))
    }

    fn install(&mut self, data: &[u8], marker: &[u8]) -> Result<(), CoreError> {
        self.map = optiprism_consensus::decode(data)?;
        self.persist(marker)
    }
}
