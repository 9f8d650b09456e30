//! The enrollment record on disk (`<state dir>/enrolled.json`): which pods this node enrolled.

use std::collections::HashSet;
use std::path::PathBuf;

use mesh_contract::Chain;

/// Why the record on disk could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MarksError {
    #[error("reading {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{} is not a list of pod uids", .0.display())]
    Parse(PathBuf, #[source] serde_json::Error),
}

/// Persistent record of which pods this node enrolled, so rules lost with a reboot are
/// noticed and reported rather than silently reinstalled. Written atomically
/// ([`write_atomic`](crate::install::write_atomic)).
#[derive(Debug)]
pub struct Marks {
    file: Option<PathBuf>,
    uids: HashSet<String>,
    /// The file could not be read: which pods were enrolled is unknown, so every pod counts
    /// as marked (missing rules are reported as lost, never taken as a first install).
    damaged: bool,
}

impl Marks {
    /// Reads `file`; a missing file is an empty record. A file that cannot be read or parsed
    /// (torn by a crash, edited by hand) is an error, not an empty set: the caller reports it
    /// and goes on with [`Marks::damaged`].
    pub fn load(file: Option<PathBuf>) -> Result<Self, MarksError> {
        let uids = match &file {
            None => HashSet::new(),
            Some(f) => match std::fs::read(f) {
                Ok(data) => {
                    serde_json::from_slice(&data).map_err(|e| MarksError::Parse(f.clone(), e))?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
                Err(e) => return Err(MarksError::Read(f.clone(), e)),
            },
        };
        Ok(Self {
            file,
            uids,
            damaged: false,
        })
    }

    /// The record to go on with after `load` failed: the unreadable file is moved aside (kept
    /// for a person to look at) and every pod counts as marked until it is written anew.
    pub fn damaged(file: PathBuf) -> Self {
        let aside = file.with_extension("json.unreadable");
        if let Err(e) = std::fs::rename(&file, &aside) {
            tracing::warn!(file = %file.display(), error = %e, "cannot move the unreadable enrollment record aside");
        }
        Self {
            file: Some(file),
            uids: HashSet::new(),
            damaged: true,
        }
    }

    pub(super) fn contains(&self, uid: &str) -> bool {
        self.damaged || self.uids.contains(uid)
    }

    /// Whether `uid` is in the record itself (a damaged record holds nobody for sure).
    pub(super) fn recorded(&self, uid: &str) -> bool {
        self.uids.contains(uid)
    }

    pub(super) fn recorded_uids(&self) -> Vec<String> {
        self.uids.iter().cloned().collect()
    }

    /// Records `uid` as enrolled (`on`) or not. The write and its fsyncs run on a blocking
    /// thread, never on the runtime's; the manager awaits each, so writes stay in order.
    pub(super) async fn set(&mut self, uid: &str, on: bool) {
        let changed = if on {
            self.uids.insert(uid.to_string())
        } else {
            self.uids.remove(uid)
        };
        if changed && let Some(f) = &self.file {
            let mut list: Vec<&String> = self.uids.iter().collect();
            list.sort();
            let data = serde_json::to_vec(&list).expect("strings serialize");
            let f = f.clone();
            let written =
                tokio::task::spawn_blocking(move || crate::install::write_atomic(&f, &data, 0o600))
                    .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %Chain(&e), "cannot persist enrollment marks"),
                Err(e) => tracing::warn!(error = %e, "cannot persist enrollment marks"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::Marks;

    #[tokio::test]
    async fn marks_persist_atomically_and_a_torn_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("enrolled.json");
        let mut marks = Marks::load(Some(file.clone())).unwrap();
        assert!(!marks.contains("ns/a"));
        marks.set("ns/a", true).await;
        marks.set("ns/b", true).await;
        marks.set("ns/b", false).await;
        let again = Marks::load(Some(file.clone())).unwrap();
        assert!(again.contains("ns/a") && !again.contains("ns/b"));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["enrolled.json"], "temporary files left behind");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A write cut short by a crash on a filesystem without the rename guarantee.
        std::fs::write(&file, b"[\"ns/a\", \"ns/").unwrap();
        let err = Marks::load(Some(file.clone())).unwrap_err().to_string();
        assert!(err.contains("is not a list of pod uids"), "{err}");
        let damaged = Marks::damaged(file.clone());
        assert!(damaged.contains("ns/a") && damaged.contains("ns/anything"));
        assert!(!file.exists());
        assert!(dir.path().join("enrolled.json.unreadable").exists());
    }
}
