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
}
