//! The metadata group's state machine: projects and their keys, property schemas, identities,
//! and the partition map (which nodes hold each partition's replicas).
//!
//! Everything here is small and changes rarely compared to events, so apply writes through:
//! each command's changed keys and the applied marker go to sled in one atomic batch. Readers
//! (ingestion, queries, auth) see the applied state through [`MetadataHandle`] without going
//! through Raft.
//!
//! Identity (`docs/identity.md`): a distinct id belongs to the person `hash(distinct id)` unless
//! a merge redirected it. `Merge { from, into }` (from `$identify`/`alias`) points `from`'s
//! person at `into`'s person. Events keep the person they were stamped with at ingestion; the
//! merge map, resolved transitively, turns that into the current person at query time, so a
//! merge also restates past events.

use optiprism_consensus::state_machine::{CoreError, StateMachineCore};
use optiprism_types::event::PropType;
use optiprism_types::{PersonId, ProjectId};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// Its id.
    pub id: ProjectId,
    /// Its name (the `{project}` of the query URL).
    pub name: String,
    /// Public key that authorizes ingestion.
    pub write_key: String,
    /// Secret token that authorizes queries.
    pub api_token: String,
}

/// A property key's registered type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertySchema {
    /// The type values are coerced to.
    pub ty: PropType,
}

/// A command of the metadata group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates a project, or updates its keys if it exists.
    UpsertProject {
        /// Name.
        name: String,
        /// Write key.
        write_key: String,
        /// API token.
        api_token: String,
    },
    /// Registers property types (the first registration of a key wins).
    RegisterProperties {
        /// Project.
        project: ProjectId,
        /// Keys and the type of their first value.
        properties: Vec<(String, PropType)>,
    },
    /// Merges the person of distinct id `from` into the person of `into`.
    Merge {
        /// Project.
        project: ProjectId,
        /// The id being merged (usually anonymous).
        from: String,
        /// The identified id.
        into: String,
    },
    /// Records where a partition's replicas live (the partition map).
    SetPlacement {
        /// The partition.
        partition: u32,
        /// The nodes holding a replica.
        replicas: Vec<u64>,
    },
    /// Several commands applied in order as one entry.
    Batch(Vec<MetaCommand>),
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// Done.
    Ok,
    /// The project's id.
    Project(ProjectId),
    /// A merge was refused (junk id, or both persons already identified).
    MergeRefused(String),
    /// One response per command of a batch.
    Batch(Vec<MetaResponse>),
    /// The command named a project that does not exist.
    UnknownProject,
}

/// Identity state of one project.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Identities {
    /// distinct id → person, for ids that do not map to their own hash.
    pub overrides: HashMap<String, PersonId>,
    /// merged person → the person it now is (kept flat: values are never keys).
    pub merged: HashMap<PersonId, PersonId>,
    /// Persons that an identify made "identified"; they are not merged into others.
    pub identified: HashSet<PersonId>,
}

impl Identities {
    /// The person a distinct id belongs to now.
    pub fn person_of(&self, project: ProjectId, distinct_id: &str) -> PersonId {
        let p = self
            .overrides
            .get(distinct_id)
            .copied()
            .unwrap_or_else(|| PersonId::of_distinct_id(project, distinct_id));
        self.resolve(p)
    }

    /// The current person of a person id stamped on an event.
    pub fn resolve(&self, p: PersonId) -> PersonId {
        self.merged.get(&p).copied().unwrap_or(p)
    }
}

/// Ids that SDKs send when they have no real id; merging them would join strangers.
pub fn is_junk_id(id: &str) -> bool {
    let lower = id.trim().to_ascii_lowercase();
    lower.is_empty()
        || matches!(
            lower.as_str(),
            "null"
                | "none"
                | "nil"
                | "undefined"
                | "0"
                | "-1"
                | "anonymous"
                | "guest"
                | "nan"
                | "[object object]"
                | "true"
                | "false"
                | "distinct_id"
                | "id"
                | "not_authenticated"
        )
}

/// The applied metadata state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetadataState {
    /// Projects by id.
    pub projects: BTreeMap<ProjectId, Project>,
    /// Property schema per project.
    pub schemas: HashMap<ProjectId, BTreeMap<String, PropertySchema>>,
    /// Identities per project.
    pub identities: HashMap<ProjectId, Identities>,
    /// The partition map: the nodes holding each partition's replicas. Empty until the
    /// cluster's bootstrap node records the initial placement.
    pub placement: BTreeMap<u32, Vec<u64>>,
}

impl MetadataState {
    /// The project of a write key.
    pub fn project_by_write_key(&self, key: &str) -> Option<&Project> {
        self.projects.values().find(|p| p.write_key == key)
    }

    /// The project of a name.
    pub fn project_by_name(&self, name: &str) -> Option<&Project> {
        self.projects.values().find(|p| p.name == name)
    }

    /// The project of an API token.
    pub fn project_by_token(&self, token: &str) -> Option<&Project> {
        self.projects.values().find(|p| p.api_token == token)
    }

    fn apply(&mut self, cmd: MetaCommand, dirty: &mut Dirty) -> MetaResponse {
        match cmd {
            MetaCommand::UpsertProject {
                name,
                write_key,
                api_token,
            } => {
                let id = match self.project_by_name(&name) {
                    Some(p) => p.id,
                    None => ProjectId(
                        self.projects
                            .keys()
                            .next_back()
                            .map(|p| p.0 + 1)
                            .unwrap_or(1),
                    ),
                };
                self.projects.insert(
                    id,
                    Project {
                        id,
                        name,
                        write_key,
                        api_token,
                    },
                );
                dirty.projects = true;
                MetaResponse::Project(id)
            }
            MetaCommand::RegisterProperties {
                project,
                properties,
            } => {
                if !self.projects.contains_key(&project) {
                    return MetaResponse::UnknownProject;
                }
                let schema = self.schemas.entry(project).or_default();
                for (key, ty) in properties {
                    schema.entry(key).or_insert(PropertySchema { ty });
                }
                dirty.schemas.insert(project);
                MetaResponse::Ok
            }
            MetaCommand::Merge {
                project,
                from,
                into,
            } => {
                if !self.projects.contains_key(&project) {
                    return MetaResponse::UnknownProject;
                }
                if is_junk_id(&from) || is_junk_id(&into) {
                    return MetaResponse::MergeRefused(format!(
                        "refusing to merge junk id `{from}` or `{into}`"
                    ));
                }
                let ids = self.identities.entry(project).or_default();
                let target = ids.person_of(project, &into);
                ids.identified.insert(target);
                let source = ids.person_of(project, &from);
                dirty.identities.insert(project);
                if source == target {
                    return MetaResponse::Ok;
                }
                if ids.identified.contains(&source) {
                    return MetaResponse::MergeRefused(format!(
                        "`{from}` already belongs to an identified person; not merging it into `{into}`"
                    ));
                }
                ids.overrides.insert(from, target);
                // Keep the map flat: whatever pointed at `source` now points at `target`.
                for v in ids.merged.values_mut() {
                    if *v == source {
                        *v = target;
                    }
                }
                for v in ids.overrides.values_mut() {
                    if *v == source {
                        *v = target;
                    }
                }
                ids.merged.insert(source, target);
                MetaResponse::Ok
            }
            MetaCommand::SetPlacement {
                partition,
                mut replicas,
            } => {
                replicas.sort_unstable();
                replicas.dedup();
                self.placement.insert(partition, replicas);
                dirty.placement = true;
                MetaResponse::Ok
            }
            MetaCommand::Batch(cmds) => {
                MetaResponse::Batch(cmds.into_iter().map(|c| self.apply(c, dirty)).collect())
            }
        }
    }
}

#[derive(Debug, Default)]
struct Dirty {
    projects: bool,
    placement: bool,
    schemas: HashSet<ProjectId>,
    identities: HashSet<ProjectId>,
}

/// Shared read access to the applied metadata.
#[derive(Debug, Clone, Default)]
pub struct MetadataHandle(Arc<RwLock<MetadataState>>);

impl MetadataHandle {
    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&MetadataState) -> T) -> T {
        f(&self.0.read())
    }
}

/// The metadata state machine core.
#[derive(Debug)]
pub struct MetadataCore {
    tree: sled::Tree,
    state: MetadataHandle,
    dirty: Dirty,
    marker: Option<Vec<u8>>,
}

impl MetadataCore {
    /// Opens the metadata tree and loads the state.
    pub fn open(db: &sled::Db) -> Result<MetadataCore, CoreError> {
        let tree = db.open_tree("metadata")?;
        let mut state = MetadataState::default();
        if let Some(v) = tree.get("projects")? {
            state.projects = optiprism_consensus::decode(&v)?;
        }
        for item in tree.scan_prefix(b"schema/") {
            let (k, v) = item?;
            let project = ProjectId(u32::from_be_bytes(k[7..11].try_into()?));
            state
                .schemas
                .insert(project, optiprism_consensus::decode(&v)?);
        }
        for item in tree.scan_prefix(b"ident/") {
            let (k, v) = item?;
            let project = ProjectId(u32::from_be_bytes(k[6..10].try_into()?));
            state.identities.insert(project, decode_identities(&v)?);
        }
        if let Some(v) = tree.get("placement")? {
            state.placement = optiprism_consensus::decode(&v)?;
        }
        let marker = tree.get("marker")?.map(|v| v.to_vec());
        Ok(MetadataCore {
            tree,
            state: MetadataHandle(Arc::new(RwLock::new(state))),
            dirty: Dirty::default(),
            marker,
        })
    }

    /// The handle readers use.
    pub fn handle(&self) -> MetadataHandle {
        self.state.clone()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredIdentities {
    overrides: Vec<(String, PersonId)>,
    merged: Vec<(PersonId, PersonId)>,
    identified: Vec<PersonId>,
}

fn encode_identities(ids: &Identities) -> Vec<u8> {
    let mut stored = StoredIdentities {
        overrides: ids.overrides.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        merged: ids.merged.iter().map(|(k, v)| (*k, *v)).collect(),
        identified: ids.identified.iter().copied().collect(),
    };
    stored.overrides.sort();
    stored.merged.sort();
    stored.identified.sort();
    optiprism_consensus::encode(&stored)
}

fn decode_identities(bytes: &[u8]) -> Result<Identities, CoreError> {
    let stored: StoredIdentities = optiprism_consensus::decode(bytes)?;
    Ok(Identities {
        overrides: stored.overrides.into_iter().collect(),
        merged: stored.merged.into_iter().collect(),
        identified: stored.identified.into_iter().collect(),
    })
}

fn project_key(prefix: &str, project: ProjectId) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(&project.0.to_be_bytes());
    k
}

impl StateMachineCore for MetadataCore {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        let response = match optiprism_consensus::decode::<MetaCommand>(command) {
            Ok(cmd) => self.state.0.write().apply(cmd, &mut self.dirty),
            Err(e) => {
                tracing::error!(error = %e, "undecodable metadata command skipped");
                MetaResponse::Ok
            }
        };
        optiprism_consensus::encode(&response)
    }

    fn persisted_marker(&self) -> Option<Vec<u8>> {
        self.marker.clone()
    }

    fn wants_persist(&self) -> bool {
        true
    }

    fn persist(&mut self, marker: &[u8]) -> Result<(), CoreError> {
        let state = self.state.0.read();
        let mut batch = sled::Batch::default();
        if std::mem::take(&mut self.dirty.projects) {
            batch.insert("projects", optiprism_consensus::encode(&state.projects));
        }
        if std::mem::take(&mut self.dirty.placement) {
            batch.insert("placement", optiprism_consensus::encode(&state.placement));
        }
        for project in self.dirty.schemas.drain() {
            if let Some(schema) = state.schemas.get(&project) {
                batch.insert(
                    project_key("schema/", project),
                    optiprism_consensus::encode(schema),
                );
            }
        }
        for project in self.dirty.identities.drain() {
            if let Some(ids) = state.identities.get(&project) {
                batch.insert(project_key("ident/", project), encode_identities(ids));
            }
        }
        batch.insert("marker", marker);
        self.tree.apply_batch(batch)?;
        self.marker = Some(marker.to_vec());
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, CoreError> {
        let state = self.state.0.read();
        let identities: Vec<(ProjectId, Vec<u8>)> = state
            .identities
            .iter()
            .map(|(p, ids)| (*p, encode_identities(ids)))
            .collect();
        Ok(optiprism_consensus::encode(&(
            &state.projects,
            &state.schemas,
            identities,
            &state.placement,
        )))
    }

    fn install(&mut self, bytes: &[u8], marker: &[u8]) -> Result<(), CoreError> {
        type Snap = (
            BTreeMap<ProjectId, Project>,
            HashMap<ProjectId, BTreeMap<String, PropertySchema>>,
            Vec<(ProjectId, Vec<u8>)>,
            BTreeMap<u32, Vec<u64>>,
        );
        let (projects, schemas, identities, placement): Snap = optiprism_consensus::decode(bytes)?;
        let mut state = MetadataState {
            projects,
            schemas,
            identities: HashMap::new(),
            placement,
        };
        for (p, bytes) in identities {
            state.identities.insert(p, decode_identities(&bytes)?);
        }
        self.dirty.projects = true;
        self.dirty.placement = true;
        self.dirty.schemas = state.schemas.keys().copied().collect();
        self.dirty.identities = state.identities.keys().copied().collect();
        *self.state.0.write() = state;
        self.persist(marker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_project() -> (MetadataState, ProjectId) {
        let mut s = MetadataState::default();
        let MetaResponse::Project(p) = s.apply(
            MetaCommand::UpsertProject {
                name: "default".into(),
                write_key: "wk".into(),
                api_token: "t".into(),
            },
            &mut Dirty::default(),
        ) else {
            panic!("no project")
        };
        (s, p)
    }

    #[test]
    fn merges_chain_and_stay_flat() {
        let (mut s, p) = state_with_project();
        let d = &mut Dirty::default();
        assert_eq!(
            s.apply(
                MetaCommand::Merge {
                    project: p,
                    from: "anon-1".into(),
                    into: "U1".into()
                },
                d
            ),
            MetaResponse::Ok
        );
        assert_eq!(
            s.apply(
                MetaCommand::Merge {
                    project: p,
                    from: "anon-2".into(),
                    into: "U1".into()
                },
                d
            ),
            MetaResponse::Ok
        );
        let ids = &s.identities[&p];
        let u1 = PersonId::of_distinct_id(p, "U1");
        assert_eq!(ids.person_of(p, "anon-1"), u1);
        assert_eq!(ids.resolve(PersonId::of_distinct_id(p, "anon-2")), u1);
        assert_eq!(
            ids.person_of(p, "anon-3"),
            PersonId::of_distinct_id(p, "anon-3")
        );
    }

    #[test]
    fn identified_persons_and_junk_ids_are_not_merged() {
        let (mut s, p) = state_with_project();
        let d = &mut Dirty::default();
        s.apply(
            MetaCommand::Merge {
                project: p,
                from: "anon-1".into(),
                into: "U1".into(),
            },
            d,
        );
        s.apply(
            MetaCommand::Merge {
                project: p,
                from: "anon-2".into(),
                into: "U2".into(),
            },
            d,
        );
        // U2 is identified: pulling it into U1 needs an explicit dangerous merge.
        assert!(matches!(
            s.apply(
                MetaCommand::Merge {
                    project: p,
                    from: "U2".into(),
                    into: "U1".into()
                },
                d
            ),
            MetaResponse::MergeRefused(_)
        ));
        assert!(matches!(
            s.apply(
                MetaCommand::Merge {
                    project: p,
                    from: "null".into(),
                    into: "U1".into()
                },
                d
            ),
            MetaResponse::MergeRefused(_)
        ));
    }
}
