//! Store layouts (where a keyspace's rows live in PostgreSQL) and the SQL
//! they compile to. Pure: no connection, unit-tested here.

// The statements are only run by `PgStore`.
#![cfg_attr(not(feature = "postgres"), allow(dead_code))]

use serde::Deserialize;

use crate::{Error, Result};

/// The shared table of the [`StoreLayout::Default`] layout, created by the
/// crate's migrations.
pub const DEFAULT_TABLE: &str = "ringcache_entries";
/// The default key column of a [`TableLayout`].
pub const DEFAULT_KEY_COLUMN: &str = "key";
/// The default value column of a [`TableLayout`].
pub const DEFAULT_VALUE_COLUMN: &str = "value";
/// The default version column of a [`TableLayout`].
pub const DEFAULT_VERSION_COLUMN: &str = "version";

/// The two-phase-commit bookkeeping table, created by the crate's
/// migrations: one row per transaction between `prepare` and its
/// resolution, naming the keyspace and key it writes.
pub(crate) const TXN_TABLE: &str = "ringcache_2pc";

/// Where a keyspace's rows live, as written in the keyspace's TOML file:
///
/// ```toml
/// store = "default"
/// # or
/// store = { table = { name = "app.users", key_column = "id" } }
/// # or
/// [store.sql]
/// load = "SELECT body, rev FROM docs WHERE id = $1"
/// store = "INSERT INTO docs AS d (id, body, rev) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, rev = EXCLUDED.rev WHERE d.rev < EXCLUDED.rev"
/// delete = "INSERT INTO docs AS d (id, body, rev) VALUES ($1, NULL, $3) ON CONFLICT (id) DO UPDATE SET body = NULL, rev = EXCLUDED.rev WHERE d.rev < EXCLUDED.rev"
/// ```
///
/// Every layout supports two-phase commit: `prepare` runs the same write in
/// a transaction and prepares it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreLayout {
    /// The shared table `ringcache_entries (keyspace, key, value, version,
    /// updated_at)` that the crate's migrations create; rows are keyed by
    /// keyspace and key.
    #[default]
    Default,
    /// A table of yours holding only this keyspace.
    Table(TableLayout),
    /// Statements of yours.
    Sql(SqlLayout),
}

/// A table of yours that holds one keyspace (there is no keyspace column).
///
/// The table needs: the key column, `BYTEA`, with a primary key or unique
/// constraint on it alone (the upsert is `ON CONFLICT (key_column)`); the
/// value column, `BYTEA` and nullable (`NULL` is a tombstone); the version
/// column, `BIGINT NOT NULL`. Names are validated (`[A-Za-z_][A-Za-z0-9_]*`,
/// the table optionally `schema.table`) and quoted, so they are
/// case-sensitive. For keys of another type, use [`SqlLayout`] and convert
/// `$1` there (e.g. `convert_from($1, 'UTF8')`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableLayout {
    /// The table, `name` or `schema.name`.
    pub name: String,
    /// The key column; default `key`.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    /// The value column; default `value`.
    #[serde(default = "default_value_column")]
    pub value_column: String,
    /// The version column; default `version`.
    #[serde(default = "default_version_column")]
    pub version_column: String,
}

impl TableLayout {
    /// A layout for `name` with the default column names.
    pub fn new(name: impl Into<String>) -> Self {
        TableLayout {
            name: name.into(),
            key_column: default_key_column(),
            value_column: default_value_column(),
            version_column: default_version_column(),
        }
    }
}

fn default_key_column() -> String {
    DEFAULT_KEY_COLUMN.to_owned()
}

fn default_value_column() -> String {
    DEFAULT_VALUE_COLUMN.to_owned()
}

fn default_version_column() -> String {
    DEFAULT_VERSION_COLUMN.to_owned()
}

/// Statements of yours, run as prepared statements with bind parameters
/// `$1` the key (`BYTEA`), `$2` the value (`BYTEA`; `NULL` for `delete`) and
/// `$3` the version (`BIGINT`). A statement may leave out parameters it does
/// not need.
///
/// - `load` (only `$1`) returns at most one row of two columns: the value
///   (`BYTEA`, `NULL` for a tombstone) and the version (`BIGINT`); no row
///   means the key never existed.
/// - `store` writes the value **only if no row exists or the stored version
///   is lower than `$3`**, and must affect one row when it wrote and none
///   when it did not (an `INSERT ... ON CONFLICT ... DO UPDATE ... WHERE
///   old.version < EXCLUDED.version` does).
/// - `delete` likewise, under the same guard, and should **keep a tombstone**
///   (value `NULL`, version `$3`) rather than remove the row: a removed row
///   lets an older write that arrives late bring the key back.
///
/// The guards are yours to write; the store only counts affected rows and,
/// when none, runs `load` to report the stored version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlLayout {
    /// Loads `$1`: one row `(value BYTEA NULL, version BIGINT)` or none.
    pub load: String,
    /// Version-guarded upsert of `$1` to `$2` at version `$3`.
    pub store: String,
    /// Version-guarded tombstone of `$1` at version `$3` (`$2` is `NULL`).
    pub delete: String,
}

/// The statements of one layout. Parameters are bound in a fixed order:
/// key, value, version, then the keyspace when `with_keyspace` (`load`: key,
/// then the keyspace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Statements {
    /// Names the table (or "custom statements") in messages.
    pub(crate) target: String,
    pub(crate) load: String,
    pub(crate) store: String,
    pub(crate) delete: String,
    pub(crate) with_keyspace: bool,
    /// The version-guarded upsert of many rows in one statement, for the
    /// write-back worker's batches: `$1` the keys (`BYTEA[]`), `$2` the
    /// values (`BYTEA[]`, `NULL` elements are tombstones), `$3` the
    /// versions (`BIGINT[]`), then the keyspace when `with_keyspace`. The
    /// keys must be distinct (an upsert cannot touch a row twice); it
    /// affects one row per key it wrote. `None` for custom statements, which
    /// are run row by row.
    pub(crate) upsert_many: Option<String>,
}

impl StoreLayout {
    /// Validates the layout and builds its statements; `keyspace` only
    /// names the layout in errors.
    pub(crate) fn statements(&self, keyspace: &str) -> Result<Statements> {
        match self {
            StoreLayout::Default => Ok(default_statements()),
            StoreLayout::Table(table) => table_statements(keyspace, table),
            StoreLayout::Sql(sql) => sql_statements(keyspace, sql),
        }
    }
}

pub(crate) fn default_statements() -> Statements {
    // `$4` is the keyspace: the bind order is key, value, version, keyspace.
    let upsert = format!(
        "INSERT INTO {DEFAULT_TABLE} AS t (keyspace, key, value, version) \
         VALUES ($4, $1, $2, $3) \
         ON CONFLICT (keyspace, key) DO UPDATE \
         SET value = EXCLUDED.value, version = EXCLUDED.version, updated_at = now() \
         WHERE t.version < EXCLUDED.version"
    );
    Statements {
        target: format!("table {DEFAULT_TABLE}"),
        load: format!(
            "SELECT value, version FROM {DEFAULT_TABLE} WHERE key = $1 AND keyspace = $2"
        ),
        // A tombstone is the same upsert with a NULL value.
        delete: upsert.clone(),
        store: upsert,
        with_keyspace: true,
        upsert_many: Some(format!(
            "INSERT INTO {DEFAULT_TABLE} AS t (keyspace, key, value, version) \
             SELECT $4, u.key, u.value, u.version \
             FROM UNNEST($1::BYTEA[], $2::BYTEA[], $3::BIGINT[]) AS u(key, value, version) \
             ON CONFLICT (keyspace, key) DO UPDATE \
             SET value = EXCLUDED.value, version = EXCLUDED.version, updated_at = now() \
             WHERE t.version < EXCLUDED.version"
        )),
    }
}

fn table_statements(keyspace: &str, layout: &TableLayout) -> Result<Statements> {
    let table = qualified_name(keyspace, "name", &layout.name)?;
    let key = identifier(keyspace, "key_column", &layout.key_column)?;
    let value = identifier(keyspace, "value_column", &layout.value_column)?;
    let version = identifier(keyspace, "version_column", &layout.version_column)?;
    if layout.key_column == layout.value_column
        || layout.key_column == layout.version_column
        || layout.value_column == layout.version_column
    {
        return Err(config_error(
            keyspace,
            "table",
            "key_column, value_column and version_column must differ".to_owned(),
        ));
    }
    let upsert = format!(
        "INSERT INTO {table} AS t ({key}, {value}, {version}) VALUES ($1, $2, $3) \
         ON CONFLICT ({key}) DO UPDATE \
         SET {value} = EXCLUDED.{value}, {version} = EXCLUDED.{version} \
         WHERE t.{version} < EXCLUDED.{version}"
    );
    let upsert_many = format!(
        "INSERT INTO {table} AS t ({key}, {value}, {version}) \
         SELECT u.k, u.v, u.ver FROM UNNEST($1::BYTEA[], $2::BYTEA[], $3::BIGINT[]) AS u(k, v, ver) \
         ON CONFLICT ({key}) DO UPDATE \
         SET {value} = EXCLUDED.{value}, {version} = EXCLUDED.{version} \
         WHERE t.{version} < EXCLUDED.{version}"
    );
    Ok(Statements {
        target: format!("table {table}"),
        load: format!("SELECT {value}, {version} FROM {table} WHERE {key} = $1"),
        delete: upsert.clone(),
        store: upsert,
        with_keyspace: false,
        upsert_many: Some(upsert_many),
    })
}

fn sql_statements(keyspace: &str, layout: &SqlLayout) -> Result<Statements> {
    // Several statements in one are refused by PostgreSQL itself (they run
    // as prepared statements), with an error naming the keyspace.
    for (field, statement) in [
        ("load", &layout.load),
        ("store", &layout.store),
        ("delete", &layout.delete),
    ] {
        if statement.trim().is_empty() {
            return Err(config_error(keyspace, "sql", format!("{field} is empty")));
        }
    }
    Ok(Statements {
        target: "custom statements".to_owned(),
        load: layout.load.clone(),
        store: layout.store.clone(),
        delete: layout.delete.clone(),
        with_keyspace: false,
        upsert_many: None,
    })
}

/// `name` or `schema.name`, each part validated and quoted.
fn qualified_name(keyspace: &str, field: &'static str, name: &str) -> Result<String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(config_error(
            keyspace,
            "table",
            format!("{field} {name:?} has more than one '.' (expected name or schema.name)"),
        ));
    }
    let quoted = parts
        .iter()
        .map(|part| identifier(keyspace, field, part))
        .collect::<Result<Vec<_>>>()?;
    Ok(quoted.join("."))
}

/// A validated identifier, double-quoted.
fn identifier(keyspace: &str, field: &'static str, name: &str) -> Result<String> {
    let mut bytes = name.bytes();
    let valid_start = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    // PostgreSQL truncates identifiers to 63 bytes; refuse rather than
    // silently address another name.
    if !valid_start || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.len() > 63 {
        return Err(config_error(
            keyspace,
            "table",
            format!(
                "{field} {name:?} is not an identifier (letters, digits and '_', not starting \
                 with a digit, at most 63 bytes)"
            ),
        ));
    }
    Ok(format!("\"{name}\""))
}

fn config_error(keyspace: &str, layout: &str, reason: String) -> Error {
    Error::StoreRejected {
        keyspace: keyspace.to_owned(),
        message: format!("keyspace {keyspace:?}: invalid {layout} store layout: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<StoreLayout, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn layouts_deserialize_with_defaults() {
        assert_eq!(parse(r#""default""#).unwrap(), StoreLayout::Default);
        assert_eq!(
            parse(r#"{"table": {"name": "app.users", "key_column": "id"}}"#).unwrap(),
            StoreLayout::Table(TableLayout {
                name: "app.users".into(),
                key_column: "id".into(),
                value_column: "value".into(),
                version_column: "version".into(),
            })
        );
        assert_eq!(
            parse(r#"{"sql": {"load": "l", "store": "s", "delete": "d"}}"#).unwrap(),
            StoreLayout::Sql(SqlLayout {
                load: "l".into(),
                store: "s".into(),
                delete: "d".into(),
            })
        );
    }

    #[test]
    fn unknown_fields_and_variants_are_refused() {
        assert!(parse(r#"{"table": {"name": "t", "colour": "red"}}"#).is_err());
        assert!(parse(r#"{"sql": {"load": "l", "store": "s"}}"#).is_err());
        assert!(parse(r#""mysql""#).is_err());
    }

    #[test]
    fn batch_upserts_keep_the_version_guard_and_custom_statements_have_none() {
        let default = StoreLayout::Default.statements("ks").unwrap();
        let many = default.upsert_many.as_deref().unwrap();
        assert!(many.contains("UNNEST($1::BYTEA[], $2::BYTEA[], $3::BIGINT[])"));
        assert!(many.contains("SELECT $4,"));
        assert!(many.contains("WHERE t.version < EXCLUDED.version"));
        let table = StoreLayout::Table(TableLayout::new("app.users"))
            .statements("users")
            .unwrap();
        let many = table.upsert_many.as_deref().unwrap();
        assert!(many.contains(r#"INSERT INTO "app"."users""#));
        assert!(many.contains(r#"WHERE t."version" < EXCLUDED."version""#));
        let custom = StoreLayout::Sql(SqlLayout {
            load: "l".into(),
            store: "s".into(),
            delete: "d".into(),
        })
        .statements("c")
        .unwrap();
        assert_eq!(custom.upsert_many, None);
    }

    #[test]
    fn table_statements_quote_identifiers() {
        let layout = StoreLayout::Table(TableLayout {
            key_column: "Id".into(),
            ..TableLayout::new("app.users")
        });
        let statements = layout.statements("users").unwrap();
        assert_eq!(
            statements.load,
            r#"SELECT "value", "version" FROM "app"."users" WHERE "Id" = $1"#
        );
        assert!(statements.store.contains(r#"ON CONFLICT ("Id")"#));
        assert!(
            statements
                .store
                .contains(r#"WHERE t."version" < EXCLUDED."version""#)
        );
        assert!(!statements.with_keyspace);
    }

    #[test]
    fn bad_identifiers_are_refused_naming_keyspace_and_field() {
        for name in [
            "",
            "users; DROP TABLE x",
            "1users",
            "a.b.c",
            "us\"ers",
            "a.",
            &"x".repeat(64),
        ] {
            let err = StoreLayout::Table(TableLayout::new(name))
                .statements("ks")
                .unwrap_err();
            assert!(!err.is_retryable());
            let message = err.to_string();
            assert!(
                message.contains("keyspace \"ks\"") && message.contains("name"),
                "{message}"
            );
        }
        let same = TableLayout {
            value_column: "key".into(),
            ..TableLayout::new("t")
        };
        assert!(StoreLayout::Table(same).statements("ks").is_err());
    }

    #[test]
    fn sql_layouts_must_be_non_empty() {
        let ok = SqlLayout {
            load: "SELECT 1".into(),
            store: "UPDATE t SET v = $2".into(),
            delete: "UPDATE t SET v = NULL".into(),
        };
        assert!(StoreLayout::Sql(ok.clone()).statements("ks").is_ok());
        let empty = SqlLayout {
            load: " ".into(),
            ..ok
        };
        assert!(StoreLayout::Sql(empty).statements("ks").is_err());
    }
}
