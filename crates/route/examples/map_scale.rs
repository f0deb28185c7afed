//! Scale check for the in-memory routing map (run by bench/wave-cutover):
//! builds a map of N addresses (default 1,000,000), applies a 100,000-address
//! version as a running gateway would, and measures `decide` on the delivery
//! path. Not a test: numbers depend on the machine.

use godwit_config::Config;
use godwit_route::{Basis, Change, Kind, MigrationState, RoutingMap, SharedRoutes};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let cfg = Config::parse(
        "[domains]\naccepted=[\"example.com\"]\n[platforms.old]\nrelay=[\"127.0.0.1:1\"]\n[platforms.new]\nrelay=[\"127.0.0.1:2\"]",
    )
    .unwrap();
    let pending = Basis::State {
        kind: Kind::User,
        state: MigrationState::Pending,
    };
    let t = Instant::now();
    let mut map = RoutingMap::new(&cfg);
    for i in 0..n {
        map.set(&format!("user{i}@example.com"), Some(("old", pending)), 1);
    }
    println!(
        "map: {n} addresses built in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let shared = SharedRoutes::new(map);

    let wave: Vec<Change> = (0..100_000.min(n))
        .map(|i| Change {
            version: 2,
            address: format!("user{i}@example.com"),
            before: Some("old".into()),
            after: Some("new".into()),
            basis: Some(Basis::State {
                kind: Kind::User,
                state: MigrationState::Cutover,
            }),
        })
        .collect();
    let t = Instant::now();
    shared.apply(&wave);
    println!(
        "apply: a {}-address version in {:.1} ms (lookups wait at most this long)",
        wave.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    let lookups = 1_000_000;
    let mut hits = 0usize;
    let t = Instant::now();
    for i in 0..lookups {
        // Mixed case and brackets, as RCPT gives them.
        let a = format!("<User{}@Example.com>", (i * 7919) % n);
        if shared.decide(&a).route == "new" {
            hits += 1;
        }
    }
    let per = t.elapsed().as_secs_f64() * 1e9 / lookups as f64;
    println!(
        "decide: {lookups} lookups, {per:.0} ns each (including formatting the address); {hits} routed to new"
    );
    let t = Instant::now();
    for i in 0..lookups {
        std::hint::black_box(shared.decide("stranger@example.com"));
        std::hint::black_box(i);
    }
    println!(
        "decide (unknown address, default route): {:.0} ns each",
        t.elapsed().as_secs_f64() * 1e9 / lookups as f64
    );
}
