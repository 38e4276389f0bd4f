//! The history database: SQLite (rusqlite, its bundled SQLite) in WAL
//! mode. One table of subjects (a device, server, service or interface by
//! name) and one of totals per tier (minute, hour, day) and bucket.
//!
//! Every write adds the same counts to all three tiers in one
//! transaction, so a tier's bucket always equals the sum of the finer
//! buckets in it (while they are kept): roll-ups are exact by
//! construction, and retention only ever deletes whole old buckets.

use std::{collections::HashMap, path::Path, time::Duration};

use ntm_common::Counters;
use rusqlite::{Connection, OpenFlags, params};

use super::{Tier, Totals};
use crate::model::subjects::Subject;

/// The schema this build writes (`PRAGMA user_version`). A file with a
/// higher one was written by a newer ntm and is left alone.
pub const SCHEMA_VERSION: i64 = 1;

/// What went wrong with the database at `path` (":memory:" for the one in
/// memory). Each message names its cause, which is also its source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite says the file is not a database, or a damaged one: it may be
    /// moved aside ([`StoreError::is_damaged`]).
    #[error("{path} is not an SQLite database, or is damaged ({source})")]
    Corrupt {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite's `quick_check` found damage (what it says is `found`): as
    /// [`StoreError::Corrupt`].
    #[error("{path} is damaged (SQLite's quick check says: {found})")]
    FailedCheck { path: String, found: String },
    #[error(
        "{path} was written by a newer ntm (schema {found}; this one knows {SCHEMA_VERSION}); it is left as it is: upgrade ntm, or move the file away to start a new history"
    )]
    Newer { path: String, found: i64 },
    /// The file (or its folder) cannot be written: a read-only file or
    /// mount, or one the agent's user does not own.
    #[error(
        "{path} cannot be written ({source}): make it and its folder writable by the agent's user, or give another --state-dir"
    )]
    ReadOnly {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// The file is damaged: moving it aside and starting a new one is
    /// what can be done (a newer or read-only one is left as it is).
    pub fn is_damaged(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::FailedCheck { .. })
    }
}

/// The database, with the ids of the subjects written so far.
pub struct Store {
    db: Connection,
    name: String,
    subjects: HashMap<(Subject, String), i64>,
    /// Bumped by every write: what a reader computed from the store holds
    /// while this stays the same.
    writes: u64,
}

fn kind_code(kind: Subject) -> i64 {
    match kind {
        Subject::Device => 0,
        Subject::Server => 1,
        Subject::Service => 2,
        Subject::Interface => 3,
    }
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS subjects (
        id INTEGER PRIMARY KEY,
        kind INTEGER NOT NULL,
        name TEXT NOT NULL,
        UNIQUE (kind, name)
    );
    CREATE TABLE IF NOT EXISTS totals (
        tier INTEGER NOT NULL,
        start INTEGER NOT NULL,
        subject INTEGER NOT NULL,
        in_bytes INTEGER NOT NULL,
        in_packets INTEGER NOT NULL,
        out_bytes INTEGER NOT NULL,
        out_packets INTEGER NOT NULL,
        PRIMARY KEY (tier, subject, start)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS totals_by_time ON totals (tier, start);
";

impl Store {
    /// Opens (or creates) the database at `path`; checks it is one, and of
    /// a schema this build can write.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let name = path.display().to_string();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let db = Connection::open_with_flags(path, flags).map_err(|source| StoreError::Sqlite {
            path: name.clone(),
            source,
        })?;
        Self::prepare(db, name)
    }

    /// A database in memory: the history of this run only (when the file
    /// cannot be used).
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Connection::open_in_memory().map_err(|source| StoreError::Sqlite {
            path: ":memory:".into(),
            source,
        })?;
        Self::prepare(db, ":memory:".into())
    }

    fn prepare(db: Connection, name: String) -> Result<Self, StoreError> {
        let sqlite = |source: rusqlite::Error| match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ReadOnly) => StoreError::ReadOnly {
                path: name.clone(),
                source,
            },
            _ => StoreError::Sqlite {
                path: name.clone(),
                source,
            },
        };
        let corrupt = |source: rusqlite::Error| match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                StoreError::Corrupt {
                    path: name.clone(),
                    source,
                }
            }
            _ => sqlite(source),
        };
        db.busy_timeout(Duration::from_secs(2)).map_err(sqlite)?;
        let version: i64 = db
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(corrupt)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Newer {
                path: name,
                found: version,
            });
        }
        let check: String = db
            .pragma_query_value(None, "quick_check", |row| row.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            return Err(StoreError::FailedCheck {
                path: name,
                found: check,
            });
        }
        // Before the first table: lets the size cap give pages back.
        db.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(sqlite)?;
        // WAL: a kill -9 loses no committed transaction; NORMAL: a power
        // loss may lose the last commits, never the file.
        let _: String = db
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(corrupt)?;
        db.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite)?;
        db.execute_batch(SCHEMA).map_err(corrupt)?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sqlite)?;
        Ok(Self {
            db,
            name,
            subjects: HashMap::new(),
            writes: 0,
        })
    }

    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.name.clone(),
            source,
        }
    }

    /// Adds `batch` (counts per minute bucket and subject) to every tier,
    /// in one transaction: all of it or, on an error, none of it.
    pub fn add(
        &mut self,
        batch: &HashMap<(i64, Subject, String), [Counters; 2]>,
        day_start: impl Fn(i64) -> i64,
    ) -> Result<(), StoreError> {
        let Self {
            db,
            subjects,
            name,
            writes,
        } = self;
        // Before anything is written: a write that fails half-way (rolled
        // back) counts too, which costs a reader one needless recount.
        *writes += 1;
        let sqlite = |source| StoreError::Sqlite {
            path: name.clone(),
            source,
        };
        let tx = db.transaction().map_err(sqlite)?;
        let mut new_subjects = Vec::new();
        {
            let mut find = tx
                .prepare_cached(
                    "INSERT INTO subjects (kind, name) VALUES (?1, ?2)
                     ON CONFLICT (kind, name) DO UPDATE SET name = excluded.name
                     RETURNING id",
                )
                .map_err(sqlite)?;
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO totals VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (tier, subject, start) DO UPDATE SET
                        in_bytes = in_bytes + excluded.in_bytes,
                        in_packets = in_packets + excluded.in_packets,
                        out_bytes = out_bytes + excluded.out_bytes,
                        out_packets = out_packets + excluded.out_packets",
                )
                .map_err(sqlite)?;
            for ((minute, kind, subject), [inward, outward]) in batch {
                let key = (*kind, subject.clone());
                let id = match subjects.get(&key) {
                    Some(id) => *id,
                    None => {
                        let id: i64 = find
                            .query_row(params![kind_code(*kind), subject], |row| row.get(0))
                            .map_err(sqlite)?;
                        new_subjects.push((key, id));
                        id
                    }
                };
                for (tier, start) in [
                    (Tier::Minute, *minute),
                    (Tier::Hour, minute - minute.rem_euclid(3600)),
                    (Tier::Day, day_start(*minute)),
                ] {
                    upsert
                        .execute(params![
                            tier as i64,
                            start,
                            id,
                            inward.bytes as i64,
                            inward.packets as i64,
                            outward.bytes as i64,
                            outward.packets as i64
                        ])
                        .map_err(sqlite)?;
                }
            }
        }
        tx.commit().map_err(sqlite)?;
        // Only once committed: a rolled-back subject has no id.
        subjects.extend(new_subjects);
        Ok(())
    }

    /// Deletes buckets older than their tier keeps them (`keep_after` per
    /// tier, Unix seconds), then the oldest buckets, finest tier first,
    /// while the file is larger than `max_bytes`. Returns the rows deleted.
    pub fn prune(
        &mut self,
        keep_after: [(Tier, i64); 3],
        max_bytes: u64,
    ) -> Result<u64, StoreError> {
        self.writes += 1;
        let mut deleted = 0u64;
        for (tier, after) in keep_after {
            deleted += self
                .db
                .execute(
                    "DELETE FROM totals WHERE tier = ?1 AND start < ?2",
                    params![tier as i64, after],
                )
                .map_err(|e| self.sqlite(e))? as u64;
        }
        // Over the cap: a tenth of the oldest buckets at a time.
        for tier in [Tier::Minute, Tier::Hour, Tier::Day] {
            for _ in 0..20 {
                if self.size()? <= max_bytes {
                    break;
                }
                let removed = self
                    .db
                    .execute(
                        "DELETE FROM totals WHERE tier = ?1 AND start <= (
                            SELECT start FROM totals WHERE tier = ?1 ORDER BY start
                            LIMIT 1 OFFSET (SELECT COUNT(*) / 10 FROM totals WHERE tier = ?1))",
                        params![tier as i64],
                    )
                    .map_err(|e| self.sqlite(e))?;
                deleted += removed as u64;
                self.db
                    .execute_batch("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
                    .map_err(|e| self.sqlite(e))?;
                if removed == 0 {
                    break;
                }
            }
        }
        if deleted > 0 {
            self.db
                .execute(
                    "DELETE FROM subjects WHERE id NOT IN (SELECT DISTINCT subject FROM totals)",
                    [],
                )
                .map_err(|e| self.sqlite(e))?;
            self.subjects.clear();
        }
        Ok(deleted)
    }

    /// How many writes (commits, prunes) the store has had: a figure
    /// computed from it holds while this stays the same.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The file's size in bytes (pages in use and free), the WAL aside.
    pub fn size(&self) -> Result<u64, StoreError> {
        let pages: i64 = self
            .db
            .pragma_query_value(None, "page_count", |row| row.get(0))
            .map_err(|e| self.sqlite(e))?;
        let page: i64 = self
            .db
            .pragma_query_value(None, "page_size", |row| row.get(0))
            .map_err(|e| self.sqlite(e))?;
        Ok((pages * page) as u64)
    }

    /// Each subject's totals of `kind` in `tier` buckets starting at or
    /// after `since`.
    pub fn totals_since(
        &self,
        kind: Subject,
        tier: Tier,
        since: i64,
    ) -> Result<HashMap<String, Totals>, StoreError> {
        self.totals_between(kind, tier, (since, i64::MAX))
    }

    /// Each subject's totals of `kind` in `tier` buckets starting in
    /// `[from, to)`.
    pub fn totals_between(
        &self,
        kind: Subject,
        tier: Tier,
        (from, to): (i64, i64),
    ) -> Result<HashMap<String, Totals>, StoreError> {
        let mut query = self
            .db
            .prepare_cached(
                "SELECT s.name, SUM(t.in_bytes), SUM(t.in_packets), SUM(t.out_bytes), SUM(t.out_packets)
                 FROM totals t JOIN subjects s ON s.id = t.subject
                 WHERE t.tier = ?1 AND t.start >= ?2 AND t.start < ?4 AND s.kind = ?3
                 GROUP BY s.name",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = query
            .query_map(params![tier as i64, from, kind_code(kind), to], |row| {
                Ok((row.get::<_, String>(0)?, counts(row, 1)?))
            })
            .map_err(|e| self.sqlite(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sqlite(e))
    }

    /// One subject's buckets of `tier` from `from` (inclusive) to `to`
    /// (exclusive), grouped into steps of `step` seconds: (step start,
    /// totals), oldest first.
    pub fn series(
        &self,
        kind: Subject,
        name: &str,
        tier: Tier,
        (from, to): (i64, i64),
        step: i64,
    ) -> Result<Vec<(i64, Totals)>, StoreError> {
        let mut query = self
            .db
            .prepare_cached(
                "SELECT t.start - ((t.start - ?4) % ?5), SUM(t.in_bytes), SUM(t.in_packets), SUM(t.out_bytes), SUM(t.out_packets)
                 FROM totals t JOIN subjects s ON s.id = t.subject
                 WHERE t.tier = ?1 AND s.kind = ?2 AND s.name = ?3 AND t.start >= ?4 AND t.start < ?6
                 GROUP BY 1 ORDER BY 1",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = query
            .query_map(
                params![tier as i64, kind_code(kind), name, from, step.max(1), to],
                |row| Ok((row.get::<_, i64>(0)?, counts(row, 1)?)),
            )
            .map_err(|e| self.sqlite(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sqlite(e))
    }
}

fn counts(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Totals> {
    let get = |i: usize| row.get::<_, i64>(first + i).map(|v| v.max(0) as u64);
    Ok([
        Counters {
            bytes: get(0)?,
            packets: get(1)?,
        },
        Counters {
            bytes: get(2)?,
            packets: get(3)?,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(bytes: u64, packets: u64) -> Counters {
        Counters { bytes, packets }
    }

    /// Days start at midnight UTC here.
    fn day(t: i64) -> i64 {
        t - t.rem_euclid(86_400)
    }

    #[test]
    fn the_tiers_roll_up_exactly() {
        let mut store = Store::in_memory().unwrap();
        let mut batch = HashMap::new();
        let t0 = 1_700_000_000 - 1_700_000_000 % 86_400;
        // Every minute of two days, some bytes each way.
        for m in 0..(2 * 1440) {
            let minute = t0 + 60 * m;
            batch.insert(
                (minute, Subject::Device, "laptop".to_string()),
                [c(m as u64 + 1, 1), c(2 * m as u64, 2)],
            );
        }
        store.add(&batch, day).unwrap();
        let by_tier =
            |store: &Store, tier| store.totals_since(Subject::Device, tier, 0).unwrap()["laptop"];
        assert_eq!(by_tier(&store, Tier::Minute), by_tier(&store, Tier::Hour));
        assert_eq!(by_tier(&store, Tier::Hour), by_tier(&store, Tier::Day));
        let minutes = store
            .series(
                Subject::Device,
                "laptop",
                Tier::Minute,
                (t0, t0 + 3600),
                3600,
            )
            .unwrap();
        let hours = store
            .series(Subject::Device, "laptop", Tier::Hour, (t0, t0 + 3600), 3600)
            .unwrap();
        assert_eq!(minutes, hours);
        assert_eq!(minutes[0].1[0], c((1..=60).sum(), 60));
        let days = store
            .series(
                Subject::Device,
                "laptop",
                Tier::Day,
                (t0, t0 + 2 * 86_400),
                86_400,
            )
            .unwrap();
        assert_eq!(days.len(), 2);
        let hours = store
            .series(
                Subject::Device,
                "laptop",
                Tier::Hour,
                (t0, t0 + 2 * 86_400),
                86_400,
            )
            .unwrap();
        assert_eq!(days, hours);
        // Adding again adds.
        store.add(&batch, day).unwrap();
        assert_eq!(by_tier(&store, Tier::Day)[0].packets, 2 * 2 * 1440);
    }

    #[test]
    fn retention_and_the_size_cap_delete_old_buckets_first() {
        let mut store = Store::in_memory().unwrap();
        let mut batch = HashMap::new();
        for m in 0..3000i64 {
            batch.insert(
                (60 * m, Subject::Server, format!("s{}", m % 50)),
                [c(1, 1), c(0, 0)],
            );
        }
        store.add(&batch, day).unwrap();
        let deleted = store
            .prune(
                [(Tier::Minute, 60 * 1000), (Tier::Hour, 0), (Tier::Day, 0)],
                u64::MAX,
            )
            .unwrap();
        assert_eq!(deleted, 1000);
        let left: u64 = store
            .totals_since(Subject::Server, Tier::Minute, 0)
            .unwrap()
            .values()
            .map(|t| t[0].packets)
            .sum();
        assert_eq!(left, 2000);
        // The hours still have everything.
        let hours: u64 = store
            .totals_since(Subject::Server, Tier::Hour, 0)
            .unwrap()
            .values()
            .map(|t| t[0].packets)
            .sum();
        assert_eq!(hours, 3000);
        let size = store.size().unwrap();
        store
            .prune(
                [(Tier::Minute, 0), (Tier::Hour, 0), (Tier::Day, 0)],
                size / 2,
            )
            .unwrap();
        let minutes = store
            .totals_since(Subject::Server, Tier::Minute, 0)
            .unwrap();
        let left: u64 = minutes.values().map(|t| t[0].packets).sum();
        assert!(left < 2000, "{left}");
    }

    #[test]
    fn a_file_that_is_not_a_database_and_a_newer_schema_are_refused() {
        let dir = std::env::temp_dir().join(format!("ntm-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let damaged = Store::open(&garbage).err().unwrap();
        assert!(
            matches!(damaged, StoreError::Corrupt { .. }) && damaged.is_damaged(),
            "{damaged:?}"
        );
        let newer = dir.join("newer.db");
        {
            let db = Connection::open(&newer).unwrap();
            db.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open(&newer),
            Err(StoreError::Newer { found: 99, .. })
        ));
        let fine = dir.join("fine.db");
        let mut store = Store::open(&fine).unwrap();
        let batch = HashMap::from([(
            (60, Subject::Interface, "eth0".to_string()),
            [c(5, 1), c(7, 1)],
        )]);
        store.add(&batch, day).unwrap();
        drop(store);
        let store = Store::open(&fine).unwrap();
        assert_eq!(
            store
                .totals_since(Subject::Interface, Tier::Day, 0)
                .unwrap()["eth0"],
            [c(5, 1), c(7, 1)]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A database that cannot be written is said to be read-only (not
    /// damaged: it is left as it is), with SQLite's error as its source.
    #[test]
    fn a_read_only_database_is_not_damaged() {
        use std::error::Error as _;
        let dir = std::env::temp_dir().join(format!("ntm-store-ro-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ro.db");
        drop(Store::open(&path).unwrap());
        // Root ignores file modes: a read-only connection stands for them.
        let db = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let e = Store::prepare(db, path.display().to_string())
            .err()
            .unwrap();
        assert!(matches!(e, StoreError::ReadOnly { .. }), "{e:?}");
        assert!(!e.is_damaged());
        let cause = e.source().unwrap().to_string();
        assert_eq!(e.to_string().matches(&cause).count(), 1, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
