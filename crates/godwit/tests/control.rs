//! The control plane against real peers: the godwit binary as gateway and
//! CLI, Postfix's smtp-sink as the old and new platforms.

mod support;

use std::time::{Duration, Instant};
use support::*;

const T: Duration = Duration::from_secs(20);

const DIRECTORY: &str = "address,display_name,kind,aliases,members,platform
alice@example.com,Alice,user,al@example.org;a.l@example.com,,old
bob@example.com,Bob,user,,,old
carol@example.com,Carol,user,,,old
sales@example.com,Sales,group,,alice@example.com;carol@example.com,old
";

/// Runs a control command that writes a version, and waits until the
/// running gateway has applied it; returns the version. The contract: within
/// one second.
fn control(gw: &Gateway, args: &[&str]) -> i64 {
    let (ok, out) = gw.cli(args);
    assert!(ok, "{args:?}: {out}");
    let version: i64 = out
        .rsplit("version ")
        .next()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no version in {out}"));
    let start = Instant::now();
    wait_for(
        "the gateway to apply the version",
        Duration::from_secs(1),
        || {
            gw.events_named("route.changed")
                .iter()
                .any(|e| e["version"].as_i64() >= Some(version))
                .then_some(())
        },
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    version
}

fn write(gw: &Gateway, name: &str, text: &str) -> String {
    let p = gw.data.parent().unwrap().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn rcpts_of(sink: &Sink, id: &str) -> Vec<String> {
    let mut v: Vec<String> = sink
        .messages()
        .iter()
        .filter(|m| m.contains(id))
        .flat_map(|m| {
            m.lines()
                .filter_map(|l| l.strip_prefix("X-Rcpt-Args: <"))
                .map(|l| l.split('>').next().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn wave_cutover_moves_only_its_members_and_rollback_brings_queued_mail_back() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let mut new = Sink::start(pn, &[]);
    let gw = Gateway::start(po, pn, "", "");
    let dir = write(&gw, "directory.csv", DIRECTORY);
    control(&gw, &["directory", "import", &dir, "--apply"]);
    control(
        &gw,
        &[
            "directory",
            "state",
            "ready",
            "alice@example.com",
            "bob@example.com",
        ],
    );
    // Members from a file and an alias on the command line (resolved to its mailbox).
    let members = write(&gw, "wave1.txt", "# pilot\nalice@example.com\n");
    let (ok, out) = gw.cli(&[
        "wave",
        "create",
        "pilot",
        "--members",
        &members,
        "bob@example.com",
    ]);
    assert!(ok && out.contains("2 member(s)"), "{out}");

    // The guard: carol is not ready.
    let (ok, out) = gw.cli(&["wave", "create", "two", "--members", "carol@example.com"]);
    assert!(ok, "{out}");
    let (ok, out) = gw.cli(&["wave", "cutover", "two"]);
    assert!(
        !ok && out.contains("not ready") && out.contains("carol@example.com"),
        "{out}"
    );

    let (ok, out) = gw.cli(&["wave", "cutover", "pilot", "--dry-run"]);
    assert!(
        ok && out.contains("dry run") && out.contains("al@example.org: old -> new"),
        "{out}"
    );
    let (_, out) = gw.cli(&["route", "show", "alice@example.com"]);
    assert!(out.contains(": old ("), "a dry run changes nothing: {out}");

    let v = control(&gw, &["wave", "cutover", "pilot"]);
    let mut c = gw.client();
    c.greet();
    let to = [
        "alice@example.com",
        "al@example.org",
        "bob@example.com",
        "carol@example.com",
        "sales@example.com",
    ];
    let r = c.mail("s@sender.test", &to, &message("w1@test", "wave one"));
    assert!(r.starts_with("250"), "{r}");
    wait_for("delivery to both platforms", T, || {
        (rcpts_of(&new, "w1@test").len() == 3 && rcpts_of(&old, "w1@test").len() == 2).then_some(())
    });
    assert_eq!(
        rcpts_of(&new, "w1@test"),
        ["al@example.org", "alice@example.com", "bob@example.com"]
    );
    // Not a member: carol, and the group (its own route decides who expands it).
    assert_eq!(
        rcpts_of(&old, "w1@test"),
        ["carol@example.com", "sales@example.com"]
    );
    let routed: Vec<_> = gw
        .events_named("delivery.routed")
        .into_iter()
        .filter(|e| e["rcpt"] == "al@example.org")
        .collect();
    assert!(
        routed[0]["why"]
            .as_str()
            .unwrap()
            .contains("alias of a mailbox in state cutover")
            && routed[0]["routing_version"].as_i64() >= Some(v),
        "{routed:?}"
    );

    let (ok, out) = gw.cli(&["route", "explain", "al@example.org"]);
    assert!(ok, "{out}");
    for want in [
        "al@example.org: new",
        "alias of:  alice@example.com",
        "state:     cutover",
        "member of: sales@example.com",
        "wave:      pilot (cutover)",
        &format!("route set at version {v}"),
        "wave cutover pilot",
    ] {
        assert!(out.contains(want), "explain lacks `{want}`:\n{out}");
    }

    // The new platform goes down: alice's mail queues there. A wave rollback
    // sends it to old at its next attempt.
    new.stop();
    let r = c.mail(
        "s@sender.test",
        &["alice@example.com"],
        &message("w2@test", "queued"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for("a deferral at new", T, || {
        gw.events_named("delivery.deferred")
            .iter()
            .any(|e| e["message_id"] == "<w2@test>")
            .then_some(())
    });
    control(&gw, &["wave", "rollback", "pilot"]);
    wait_for("the queued message at old", Duration::from_secs(5), || {
        (rcpts_of(&old, "w2@test") == ["alice@example.com"]).then_some(())
    });
    let (_, out) = gw.cli(&["route", "explain", "alice@example.com"]);
    assert!(
        out.contains("alice@example.com: old") && out.contains("rolled-back"),
        "{out}"
    );
    assert!(gw.events_named("delivery.failed").is_empty());
}

#[test]
fn import_errors_name_the_line_and_apply_nothing() {
    let (po, pn) = (free_port(), free_port());
    let gw = Gateway::start(po, pn, "", "");
    let h = "address,display_name,kind,aliases,members,platform\n";
    let good = "alice@example.com,Alice,user,,,old\n";
    let cases = [
        (
            "bad address",
            format!("{h}{good}not-an-address,X,user,,,old\n"),
            "line 3",
            "not an address",
        ),
        (
            "duplicate",
            format!("{h}{good}bob@example.com,B,user,,,old\nAlice@example.com,A2,user,,,old\n"),
            "line 4",
            "duplicate address `alice@example.com` (already a mailbox on line 2)",
        ),
        (
            "unknown kind",
            format!("{h}{good}room@example.com,R,room,,,old\n"),
            "line 3",
            "unknown kind `room`",
        ),
        (
            "alias collides",
            format!("{h}{good}bob@example.com,B,user,alice@example.com,,old\n"),
            "line 3",
            "alias `alice@example.com` collides with a mailbox on line 2",
        ),
        (
            "outside domains",
            format!("{h}{good}eve@elsewhere.test,E,user,,,old\n"),
            "line 3",
            "outside domains.accepted",
        ),
    ];
    for (what, text, line, words) in cases {
        let file = write(&gw, "bad.csv", &text);
        let (ok, out) = gw.cli(&["directory", "import", &file, "--apply"]);
        assert!(!ok, "{what}: should fail: {out}");
        assert!(
            out.contains(&format!("{line}: {words}")) || out.contains(line) && out.contains(words),
            "{what}: want `{line}: {words}` in:\n{out}"
        );
        assert!(out.contains("nothing was applied"), "{what}: {out}");
    }
    let (_, out) = gw.cli(&["history"]);
    assert!(out.contains("no versions yet"), "{out}");
    let (_, out) = gw.cli(&["route", "explain", "alice@example.com"]);
    assert!(out.contains("not in the directory"), "{out}");

    // A good import, then a bad re-import: the first stays exactly as it was.
    let file = write(&gw, "good.csv", &format!("{h}{good}"));
    let (ok, out) = gw.cli(&["directory", "import", &file, "--apply"]);
    assert!(
        ok && out.contains("1 added") && out.contains("version 1"),
        "{out}"
    );
    let file = write(
        &gw,
        "bad.csv",
        &format!("{h}alice@example.com,Alice B,user,,,new\nx,X,user,,,old\n"),
    );
    let (ok, _) = gw.cli(&["directory", "import", &file, "--apply"]);
    assert!(!ok);
    let (_, out) = gw.cli(&["route", "explain", "alice@example.com"]);
    assert!(out.contains("\"Alice\", owned today by old"), "{out}");
    let (_, out) = gw.cli(&["history"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    // Re-importing the same file is a no-op; a changed file shows a diff
    // and applies only with --apply.
    let file = write(&gw, "good.csv", &format!("{h}{good}"));
    let (ok, out) = gw.cli(&["directory", "import", &file, "--apply"]);
    assert!(ok && out.contains("already matches"), "{out}");
    let file = write(
        &gw,
        "next.csv",
        &format!("{h}alice@example.com,Alice,user,,,new\nbob@example.com,Bob,shared,,,old\n"),
    );
    let (ok, out) = gw.cli(&["directory", "import", &file]);
    assert!(
        ok && out.contains("+ bob@example.com")
            && out.contains("~ alice@example.com: platform old -> new")
            && out.contains("run again with --apply"),
        "{out}"
    );
    let (_, out) = gw.cli(&["route", "show", "bob@example.com"]);
    assert!(
        out.contains("global default"),
        "not applied without --apply: {out}"
    );
}

#[test]
fn unknown_recipients_are_refused_at_rcpt_once_a_directory_exists() {
    let (po, pn) = (free_port(), free_port());
    let _old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "", "[directory]\nunknown_recipient = \"reject\"\n");
    let mut c = gw.client();
    c.greet();
    assert!(c.cmd("MAIL FROM:<s@sender.test>").starts_with("250"));
    // No directory yet: the policy does not apply.
    assert!(c.cmd("RCPT TO:<stranger@example.com>").starts_with("250"));
    let dir = write(&gw, "directory.csv", DIRECTORY);
    control(&gw, &["directory", "import", &dir, "--apply"]);
    let mut c = gw.client();
    c.greet();
    assert!(c.cmd("MAIL FROM:<s@sender.test>").starts_with("250"));
    for (rcpt, want) in [
        ("alice@example.com", "250"),
        ("AL@example.org", "250"),
        ("sales@example.com", "250"),
        ("postmaster@example.com", "250"),
        ("stranger@example.com", "550 5.1.1"),
        ("stranger@example.org", "550 5.1.1"),
        ("victim@elsewhere.test", "554 5.7.1"),
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with(want), "{rcpt}: want {want}, got {r}");
    }
    // An override makes an address known too.
    control(&gw, &["route", "set", "stranger@example.com", "old"]);
    assert!(c.cmd("RCPT TO:<stranger@example.com>").starts_with("250"));
    let (_, out) = gw.cli(&["route", "explain", "nobody@example.com"]);
    assert!(out.contains("550 5.1.1"), "{out}");
}

/// An LDIF export (as slapcat or ldifde writes it) drives routing like the
/// CSV: aliases from proxyAddresses route with their mailbox, a group's
/// members come from member DNs, and a bad entry names its line.
#[test]
fn an_ldif_export_imports_and_routes() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let new = Sink::start(pn, &[]);
    let gw = Gateway::start(po, pn, "", "[directory]\nunknown_recipient = \"reject\"\n");
    let ldif = "version: 1\n\
dn: dc=example,dc=com\n\
objectClass: domain\n\
\n\
dn: uid=alice,ou=people,dc=example,dc=com\n\
objectClass: inetOrgPerson\n\
cn: Alice\n\
mail: alice@example.com\n\
proxyAddresses: SMTP:alice@example.com\n\
proxyAddresses: smtp:al@example.org\n\
\n\
dn: uid=bob,ou=people,dc=example,dc=com\n\
objectClass: inetOrgPerson\n\
cn:: Qm9iIETDvHJy\n\
mail: bob@example.com\n\
godwitPlatform: new\n\
\n\
dn: cn=sales,ou=groups,dc=example,dc=com\n\
objectClass: groupOfNames\n\
mail: sales@example.com\n\
member: uid=alice,ou=people,dc=example,dc=com\n\
member: uid=bob,ou=people,dc=example,dc=com\n";
    let file = write(&gw, "export.ldif", ldif);
    // Without --platform, alice and sales have no owner: refused by line.
    let (ok, out) = gw.cli(&["directory", "import", &file, "--apply"]);
    assert!(
        !ok && out.contains("line 5: alice@example.com has no godwitPlatform")
            && out.contains("nothing was applied"),
        "{out}"
    );
    control(
        &gw,
        &["directory", "import", &file, "--platform", "old", "--apply"],
    );
    let (_, out) = gw.cli(&["route", "explain", "al@example.org"]);
    assert!(out.contains("alice@example.com"), "{out}");
    let (_, out) = gw.cli(&["route", "explain", "bob@example.com"]);
    assert!(out.contains("\"Bob Dürr\", owned today by new"), "{out}");
    let mut c = gw.client();
    c.greet();
    let to = ["al@example.org", "bob@example.com", "sales@example.com"];
    let r = c.mail("s@sender.test", &to, &message("ldif1@test", "from ldif"));
    assert!(r.starts_with("250"), "{r}");
    wait_for("delivery by the LDIF routes", T, || {
        (rcpts_of(&old, "ldif1@test").len() == 2 && rcpts_of(&new, "ldif1@test").len() == 1)
            .then_some(())
    });
    assert_eq!(
        rcpts_of(&old, "ldif1@test"),
        ["al@example.org", "sales@example.com"]
    );
    assert_eq!(rcpts_of(&new, "ldif1@test"), ["bob@example.com"]);
    assert!(c.cmd("MAIL FROM:<s@sender.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<carol@example.com>");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    // A group member that is not in the export names its line.
    let bad = format!("{ldif}member: uid=zed,ou=people,dc=example,dc=com\n");
    let file = write(&gw, "bad.ldif", &bad);
    let (ok, out) = gw.cli(&["directory", "import", &file, "--platform", "old"]);
    assert!(!ok && out.contains("line 23: member `uid=zed"), "{out}");
}

/// `directory.expand_groups = true`: godwit expands a group before queueing
/// (nested groups too), each member goes where that member is now, members
/// carry ORCPT=rfc822;GROUP, a member who is also addressed directly gets
/// one copy, and a membership change reaches the running gateway.
#[test]
fn groups_expand_in_the_gateway_when_told_to() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let new = Sink::start(pn, &[]);
    let gw = Gateway::start(po, pn, "", "[directory]\nexpand_groups = true\n");
    let directory = "address,display_name,kind,aliases,members,platform
alice@example.com,Alice,user,,,old
bob@example.com,Bob,user,,,old
carol@example.com,Carol,user,,,old
team@example.com,Team,group,,bob@example.com,old
sales@example.com,Sales,group,,alice@example.com;carol@example.com;team@example.com;partner@elsewhere.test,old
";
    let file = write(&gw, "directory.csv", directory);
    control(&gw, &["directory", "import", &file, "--apply"]);
    control(&gw, &["directory", "state", "ready", "alice@example.com"]);
    let (ok, out) = gw.cli(&["wave", "create", "w", "--members", "alice@example.com"]);
    assert!(ok, "{out}");
    control(&gw, &["wave", "cutover", "w"]);
    let (_, out) = gw.cli(&["route", "explain", "sales@example.com"]);
    assert!(out.contains("expanded by godwit at acceptance"), "{out}");

    let mut c = gw.client();
    c.greet();
    let to = ["sales@example.com", "carol@example.com"];
    let r = c.mail("s@sender.test", &to, &message("grp1@test", "to the list"));
    assert!(r.starts_with("250"), "{r}");
    wait_for("each member delivered where it is", T, || {
        (rcpts_of(&new, "grp1@test").len() == 1 && rcpts_of(&old, "grp1@test").len() == 3)
            .then_some(())
    });
    assert_eq!(rcpts_of(&new, "grp1@test"), ["alice@example.com"]);
    // carol once (addressed directly and as a member); the list itself never.
    assert_eq!(
        rcpts_of(&old, "grp1@test"),
        [
            "bob@example.com",
            "carol@example.com",
            "partner@elsewhere.test"
        ]
    );
    let alice = new
        .messages()
        .into_iter()
        .find(|m| m.contains("grp1@test"))
        .unwrap();
    assert!(alice.contains("ORCPT=rfc822;sales@example.com"), "{alice}");
    let (ok, out) = gw.cli(&["trace", "grp1@test"]);
    assert!(
        ok && out
            .contains("expanded group sales@example.com (nested: team@example.com) to 4 member(s)"),
        "{out}"
    );

    // Carol leaves the list: the running gateway learns it with the version.
    let file = write(
        &gw,
        "directory.csv",
        &directory.replace("carol@example.com;team", "team"),
    );
    control(&gw, &["directory", "import", &file, "--apply"]);
    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "s@sender.test",
        &["sales@example.com"],
        &message("grp2@test", "again"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for("delivery after the membership change", T, || {
        (rcpts_of(&new, "grp2@test").len() == 1 && rcpts_of(&old, "grp2@test").len() == 2)
            .then_some(())
    });
    assert_eq!(
        rcpts_of(&old, "grp2@test"),
        ["bob@example.com", "partner@elsewhere.test"]
    );
}

/// Waves can be corrected before and after a cutover: members added move at
/// the next cutover, members removed keep their route, a cut-over wave
/// cannot be deleted, and a rollback past a deletion still works.
#[test]
fn waves_take_and_lose_members_and_can_be_deleted() {
    let (po, pn) = (free_port(), free_port());
    let _old = Sink::start(po, &[]);
    let _new = Sink::start(pn, &[]);
    let gw = Gateway::start(po, pn, "", "");
    let dir = write(&gw, "directory.csv", DIRECTORY);
    control(&gw, &["directory", "import", &dir, "--apply"]);
    let ready = ["alice@example.com", "bob@example.com", "carol@example.com"];
    let mut args = vec!["directory", "state", "ready"];
    args.extend(ready);
    control(&gw, &args);
    let route = |a: &str| gw.cli(&["route", "show", a]).1;
    let (ok, out) = gw.cli(&["wave", "create", "w", "--members", "alice@example.com"]);
    assert!(ok, "{out}");
    // An alias resolves to its (already member) mailbox; bob is new.
    let (ok, out) = gw.cli(&[
        "wave",
        "add",
        "w",
        "--members",
        "bob@example.com",
        "a.l@example.com",
    ]);
    assert!(ok && out.contains("1 member(s) added"), "{out}");
    let (ok, out) = gw.cli(&["wave", "remove", "w", "--members", "carol@example.com"]);
    assert!(
        !ok && out.contains("not members of wave `w`: carol@example.com"),
        "{out}"
    );
    let (ok, out) = gw.cli(&["wave", "add", "w", "--members", "nobody@example.com"]);
    assert!(!ok && out.contains("not in the directory"), "{out}");

    control(&gw, &["wave", "cutover", "w"]);
    assert!(route("bob@example.com").contains(": new ("));
    control(&gw, &["wave", "add", "w", "--members", "carol@example.com"]);
    assert!(
        route("carol@example.com").contains(": old ("),
        "added, not yet moved"
    );
    control(&gw, &["wave", "cutover", "w"]);
    assert!(route("carol@example.com").contains(": new ("));
    let v = control(
        &gw,
        &["wave", "remove", "w", "--members", "carol@example.com"],
    );
    assert!(
        route("carol@example.com").contains(": new ("),
        "removal keeps the route"
    );
    let (ok, out) = gw.cli(&["wave", "delete", "w"]);
    assert!(
        !ok && out.contains("is cut over; roll it back first"),
        "{out}"
    );

    control(&gw, &["wave", "rollback", "w"]);
    assert!(route("alice@example.com").contains(": old ("));
    assert!(
        route("carol@example.com").contains(": new ("),
        "no longer a member"
    );
    let (ok, out) = gw.cli(&["wave", "delete", "w"]);
    assert!(ok && out.contains("deleted with 2 member(s)"), "{out}");
    let (_, out) = gw.cli(&["wave", "list"]);
    assert!(out.contains("no waves yet"), "{out}");
    // Back to before the rollback: alice and bob on new again, the wave
    // stays deleted.
    control(&gw, &["route", "rollback", "--to", &v.to_string()]);
    assert!(route("alice@example.com").contains(": new ("));
    let (ok, _) = gw.cli(&["wave", "show", "w"]);
    assert!(!ok);
    let (_, out) = gw.cli(&["history"]);
    assert!(
        out.contains("wave delete w") && out.contains("wave remove w"),
        "{out}"
    );
}

/// "Nobody has to guess who is where": `directory list` shows each object's
/// state, owner and current route, filters by state, route and wave, and
/// exports CSV (quoted as RFC 4180) and JSON that agree with the routes.
#[test]
fn directory_list_says_who_is_where() {
    let (po, pn) = (free_port(), free_port());
    let gw = Gateway::start(po, pn, "", "");
    let directory = DIRECTORY.replace(
        "carol@example.com,Carol,",
        "carol@example.com,\"Carol, Jr.\",",
    );
    let dir = write(&gw, "directory.csv", &directory);
    control(&gw, &["directory", "import", &dir, "--apply"]);
    // A file of addresses works as for waves.
    let ready = write(
        &gw,
        "ready.txt",
        "# from the sync report\nalice@example.com\n",
    );
    control(&gw, &["directory", "state", "ready", &ready]);
    let (ok, out) = gw.cli(&["wave", "create", "pilot", "--members", "alice@example.com"]);
    assert!(ok, "{out}");
    control(&gw, &["wave", "cutover", "pilot"]);
    control(&gw, &["route", "set", "bob@example.com", "hold"]);

    let (ok, out) = gw.cli(&["directory", "list"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("4 object(s)"), "{out}");
    assert!(out.contains("by state: cutover 1, pending 3"), "{out}");
    assert!(out.contains("by route now: hold 1, new 1, old 2"), "{out}");
    assert!(out.contains("with an override: 1"), "{out}");
    assert!(
        out.contains("alice@example.com  user  cutover  owned by old  -> new  waves: pilot"),
        "{out}"
    );
    assert!(
        out.contains("bob@example.com  user  pending  owned by old  -> hold (override hold)"),
        "{out}"
    );

    let (_, out) = gw.cli(&["directory", "list", "--route", "new", "--format", "csv"]);
    assert_eq!(
        out.trim(),
        "address,display_name,kind,platform,state,route,override,waves,aliases\n\
         alice@example.com,Alice,user,old,cutover,new,,pilot,2"
    );
    let (_, out) = gw.cli(&[
        "directory",
        "list",
        "--state",
        "Pending",
        "--kind",
        "user",
        "--format",
        "csv",
    ]);
    assert!(out.contains("\"Carol, Jr.\""), "{out}");
    assert_eq!(out.trim().lines().count(), 3, "bob and carol: {out}");
    let (_, out) = gw.cli(&["directory", "list", "--wave", "pilot", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["route"], "new");
    let (ok, out) = gw.cli(&["directory", "list", "--state", "flying"]);
    assert!(!ok && out.contains("unknown state `flying`"), "{out}");
}
