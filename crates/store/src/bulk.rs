//! Moving many rows through one statement. sqlx binds and decodes value by
//! value, at a few microseconds each, so a 100,000-mailbox wave would spend
//! seconds in the driver. Instead the engine unpacks one JSON parameter into
//! rows (writes) or packs the rows into one JSON text (reads), and serde does
//! the rest on our side: the same SQL runs on SQLite and PostgreSQL.

use crate::{Backend, StoreError};
use serde::de::DeserializeOwned;
use sqlx::AnyConnection;

/// A bound parameter of a bulk read.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    Text(&'a str),
}

/// The table-valued function that turns JSON parameter `$param` (an array of
/// arrays) into rows `j`, whose columns are read as `j.value ->> 0`, ...
pub fn json_table(b: Backend, param: usize) -> String {
    match b {
        Backend::Sqlite => format!("json_each(${param}) AS j"),
        Backend::Postgres => format!("json_array_elements(CAST(${param} AS json)) AS j(value)"),
    }
}

/// The table-valued function that turns JSON parameter `$param` (an array of
/// strings) into rows `j` with the text in `j.value`: no JSON is parsed per
/// row, so it is several times cheaper than `json_table` for one column.
pub fn json_keys(b: Backend, param: usize) -> String {
    match b {
        Backend::Sqlite => format!("json_each(${param}) AS j"),
        Backend::Postgres => {
            format!("json_array_elements_text(CAST(${param} AS json)) AS j(value)")
        }
    }
}

/// Packs `rows` as the JSON parameter `json_table` unpacks.
pub fn json_param<T: serde::Serialize>(rows: &[T]) -> String {
    serde_json::to_string(rows).expect("rows of strings and numbers serialize")
}

/// `SELECT cols FROM rest` with `args` bound to `$1`...: every row as one
/// `T` (a tuple, one element per column: `String`, `Option<String>`, `i64`).
/// `rest` is everything after FROM (tables, joins, WHERE); the order of the
/// rows is not defined.
pub async fn select_rows<T: DeserializeOwned>(
    conn: &mut AnyConnection,
    b: Backend,
    cols: &[&str],
    rest: &str,
    args: &[Arg<'_>],
) -> Result<Vec<T>, StoreError> {
    let cols = cols.join(", ");
    let sql = match b {
        Backend::Sqlite => format!("SELECT json_group_array(json_array({cols})) FROM {rest}"),
        Backend::Postgres => format!(
            "SELECT CAST(COALESCE(json_agg(json_build_array({cols})), '[]') AS TEXT) FROM {rest}"
        ),
    };
    let mut q = sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql));
    for a in args {
        q = match *a {
            Arg::Int(v) => q.bind(v),
            Arg::Text(v) => q.bind(v.to_string()),
        };
    }
    // An aggregate over no rows is `[]` in SQLite and NULL in PostgreSQL
    // (hence the COALESCE), and NULL again if nothing at all was selected.
    let json = q
        .fetch_one(&mut *conn)
        .await?
        .unwrap_or_else(|| "[]".into());
    serde_json::from_str(&json)
        .map_err(|e| StoreError::Conflict(format!("cannot decode rows of `{rest}`: {e}")))
}

/// Rows per page of `select_all`: a page of the widest table we read this
/// way stays near 20 MB of JSON, far below the engines' 1 GB string limit.
pub const PAGE: usize = 200_000;

/// Every row of `table` (`select_rows` of `cols`), read a page of `page`
/// rows at a time in the order of `key`, a unique column, so no single JSON
/// text grows with the table. `key_of` gives a row's key.
pub async fn select_all<T: DeserializeOwned>(
    conn: &mut AnyConnection,
    b: Backend,
    cols: &[&str],
    table: &str,
    key: &str,
    page: usize,
    key_of: impl Fn(&T) -> &str,
) -> Result<Vec<T>, StoreError> {
    let list = cols.join(", ");
    let mut out: Vec<T> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let filter = if after.is_some() {
            format!("WHERE {key} > $1 ")
        } else {
            String::new()
        };
        let rest = format!("(SELECT {list} FROM {table} {filter}ORDER BY {key} LIMIT {page}) AS p");
        let args: Vec<Arg> = after.as_deref().map(Arg::Text).into_iter().collect();
        let rows: Vec<T> = select_rows(conn, b, cols, &rest, &args).await?;
        let n = rows.len();
        // The page is the first `page` keys past `after`; the aggregate need
        // not keep their order, so continue after the largest.
        after = rows.iter().map(&key_of).max().map(str::to_string).or(after);
        out.extend(rows);
        if n < page {
            return Ok(out);
        }
    }
}

/// Rows per statement: bounds the size of one JSON parameter.
pub const ROWS: usize = 50_000;

/// Rows to write, one text (or NULL) per column; the first column is the key.
pub type Rows = Vec<Vec<Option<String>>>;

/// One row of `Rows` with no NULL.
pub fn row(vals: &[&str]) -> Vec<Option<String>> {
    vals.iter().map(|v| Some(v.to_string())).collect()
}

/// `INSERT INTO table (version_col?, cols...)` for every row, then
/// `conflict` (an ON CONFLICT clause, or empty); `version` fills
/// `version_col` in every row. The first column is the row's key.
///
/// Rows travel as one JSON parameter per chunk. When many rows share every
/// column but the key (a wave: 100,000 mailboxes from `old` to `new`), they
/// go as one plain array of keys per group with the rest bound once, which
/// spares the engine a JSON parse per row.
pub async fn insert_rows(
    tx: &mut AnyConnection,
    b: Backend,
    table: &str,
    version_col: Option<(&str, i64)>,
    cols: &[&str],
    mut rows: Rows,
    conflict: &str,
) -> Result<(), StoreError> {
    // In key order: B-tree inserts then append instead of splitting pages
    // all over the tree (twice as fast for a 100,000-row wave).
    if !rows.is_sorted() {
        rows.sort_unstable();
    }
    let (vc, first) = match version_col {
        Some((vc, _)) => (format!("{vc}, "), "CAST($1 AS BIGINT), "),
        None => (String::new(), ""),
    };
    let p0 = usize::from(version_col.is_some()) + 1;
    // A handful of groups at most, found by a linear scan (cheaper than
    // hashing every row); past that, rows go one JSON array each.
    let mut groups: Vec<(&[Option<String>], Vec<&str>)> = Vec::new();
    for r in &rows {
        let key = r[0].as_deref().expect("a row's key is never NULL");
        match groups.iter().position(|(shared, _)| *shared == &r[1..]) {
            Some(i) => groups[i].1.push(key),
            None if groups.len() < 16 => groups.push((&r[1..], vec![key])),
            None => {
                groups.clear();
                break;
            }
        }
    }
    if !groups.is_empty() && (groups.len() <= 2 || groups.len() * 64 <= rows.len()) {
        // $p0: the keys; then one parameter per other column.
        let rest: Vec<String> = (1..cols.len())
            .map(|i| format!(", CAST(${} AS TEXT)", p0 + i))
            .collect();
        let sql = format!(
            "INSERT INTO {table} ({vc}{}) SELECT {first}j.value{} FROM {} WHERE true {conflict}",
            cols.join(", "),
            rest.concat(),
            json_keys(b, p0)
        );
        for (shared, keys) in groups {
            for chunk in keys.chunks(ROWS) {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                if let Some((_, v)) = version_col {
                    q = q.bind(v);
                }
                q = q.bind(json_param(chunk));
                for v in shared {
                    q = q.bind(v.clone());
                }
                q.execute(&mut *tx).await?;
            }
        }
        return Ok(());
    }
    let picks: Vec<String> = (0..cols.len())
        .map(|i| format!("j.value ->> {i}"))
        .collect();
    let sql = format!(
        "INSERT INTO {table} ({vc}{}) SELECT {first}{} FROM {} WHERE true {conflict}",
        cols.join(", "),
        picks.join(", "),
        json_table(b, p0)
    );
    for chunk in rows.chunks(ROWS) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
        if let Some((_, v)) = version_col {
            q = q.bind(v);
        }
        q.bind(json_param(chunk)).execute(&mut *tx).await?;
    }
    Ok(())
}

/// `(SELECT j.value FROM <json $param>)`: keys (`json_param` of strings) as
/// a subquery.
pub fn keys_subquery(b: Backend, param: usize) -> String {
    format!("(SELECT j.value FROM {})", json_keys(b, param))
}

/// `DELETE FROM table WHERE col IN (keys)`, in chunks of [`ROWS`] keys.
pub async fn delete_in(
    tx: &mut AnyConnection,
    b: Backend,
    table: &str,
    col: &str,
    keys: &[String],
) -> Result<(), StoreError> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    let sql = format!("DELETE FROM {table} WHERE {col} IN {}", keys_subquery(b, 1));
    for chunk in keys.chunks(ROWS) {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(json_param(chunk))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// `cols` of `table` (the first is its unique key, `key_of` reads it from a
/// row). With `filter` (a condition on the key, such as `IN (SELECT ...)`),
/// the rows it admits as one aggregate; without, every row in pages
/// ([`select_all`]), so that a table of millions never becomes one JSON text.
pub async fn keyed_rows<T: DeserializeOwned>(
    tx: &mut AnyConnection,
    b: Backend,
    cols: &[&str],
    table: &str,
    filter: Option<&str>,
    key_of: fn(&T) -> &str,
) -> Result<Vec<T>, StoreError> {
    match filter {
        Some(f) => select_rows(tx, b, cols, &format!("{table} WHERE {} {f}", cols[0]), &[]).await,
        None => select_all(tx, b, cols, table, cols[0], PAGE, key_of).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn rows_round_trip_through_json_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let s = Store::open(&url).await.unwrap();
        let mut c = s.pool.acquire().await.unwrap();
        // Quotes, backslashes, non-ASCII and NULL survive both directions.
        let rows = vec![
            (1i64, "a\"b@x".to_string(), None::<String>),
            (2, "ü\\@x".to_string(), Some("new".to_string())),
        ];
        let sql = format!(
            "INSERT INTO route_changes (version, address, before_route, after_route) \
             SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, 'x' FROM {}",
            json_table(s.backend, 1)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(json_param(&rows))
            .execute(&mut *c)
            .await
            .unwrap();
        let mut back: Vec<(i64, String, Option<String>)> = select_rows(
            &mut c,
            s.backend,
            &["version", "address", "before_route"],
            "route_changes WHERE version >= $1",
            &[Arg::Int(1)],
        )
        .await
        .unwrap();
        back.sort();
        assert_eq!(back, rows);
        let none: Vec<(String,)> = select_rows(
            &mut c,
            s.backend,
            &["address"],
            "route_changes WHERE 1 = 0",
            &[],
        )
        .await
        .unwrap();
        assert!(none.is_empty());

        // Paged: 5 rows in pages of 2, of exactly 5 (an empty last page), of 100.
        for i in 0..5 {
            sqlx::query(
                "INSERT INTO route_entries (address, route, version) VALUES ($1, 'old', 1)",
            )
            .bind(format!("p{i}@x"))
            .execute(&mut *c)
            .await
            .unwrap();
        }
        for page in [2, 5, 100] {
            let mut all: Vec<(String, String)> = select_all(
                &mut c,
                s.backend,
                &["address", "route"],
                "route_entries",
                "address",
                page,
                |r: &(String, String)| r.0.as_str(),
            )
            .await
            .unwrap();
            let n = all.len();
            all.sort();
            all.dedup();
            assert_eq!((n, all.len()), (5, 5), "page {page}");
        }
    }

    #[tokio::test]
    async fn grouped_and_row_wise_inserts_write_the_same_rows() {
        let t = crate::testing::sqlite_temp().await;
        bulk_write_scenario(&t.store).await;
    }

    /// With `GODWIT_TEST_POSTGRES` (see `testing::postgres_scratch`), the
    /// same writes on PostgreSQL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_and_row_wise_inserts_write_the_same_rows_on_postgresql() {
        crate::testing::with_postgres("godwit_bulk", 1, |urls| async move {
            let s = Store::open(&urls[0]).await.unwrap();
            assert_eq!(s.backend, Backend::Postgres);
            bulk_write_scenario(&s).await;
            s.pool.close().await;
        })
        .await;
    }

    /// `insert_rows` takes two paths: rows sharing every column but the key
    /// go as groups of keys, others one JSON array each. Both must store
    /// exactly the rows given (NULLs, quotes and non-ASCII included), and
    /// an upsert must replace what is there; `delete_in` removes exactly
    /// the keys given.
    async fn bulk_write_scenario(s: &Store) {
        let be = s.backend;
        let shared = |i: usize| {
            vec![
                Some(format!("u{i:03}@x")),
                None,
                Some("new".to_string()),
                Some("user:cutover".to_string()),
            ]
        };
        let distinct = |i: usize| {
            vec![
                Some(format!("d{i:03}@x")),
                Some(format!("old-{i}")),
                (!i.is_multiple_of(3)).then(|| format!("n\"e'w-ü{i}")),
                Some(format!("b{i}")),
            ]
        };
        let cols = ["address", "before_route", "after_route", "basis"];
        // 200 rows in 1 group (grouped); 40 rows in 40 groups (row-wise).
        let mut want: Rows = (0..200).rev().map(shared).collect();
        let distinct_rows: Rows = (0..40).map(distinct).collect();
        let mut tx = s.pool.begin().await.unwrap();
        for (v, rows) in [(901, want.clone()), (902, distinct_rows.clone())] {
            insert_rows(
                &mut tx,
                be,
                "route_changes",
                Some(("version", v)),
                &cols,
                rows,
                "",
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        want.extend(distinct_rows);
        want.sort();
        let mut conn = s.pool.acquire().await.unwrap();
        type ChangeRow = (String, Option<String>, Option<String>, Option<String>);
        let got: Vec<ChangeRow> = select_rows(
            &mut conn,
            be,
            &cols,
            "route_changes WHERE version IN (901, 902)",
            &[],
        )
        .await
        .unwrap();
        let mut got: Rows = got
            .into_iter()
            .map(|(a, b, c, d)| vec![Some(a), b, c, d])
            .collect();
        got.sort();
        assert_eq!(got, want);

        // Upsert through the grouped path over rows written row-wise.
        let upsert = "ON CONFLICT (address) DO UPDATE SET route = excluded.route, version = excluded.version";
        let entries =
            |route: &str| -> Rows { (0..30).map(|i| row(&[&format!("e{i}@x"), route])).collect() };
        let mut tx = s.pool.begin().await.unwrap();
        let mixed: Rows = (0..30)
            .map(|i| row(&[&format!("e{i}@x"), &format!("r{i}")]))
            .collect();
        insert_rows(
            &mut tx,
            be,
            "route_entries",
            Some(("version", 1)),
            &["address", "route"],
            mixed,
            upsert,
        )
        .await
        .unwrap();
        insert_rows(
            &mut tx,
            be,
            "route_entries",
            Some(("version", 2)),
            &["address", "route"],
            entries("new"),
            upsert,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let got: Vec<(String, String, i64)> = select_rows(
            &mut conn,
            be,
            &["address", "route", "version"],
            "route_entries WHERE address LIKE 'e%@x'",
            &[],
        )
        .await
        .unwrap();
        assert_eq!(got.len(), 30);
        assert!(got.iter().all(|(_, r, v)| r == "new" && *v == 2), "{got:?}");

        // Delete a third of them by key; the scoped read sees the rest.
        let gone: Vec<String> = (0..10).map(|i| format!("e{i}@x")).collect();
        delete_in(&mut conn, be, "route_entries", "address", &gone)
            .await
            .unwrap();
        let mut left: Vec<(String, String)> = keyed_rows(
            &mut conn,
            be,
            &["address", "route"],
            "route_entries",
            Some("LIKE 'e%@x'"),
            |r: &(String, String)| r.0.as_str(),
        )
        .await
        .unwrap();
        left.sort();
        let mut want: Vec<String> = (10..30).map(|i| format!("e{i}@x")).collect();
        want.sort();
        assert_eq!(left.into_iter().map(|(a, _)| a).collect::<Vec<_>>(), want);
    }
}
