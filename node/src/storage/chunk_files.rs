//! Sealed chunk bodies as files beside sled: `{root}/p{partition}/{project}-{chunk}-{generation}.chunk`
//! (hexadecimal), one file per chunk, named by the partition's sled tree (`b/{project}{chunk}`
//! holds the generation).
//!
//! Why files: sled 0.34 splits a leaf at a fixed number of entries whatever their size and
//! writes a changed leaf out whole, so megabyte bodies in sled were copied again on every split
//! and consolidation. That was a third of a seal's time, and disk writes that the Raft log's
//! flushes queued behind.
//!
//! Crash safety rests on two rules. A body is written and synced under a name no other write
//! uses (its generation is random) before any sled batch names it, so a crash leaves at worst a
//! file nothing names, and opening the partition deletes those. A file is deleted only once
//! sled's durable state no longer names it.

use optiprism_types::{PartitionId, ProjectId};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One chunk body's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BodyFile {
    /// The chunk's project.
    pub project: ProjectId,
    /// The chunk's id within the partition and project.
    pub chunk: u64,
    /// Tells apart bodies written for the same chunk id (a seal redone after a crash, a
    /// snapshot installed over chunks of the same ids).
    pub generation: u64,
}

impl BodyFile {
    fn file_name(&self) -> String {
        format!(
            "{:08x}-{:016x}-{:016x}.chunk",
            self.project.0, self.chunk, self.generation
        )
    }
}

/// The directory of one partition's chunk bodies.
#[derive(Debug, Clone)]
pub struct ChunkFiles {
    dir: PathBuf,
}

impl ChunkFiles {
    /// The chunk directory of `partition` under `root`, created if missing.
    pub fn open(root: &Path, partition: PartitionId) -> std::io::Result<ChunkFiles> {
        let dir = partition_dir(root, partition);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| with_path(e, "creating", &dir))?;
            // The new directories' own entries, so that files synced into them stay reachable.
            for parent in [Some(root), root.parent()].into_iter().flatten() {
                sync_path(parent)?;
            }
        }
        Ok(ChunkFiles { dir })
    }

    fn path(&self, file: BodyFile) -> PathBuf {
        self.dir.join(file.file_name())
    }

    /// Writes and syncs the body of a chunk under a fresh generation, and returns its file.
    /// The directory entry is durable only after [`ChunkFiles::sync_dir`].
    pub fn write(&self, project: ProjectId, chunk: u64, body: &[u8]) -> std::io::Result<BodyFile> {
        let file = BodyFile {
            project,
            chunk,
            generation: rand::random(),
        };
        let path = self.path(file);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| with_path(e, "creating", &path))?;
        out.write_all(body)
            .and_then(|()| out.sync_data())
            .map_err(|e| with_path(e, "writing", &path))?;
        Ok(file)
    }

    /// Makes the files written so far durable as directory entries.
    pub fn sync_dir(&self) -> std::io::Result<()> {
        sync_path(&self.dir)
    }

    /// The body in `file`.
    pub fn read(&self, file: BodyFile) -> std::io::Result<Vec<u8>> {
        let path = self.path(file);
        std::fs::read(&path).map_err(|e| with_path(e, "reading", &path))
    }

    /// Deletes `file`; one already gone is fine.
    pub fn remove(&self, file: BodyFile) -> std::io::Result<()> {
        let path = self.path(file);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(with_path(e, "deleting", &path))
            }
            _ => Ok(()),
        }
    }

    /// Deletes every file of the directory but `named`: bodies a crash left behind before a
    /// seal or an install named them, or after an install stopped naming them. Returns how
    /// many went.
    pub fn remove_all_but(&self, named: &HashSet<BodyFile>) -> std::io::Result<usize> {
        let keep: HashSet<String> = named.iter().map(BodyFile::file_name).collect();
        let mut removed = 0;
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| with_path(e, "listing", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| with_path(e, "listing", &self.dir))?;
            if keep.contains(entry.file_name().to_string_lossy().as_ref()) {
                continue;
            }
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| with_path(e, "deleting", &path))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Deletes the chunk directory of `partition` under `root`, if there is one.
pub fn remove_partition(root: &Path, partition: PartitionId) -> std::io::Result<()> {
    let dir = partition_dir(root, partition);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(with_path(e, "deleting", &dir)),
        _ => Ok(()),
    }
}

/// `fsync`s `path`: a file's contents, or a directory's entries.
fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(e, "syncing", path))
}

fn partition_dir(root: &Path, partition: PartitionId) -> PathBuf {
    root.join(format!("p{}", partition.0))
}

/// `e`, saying what was being done to which path.
fn with_path(e: std::io::Error, doing: &str, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_of_one_chunk_id_get_files_of_their_own_and_unnamed_ones_go() {
        let root = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(root.path(), PartitionId(3)).unwrap();
        let first = files.write(ProjectId(1), 7, b"first").unwrap();
        let second = files.write(ProjectId(1), 7, b"second").unwrap();
        files.sync_dir().unwrap();
        assert_ne!(first, second);
        assert_eq!(files.read(first).unwrap(), b"first");
        assert_eq!(files.read(second).unwrap(), b"second");
        std::fs::write(files.dir.join("stray.tmp"), b"x").unwrap();
        let removed = files.remove_all_but(&HashSet::from([second])).unwrap();
        assert_eq!(removed, 2);
        assert!(files.read(first).is_err());
        assert_eq!(files.read(second).unwrap(), b"second");
        files.remove(first).unwrap();
        files.remove(second).unwrap();
        assert!(files.read(second).is_err());
        remove_partition(root.path(), PartitionId(3)).unwrap();
        assert!(!root.path().join("p3").exists());
        remove_partition(root.path(), PartitionId(3)).unwrap();
    }

    #[test]
    fn a_missing_body_is_an_error_naming_its_file() {
        let root = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(root.path(), PartitionId(0)).unwrap();
        let missing = BodyFile {
            project: ProjectId(2),
            chunk: 1,
            generation: 5,
        };
        let e = files.read(missing).unwrap_err().to_string();
        assert!(
            e.contains("00000002-0000000000000001-0000000000000005.chunk"),
            "{e}"
        );
    }
}
