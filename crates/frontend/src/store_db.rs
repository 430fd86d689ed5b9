//! Answering the cheapest store queries from the local store's database.
//!
//! `IsValidPath` and `QueryPathInfo` cost the daemon a database lookup; relaying them costs
//! two more process wake-ups per call, which more than doubles their round trip. When the
//! upstream is the local store, the translator reads its SQLite database (read-only, each
//! query its own read transaction, so it sees every committed change) and answers these two
//! itself. Any database error falls back to relaying. Frontends planning a build read which
//! outputs are valid from it the same way ([`valid_paths`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nixspace_nix_formats::hash::Hash;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::PathInfo;
use nixspace_nix_tools::local_store::{self, file_identity};
use nixspace_nix_tools::{DaemonPool, StepError};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// The local store's database, opened read-only. If the file is replaced (a store wiped and
/// made anew while nixspace runs, as Nix's own tests do between steps), it is opened again, so
/// answers never come from a database that is no longer the store's.
pub struct StoreDb {
    conn: Mutex<Opened>,
    store_dir: StoreDir,
    path: PathBuf,
}

/// A connection and the file it was opened on.
struct Opened {
    conn: Connection,
    file: FileId,
}

/// Which file a path names (device and inode): a file removed and created anew is another.
type FileId = (u64, u64);

/// Open Nix's database at `path` read-only, if it looks like Nix's.
fn open_nix_db(path: &Path) -> Option<Opened> {
    let file = file_identity(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).ok()?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).ok()?;
    // Nix's schema: refuse anything else rather than misread it.
    conn.prepare("SELECT id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca FROM ValidPaths LIMIT 0")
        .ok()?;
    conn.prepare("SELECT referrer, reference FROM Refs LIMIT 0")
        .ok()?;
    Some(Opened { conn, file })
}

impl std::fmt::Debug for StoreDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreDb({})", self.path.display())
    }
}

/// The open connection, held for one query.
struct ConnGuard<'a>(std::sync::MutexGuard<'a, Opened>);

impl std::ops::Deref for ConnGuard<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0.conn
    }
}

/// Why a query could not be answered from the database (the caller relays it instead).
#[derive(Debug, thiserror::Error)]
pub enum StoreDbError {
    /// The database file is gone, or what replaced it is not Nix's database (yet).
    #[error("store database: replaced by something that cannot be read")]
    Replaced,
    /// SQLite failed.
    #[error("store database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row held something that is not a valid store path or hash.
    #[error("store database: unexpected value {0:?}")]
    Value(String),
}

impl StoreDb {
    /// The database of the store whose state directory is `state_dir` (`NIX_STATE_DIR`,
    /// `/nix/var/nix` by default), if it can be opened and looks like Nix's.
    pub fn open(state_dir: &Path, store_dir: StoreDir) -> Option<StoreDb> {
        let path = local_store::db_path(state_dir);
        let opened = open_nix_db(&path)?;
        tracing::debug!(db = %path.display(), "opened the store database");
        Some(StoreDb {
            conn: Mutex::new(opened),
            store_dir,
            path,
        })
    }

    /// The database of the local store (`NIX_STATE_DIR`, `/nix/var/nix` by default), the one
    /// `NIX_REMOTE=local` Nix commands and daemons use, if it can be opened.
    pub fn open_local(store_dir: StoreDir) -> Option<StoreDb> {
        StoreDb::open(&local_store::state_dir(), store_dir)
    }

    /// The subset of `paths` that is valid, read in one transaction (one snapshot of the
    /// database).
    pub fn valid_paths(
        &self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreDbError> {
        let conn = self.lock()?;
        let snapshot = conn.unchecked_transaction()?;
        let mut valid = BTreeSet::new();
        {
            let mut q = snapshot.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")?;
            for path in paths {
                if q.exists(params![self.store_dir.print(path)])? {
                    valid.insert(path.clone());
                }
            }
        }
        snapshot.finish()?;
        Ok(valid)
    }

    /// Whether `path` is valid.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreDbError> {
        let conn = self.lock()?;
        let mut q = conn.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")?;
        Ok(q.exists(params![self.store_dir.print(path)])?)
    }

    /// What the store knows about `path`, if it is valid.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreDbError> {
        let conn = self.lock()?;
        let mut q = conn.prepare_cached(
            "SELECT id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca
             FROM ValidPaths WHERE path = ?1",
        )?;
        type Row = (
            i64,
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = q
            .query_row(params![self.store_dir.print(path)], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .optional()?;
        let Some((id, hash, registered, deriver, nar_size, ultimate, sigs, ca)) = row else {
            return Ok(None);
        };
        let mut refs = conn.prepare_cached(
            "SELECT path FROM Refs JOIN ValidPaths ON reference = id WHERE referrer = ?1",
        )?;
        let references = refs
            .query_map(params![id], |r| r.get::<_, String>(0))?
            .map(|p| self.store_path(&p?))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let nar_hash = Hash::parse_any(&hash, None).map_err(|_| StoreDbError::Value(hash))?;
        let deriver = deriver
            .filter(|d| !d.is_empty())
            .map(|d| self.store_path(&d))
            .transpose()?;
        Ok(Some(PathInfo {
            deriver,
            nar_hash,
            references,
            registration_time: u64::try_from(registered).unwrap_or(0),
            nar_size: nar_size.and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
            ultimate: ultimate.unwrap_or(0) != 0,
            sigs: sigs
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            ca: ca.filter(|c| !c.is_empty()),
        }))
    }

    fn store_path(&self, text: &str) -> Result<StorePath, StoreDbError> {
        self.store_dir
            .parse(text)
            .map_err(|_| StoreDbError::Value(text.to_owned()))
    }

    /// The connection, on the file the store's database is now (opened again if the file was
    /// replaced).
    fn lock(&self) -> Result<ConnGuard<'_>, StoreDbError> {
        let mut opened = self
            .conn
            .lock()
            .map_err(|_| StoreDbError::Value("connection lock poisoned".to_owned()))?;
        if file_identity(&self.path) != Some(opened.file) {
            *opened = open_nix_db(&self.path).ok_or(StoreDbError::Replaced)?;
            tracing::debug!(db = %self.path.display(), "the store database was replaced; opened it again");
        }
        Ok(ConnGuard(opened))
    }
}

/// Which of `paths` are valid in the store of `pool`: read from its database `db` when there
/// is one (no process, no round trip), else asked with one `QueryValidPaths` through `pool`.
pub async fn valid_paths(
    paths: &BTreeSet<StorePath>,
    db: Option<&StoreDb>,
    pool: &DaemonPool,
) -> Result<BTreeSet<StorePath>, StepError> {
    if paths.is_empty() {
        return Ok(BTreeSet::new());
    }
    if let Some(db) = db {
        match db.valid_paths(paths) {
            Ok(valid) => return Ok(valid),
            Err(error) => tracing::debug!(%error, "asking the Nix daemon instead"),
        }
    }
    let mut lease = pool.lease().await?;
    match lease.client().query_valid_paths(paths, false).await {
        Ok(valid) => {
            lease.release();
            Ok(valid)
        }
        Err(e) => Err(lease.failed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_is_not_nix_s_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("db")).unwrap();
        assert!(
            StoreDb::open(dir.path(), StoreDir::default()).is_none(),
            "missing"
        );
        let conn = Connection::open(dir.path().join("db/db.sqlite")).unwrap();
        conn.execute_batch("CREATE TABLE ValidPaths (id INTEGER, path TEXT);")
            .unwrap();
        drop(conn);
        assert!(
            StoreDb::open(dir.path(), StoreDir::default()).is_none(),
            "other schema"
        );
    }

    /// Nix's tables in a new database file `dir/db/db.sqlite`, then `rows` (SQL).
    fn nix_db(dir: &Path, rows: &str) {
        std::fs::create_dir_all(dir.join("db")).unwrap();
        let conn = Connection::open(dir.join("db/db.sqlite")).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null,
               hash text not null, registrationTime integer not null, deriver text, narSize integer,
               ultimate integer, sigs text, ca text);
             CREATE TABLE Refs (referrer integer not null, reference integer not null, primary key (referrer, reference));
             {rows}"
        ))
        .unwrap();
    }

    #[test]
    fn a_database_replaced_while_open_is_read_anew() {
        let dir = tempfile::tempdir().unwrap();
        let row = |id: u32, path: &str| {
            format!("INSERT INTO ValidPaths VALUES ({id}, '{path}', 'sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae', 1, NULL, 1, 0, '', '');")
        };
        let (a, b) = (
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a",
            "/nix/store/0vkw1m51q34dr64z5i87dy99an4hfmyg-b",
        );
        nix_db(dir.path(), &row(1, a));
        let db = StoreDb::open(dir.path(), StoreDir::default()).unwrap();
        let store = StoreDir::default();
        let (a, b) = (store.parse(a).unwrap(), store.parse(b).unwrap());
        assert!(db.is_valid(&a).unwrap() && !db.is_valid(&b).unwrap());
        // The store is wiped and made anew while the database is open.
        std::fs::remove_dir_all(dir.path().join("db")).unwrap();
        assert!(matches!(db.is_valid(&a), Err(StoreDbError::Replaced)));
        nix_db(dir.path(), &row(1, &store.print(&b)));
        assert!(!db.is_valid(&a).unwrap(), "answered from the removed file");
        assert!(db.is_valid(&b).unwrap());
    }

    #[test]
    fn rows_read_like_nix_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        nix_db(
            dir.path(),
            "INSERT INTO ValidPaths VALUES (1, '/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a',
               'sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae', 7, NULL, 120, 1, 'k:c2ln', NULL);
             INSERT INTO ValidPaths VALUES (2, '/nix/store/0vkw1m51q34dr64z5i87dy99an4hfmyg-b',
               'sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae', 8, '', 1, NULL, '', '');
             INSERT INTO Refs VALUES (1, 2), (1, 1);",
        );
        let db = StoreDb::open(dir.path(), StoreDir::default()).unwrap();
        let dir_ = StoreDir::default();
        let a = dir_
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a")
            .unwrap();
        let b = dir_
            .parse("/nix/store/0vkw1m51q34dr64z5i87dy99an4hfmyg-b")
            .unwrap();
        let missing = dir_
            .parse("/nix/store/00000000000000000000000000000000-c")
            .unwrap();
        assert!(db.is_valid(&a).unwrap());
        assert!(!db.is_valid(&missing).unwrap());
        let asked = [a.clone(), b.clone(), missing.clone()].into();
        assert_eq!(
            db.valid_paths(&asked).unwrap(),
            [a.clone(), b.clone()].into()
        );
        let info = db.path_info(&a).unwrap().unwrap();
        assert_eq!(info.references, [a.clone(), b.clone()].into());
        assert_eq!(
            (info.nar_size, info.registration_time, info.ultimate),
            (120, 7, true)
        );
        assert_eq!(info.sigs, ["k:c2ln".to_owned()].into());
        let info = db.path_info(&b).unwrap().unwrap();
        assert_eq!((info.deriver, info.ca, info.ultimate), (None, None, false));
        assert!(db.path_info(&missing).unwrap().is_none());
    }
}
