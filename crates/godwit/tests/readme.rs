//! The README's quick start and walkthrough, run as a new user would: the
//! quick start's first command serves `examples/godwit.toml`, and the
//! walkthrough block (after its `<!-- walkthrough -->` marker) runs as one
//! pasted bash script, with swaks and smtp-sink as the README says. Only
//! what a test must change is changed: ports (free ones, so tests run in
//! parallel), the dump folders, and `cargo run` for the built binary.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    std::fs::read_to_string(path).unwrap()
}

/// The first ```sh block after `marker`, without its fences.
fn block_after(text: &str, marker: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}`"));
    let rest = &text[at..];
    let start = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let end = start + rest[start..].find("```").expect("the block's end");
    rest[start..end].to_string()
}

/// Kills the process group of the pasted script (its smtp-sinks run in
/// the background, as in a terminal) when the test ends.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

/// The gateway, stopped when the test ends, whether it passed or not.
struct Serving(std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_quick_start_and_walkthrough_run_as_one_pasted_block() {
    let text = readme();
    let quick = block_after(&text, "## Quick start");
    let setup: Vec<&str> = quick
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect();
    assert_eq!(setup.len(), 2, "the quick start is two commands: {quick}");
    let walkthrough = block_after(&text, "<!-- walkthrough");

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("examples")).unwrap();
    let dumps = root.join("dumps");
    let (old_dir, new_dir) = (dumps.join("old"), dumps.join("new"));
    let ports: Vec<(String, String)> = ["2525", "2601", "2602", "8025"]
        .iter()
        .map(|p| {
            (
                format!("127.0.0.1:{p}"),
                format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect();
    let bin = godwit_bin();
    let adapt = |s: &str| {
        let mut s = s
            .replace("cargo run --release --", bin)
            .replace("cargo run -q --", bin)
            .replace("/tmp/old", old_dir.to_str().unwrap())
            .replace("/tmp/new", new_dir.to_str().unwrap());
        for (from, to) in &ports {
            s = s.replace(from, to);
        }
        s
    };
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/godwit.toml"),
    )
    .unwrap();
    std::fs::write(root.join("examples/godwit.toml"), adapt(&example)).unwrap();
    // smtp-sink runs as nobody, who must reach the dump folders.
    std::fs::create_dir_all(&dumps).unwrap();
    Command::new("chmod")
        .args(["777", root.to_str().unwrap(), dumps.to_str().unwrap()])
        .status()
        .unwrap();

    // Quick start, first command: the gateway, from the repository root.
    let serve = adapt(setup[0].split(" #").next().unwrap());
    let log = std::fs::File::create(root.join("serve.log")).unwrap();
    let gateway = Command::new("bash")
        .args(["-c", &format!("exec {serve}")])
        .current_dir(root)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _gateway = Serving(gateway);
    let smtp: u16 = ports[0].1.rsplit(':').next().unwrap().parse().unwrap();
    wait_for("the gateway to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", smtp)).ok()
    });
    let data = root.join("examples/godwit-data");
    let events = |name: &str| -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for f in std::fs::read_dir(data.join("events"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .collect::<Vec<PathBuf>>()
            })
            .unwrap_or_default()
        {
            for line in std::fs::read_to_string(f).unwrap_or_default().lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                    && v["event"] == name
                {
                    out.push(v);
                }
            }
        }
        out
    };
    // route set waits for running gateways: this one must have said it runs.
    wait_for("the gateway's start event", Duration::from_secs(10), || {
        (!events("gateway.started").is_empty()).then_some(())
    });

    // The walkthrough, pasted as one block; any failing command fails it.
    let script = format!("set -euo pipefail\n{}", adapt(&walkthrough));
    let mut bash = Command::new("bash");
    bash.args(["-c", &script])
        .current_dir(root)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut bash, 0);
    // Files, not pipes: the background smtp-sinks keep their copies open.
    let (out_path, err_path) = (root.join("block.out"), root.join("block.err"));
    let mut child = bash
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let _group = Group(child.id());
    let status = child.wait().unwrap();
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let all = format!("{stdout}\n{}", std::fs::read_to_string(&err_path).unwrap());
    assert!(status.success(), "the pasted block failed:\n{all}");

    // 1. Queued, not bounced, and shown by queue list.
    let ids: Vec<String> = stdout
        .match_indices("queued as ")
        .map(|(i, _)| {
            stdout[i + 10..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2, "two messages queued:\n{all}");
    assert!(
        stdout.contains(&format!("{}  ", ids[0]))
            && stdout.contains("    alice@example.com  ")
            && stdout.contains("-- 1 Kbytes in 1 Request."),
        "queue list:\n{all}"
    );
    // 3. The route change, reported as the README shows it.
    assert!(
        stdout.contains("alice@example.com: (default) -> new (version 1)"),
        "{all}"
    );
    assert!(
        stdout.contains(
            "alice@example.com: new (override (address entry, version 1); routing version 1)"
        ),
        "{all}"
    );
    // 4. The rollback.
    assert!(
        stdout.contains("alice@example.com: new -> old (version 2)"),
        "{all}"
    );
    // The message sent right after `route set` went the new way (route set
    // waited for the gateway), and so did the first, moved with the route.
    let dumped = |dir: &Path| -> String {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    };
    for id in &ids {
        wait_for(
            &format!("{id} at the new platform"),
            Duration::from_secs(15),
            || dumped(&new_dir).contains(id.as_str()).then_some(()),
        );
    }
    let second = events("delivery.routed")
        .into_iter()
        .find(|e| e["queue_id"] == ids[1].as_str())
        .expect("the second message's route");
    assert_eq!(second["route"], "new", "{second}");
    assert!(!dumped(&old_dir).contains(ids[1].as_str()));
    // `ls` in the block listed what had arrived by then.
    assert!(
        stdout.lines().any(|l| l.ends_with('.')),
        "ls /tmp/new:\n{all}"
    );
}
