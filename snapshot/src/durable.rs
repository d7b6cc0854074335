//! The last tier: whole encoded snapshots written to a mounted volume every N generations,
//! atomically (temp file, fsync, rename, fsync of the directory), behind a `DurableStore` trait.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where durable checkpoints live. Object storage fits behind the same four calls; they are
/// blocking because the agent runs them on a blocking thread, off the commit path.
pub trait DurableStore: Send + Sync {
    /// Stores the encoded snapshot of `rank` at `generation`, all or nothing.
    fn put(&self, rank: u32, generation: u64, bytes: &[u8]) -> Result<()>;
    /// The stored bytes, or `None` when that generation was never (completely) written.
    fn get(&self, rank: u32, generation: u64) -> Result<Option<Vec<u8>>>;
    /// Generations stored for `rank`, oldest first.
    fn list(&self, rank: u32) -> Result<Vec<u64>>;
    /// Removes one generation (retention).
    fn remove(&self, rank: u32, generation: u64) -> Result<()>;
}

/// A directory (a mounted volume): `<root>/<job>/rank-<r>/gen-<g>.snap`.
#[derive(Clone, Debug)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// One directory per job so jobs sharing a volume never see each other's files.
    pub fn new(root: &Path, job: &str) -> Result<DirStore> {
        if job.is_empty() || job.contains(['/', '\\']) || job.starts_with('.') {
            return Err(Error::Config(format!(
                "job name {job:?} cannot name a directory; use the PetlJob's name"
            )));
        }
        Ok(DirStore {
            root: root.join(job),
        })
    }

    fn rank_dir(&self, rank: u32) -> PathBuf {
        self.root.join(format!("rank-{rank}"))
    }

    fn path(&self, rank: u32, generation: u64) -> PathBuf {
        self.rank_dir(rank)
            .join(format!("gen-{generation:020}.snap"))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Durable {
        path: path.display().to_string(),
        source,
    }
}

impl DurableStore for DirStore {
    fn put(&self, rank: u32, generation: u64, bytes: &[u8]) -> Result<()> {
        let dir = self.rank_dir(rank);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = self.path(rank, generation);
        let tmp = dir.join(format!(".gen-{generation:020}.snap.tmp"));
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        // The rename is durable only once the directory entry is.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        Ok(())
    }

    fn get(&self, rank: u32, generation: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path(rank, generation);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn list(&self, rank: u32) -> Result<Vec<u64>> {
        let dir = self.rank_dir(rank);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut generations: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("gen-")?
                    .strip_suffix(".snap")?
                    .parse()
                    .ok()
            })
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    fn remove(&self, rank: u32, generation: u64) -> Result<()> {
        let path = self.path(rank, generation);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// Writes one generation and keeps only the newest `keep`.
pub fn write_and_retain(
    store: &dyn DurableStore,
    rank: u32,
    generation: u64,
    bytes: &[u8],
    keep: usize,
) -> Result<()> {
    store.put(rank, generation, bytes)?;
    let generations = store.list(rank)?;
    let excess = generations.len().saturating_sub(keep);
    for &old in &generations[..excess] {
        store.remove(rank, old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path(), "job-a").unwrap();
        for g in [10, 20, 30] {
            write_and_retain(&store, 1, g, &[g as u8; 100], 2).unwrap();
        }
        assert_eq!(store.list(1).unwrap(), vec![20, 30]);
        assert_eq!(store.get(1, 30).unwrap().unwrap(), vec![30u8; 100]);
        assert_eq!(store.get(1, 10).unwrap(), None);
        assert_eq!(store.list(0).unwrap(), Vec::<u64>::new());
        // A crash mid-write leaves only a temp file, which is never listed.
        std::fs::write(
            dir.path()
                .join("job-a/rank-1/.gen-00000000000000000040.snap.tmp"),
            b"x",
        )
        .unwrap();
        assert_eq!(store.list(1).unwrap(), vec![20, 30]);
    }

    #[test]
    fn refuses_a_job_name_that_escapes_the_root() {
        assert!(DirStore::new(Path::new("/tmp"), "../x").is_err());
    }
}
