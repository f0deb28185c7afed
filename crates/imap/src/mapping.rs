//! Folder mapping: which target folder each source folder's messages go to.
//!
//! Pure: it takes the two LIST results (decoded to Unicode) and the configured
//! overrides, and returns the pairs, so every rule is a table-driven test.
//!
//! Rules, in order of precedence:
//! 1. `INBOX` is `INBOX` on both sides (RFC 3501 5.1: case-insensitive).
//! 2. An explicit mapping from `[sync.folders]` for the folder or its nearest
//!    mapped ancestor.
//! 3. Special-use folders (RFC 6154 2): the source's `\Sent` (`\Drafts`,
//!    `\Trash`, `\Junk`, `\Archive`) goes to the target's folder with the same
//!    attribute, whatever it is called. A server without the attributes is read
//!    by known localized names ("Sent Items", "Gesendete Elemente", ...). If the
//!    target has no such folder, the source's name is kept (so no second Sent
//!    appears). Subfolders follow their parent.
//! 4. Everything else keeps its path; components are re-joined with the
//!    target's separator under the target's personal namespace prefix.
//!
//! A name component that contains the target's separator cannot exist on the
//! target as one level. **Rule:** each such separator character is replaced by
//! `_` (e.g. source `Q1/Q2` under separator `.` becomes `Q1_Q2` on a `/` target),
//! and the pair carries a note that the report prints.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum SpecialUse {
    Sent,
    Drafts,
    Trash,
    Junk,
    Archive,
}

impl SpecialUse {
    pub const ALL: [SpecialUse; 5] = [
        SpecialUse::Sent,
        SpecialUse::Drafts,
        SpecialUse::Trash,
        SpecialUse::Junk,
        SpecialUse::Archive,
    ];

    /// Names seen on Exchange, Outlook, Gmail, Dovecot and Courier installs in
    /// several languages, compared case-insensitively.
    fn localized_names(self) -> &'static [&'static str] {
        match self {
            SpecialUse::Sent => &[
                "Sent",
                "Sent Items",
                "Sent Messages",
                "Sent Mail",
                "Gesendete Elemente",
                "Gesendet",
                "Gesendete Objekte",
                "Envoyés",
                "Éléments envoyés",
                "Messages envoyés",
                "Elementos enviados",
                "Enviados",
                "Posta inviata",
                "Inviati",
                "Verzonden items",
                "Verzonden",
                "Отправленные",
                "送信済みアイテム",
                "送信済み",
                "已发送",
                "已发送邮件",
            ],
            SpecialUse::Drafts => &[
                "Drafts",
                "Draft",
                "Entwürfe",
                "Brouillons",
                "Borradores",
                "Bozze",
                "Concepten",
                "Черновики",
                "下書き",
                "草稿",
            ],
            SpecialUse::Trash => &[
                "Trash",
                "Deleted Items",
                "Deleted Messages",
                "Deleted",
                "Bin",
                "Gelöschte Elemente",
                "Gelöschte Objekte",
                "Papierkorb",
                "Corbeille",
                "Éléments supprimés",
                "Elementos eliminados",
                "Papelera",
                "Cestino",
                "Posta eliminata",
                "Verwijderde items",
                "Prullenbak",
                "Удаленные",
                "Удалённые",
                "Корзина",
                "ゴミ箱",
                "削除済みアイテム",
                "已删除",
                "已删除邮件",
            ],
            SpecialUse::Junk => &[
                "Junk",
                "Junk Email",
                "Junk E-mail",
                "Junk Mail",
                "Junk-E-Mail",
                "Spam",
                "Bulk Mail",
                "Courrier indésirable",
                "Correo no deseado",
                "Posta indesiderata",
                "Ongewenste e-mail",
                "Спам",
                "Нежелательная почта",
                "迷惑メール",
                "垃圾邮件",
            ],
            SpecialUse::Archive => &[
                "Archive",
                "Archives",
                "Archiv",
                "Archivo",
                "Archivio",
                "Archief",
                "Архив",
                "アーカイブ",
                "存档",
            ],
        }
    }

    pub fn from_localized_name(name: &str) -> Option<SpecialUse> {
        let lower = name.to_lowercase();
        SpecialUse::ALL.into_iter().find(|u| {
            u.localized_names()
                .iter()
                .any(|n| n.to_lowercase() == lower)
        })
    }
}

/// One folder as LIST returned it, name already decoded from modified UTF-7.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub name: String,
    pub special: Option<SpecialUse>,
    /// `\Noselect` or `\NonExistent` (RFC 3501 7.2.2, RFC 5258 3): holds children only.
    pub selectable: bool,
}

impl Folder {
    pub fn new(name: &str) -> Folder {
        Folder {
            name: name.to_string(),
            special: None,
            selectable: true,
        }
    }
    pub fn special(name: &str, special: SpecialUse) -> Folder {
        Folder {
            name: name.to_string(),
            special: Some(special),
            selectable: true,
        }
    }
}

/// One side's folder list and naming rules.
#[derive(Debug, Clone)]
pub struct Side {
    pub separator: char,
    /// Personal namespace prefix including its trailing separator (`INBOX.`), or "".
    pub prefix: String,
    pub folders: Vec<Folder>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FolderPair {
    pub source: String,
    pub target: String,
    /// The source folder can hold messages (it is not `\Noselect`).
    pub selectable: bool,
    /// The target folder does not exist yet.
    pub create: bool,
    pub special: Option<SpecialUse>,
    /// Set when a rule changed the name (separator inside a name, collision).
    pub note: Option<String>,
}

pub fn is_inbox(name: &str) -> bool {
    name.eq_ignore_ascii_case("INBOX")
}

/// The path of `name` below the personal namespace, as components.
fn components(side: &Side, name: &str) -> Vec<String> {
    if is_inbox(name) {
        return vec!["INBOX".into()];
    }
    let rest = if !side.prefix.is_empty() && name.starts_with(&side.prefix) {
        &name[side.prefix.len()..]
    } else {
        name
    };
    let mut parts: Vec<String> = rest.split(side.separator).map(str::to_string).collect();
    if parts.first().is_some_and(|p| is_inbox(p)) && side.prefix.is_empty() {
        parts[0] = "INBOX".into();
    }
    parts
}

fn join(side: &Side, parts: &[String]) -> String {
    if parts.len() == 1 && is_inbox(&parts[0]) {
        return "INBOX".into();
    }
    let sep = side.separator.to_string();
    if parts.first().is_some_and(|p| is_inbox(p)) {
        // INBOX's children are never under the prefix (RFC 2342 5: Courier's
        // "INBOX." prefix already is INBOX).
        if side.prefix.is_empty() || !is_inbox(side.prefix.trim_end_matches(side.separator)) {
            return parts.join(&sep);
        }
        return format!("{}{}", side.prefix, parts[1..].join(&sep));
    }
    format!("{}{}", side.prefix, parts.join(&sep))
}

/// Picks, per special use, the one folder that holds it: the attribute wins over a
/// localized name, and only top-level names count as localized (so "Projects/Sent"
/// stays a project folder).
fn special_folders(side: &Side) -> HashMap<SpecialUse, String> {
    let mut by_attr = HashMap::new();
    let mut by_name = HashMap::new();
    for f in &side.folders {
        if let Some(u) = f.special {
            by_attr.entry(u).or_insert_with(|| f.name.clone());
        }
        let parts = components(side, &f.name);
        if parts.len() == 1
            && let Some(u) = SpecialUse::from_localized_name(&parts[0])
        {
            // Prefer the canonical English name when several localized ones exist.
            let preferred = SpecialUse::ALL
                .iter()
                .any(|x| x.localized_names()[0].eq_ignore_ascii_case(&parts[0]));
            match by_name.get(&u) {
                Some((_, true)) => {}
                _ if preferred || !by_name.contains_key(&u) => {
                    by_name.insert(u, (f.name.clone(), preferred));
                }
                _ => {}
            }
        }
    }
    for (u, (name, _)) in by_name {
        by_attr.entry(u).or_insert(name);
    }
    by_attr
}

/// Computes the pairs. `overrides` maps source names to target names, both in
/// Unicode and written with their own side's separator; `exclude` lists source
/// folders skipped with their children.
pub fn map_folders(
    source: &Side,
    target: &Side,
    overrides: &BTreeMap<String, String>,
    exclude: &[String],
) -> Vec<FolderPair> {
    let src_special = special_folders(source);
    let tgt_special = special_folders(target);
    // Source folder name -> its role, for the rewrite below.
    let role_of: HashMap<&str, SpecialUse> =
        src_special.iter().map(|(u, n)| (n.as_str(), *u)).collect();
    let target_names: HashMap<String, ()> =
        target.folders.iter().map(|f| (fold(&f.name), ())).collect();

    let mut pairs: Vec<FolderPair> = Vec::new();
    for f in &source.folders {
        let parts = components(source, &f.name);
        if exclude.iter().any(|e| {
            let ep = components(source, e);
            parts.len() >= ep.len() && parts[..ep.len()] == ep[..]
        }) {
            continue;
        }
        let mut note = None;
        let mut special = None;
        // Find the nearest ancestor-or-self that an override or a role maps.
        let mut mapped: Option<Vec<String>> = None;
        for depth in (1..=parts.len()).rev() {
            let prefix_name = join(source, &parts[..depth]);
            let bare = parts[..depth].join(&source.separator.to_string());
            if let Some(to) = overrides.get(&prefix_name).or_else(|| overrides.get(&bare)) {
                let mut t: Vec<String> = components(
                    &Side {
                        prefix: String::new(),
                        ..target.clone()
                    },
                    to,
                );
                t.extend(
                    parts[depth..]
                        .iter()
                        .map(|p| clean(p, target.separator, &mut note)),
                );
                mapped = Some(t);
                break;
            }
        }
        if mapped.is_none() {
            for depth in (1..=parts.len()).rev() {
                let prefix_name = source_name_at(source, &f.name, &parts, depth);
                if let Some(role) = role_of.get(prefix_name.as_str()) {
                    if depth == parts.len() {
                        special = Some(*role);
                    }
                    let head: Vec<String> = match tgt_special.get(role) {
                        Some(t) => components(target, t),
                        None => parts[..depth]
                            .iter()
                            .map(|p| clean(p, target.separator, &mut note))
                            .collect(),
                    };
                    let mut t = head;
                    t.extend(
                        parts[depth..]
                            .iter()
                            .map(|p| clean(p, target.separator, &mut note)),
                    );
                    mapped = Some(t);
                    break;
                }
            }
        }
        let target_parts = mapped.unwrap_or_else(|| {
            parts
                .iter()
                .map(|p| clean(p, target.separator, &mut note))
                .collect()
        });
        let target_name = join(target, &target_parts);
        pairs.push(FolderPair {
            source: f.name.clone(),
            create: !target_names.contains_key(&fold(&target_name)),
            target: target_name,
            selectable: f.selectable,
            special,
            note,
        });
    }
    // Two source folders landing on one target folder would merge silently; the
    // second gets a numbered name and a note instead.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in &mut pairs {
        let key = fold(&p.target);
        let n = seen.entry(key).or_insert(0);
        *n += 1;
        if *n > 1 {
            let renamed = format!("{} ({})", p.target, n);
            p.note = Some(format!(
                "{} already receives another folder; renamed to {renamed}",
                p.target
            ));
            p.create = !target_names.contains_key(&fold(&renamed));
            p.target = renamed;
        }
    }
    pairs.sort_by(|a, b| a.target.cmp(&b.target));
    pairs
}

fn source_name_at(side: &Side, full: &str, parts: &[String], depth: usize) -> String {
    if depth == parts.len() {
        full.to_string()
    } else {
        join(side, &parts[..depth])
    }
}

fn fold(name: &str) -> String {
    if is_inbox(name) {
        "INBOX".into()
    } else {
        name.to_string()
    }
}

fn clean(component: &str, target_sep: char, note: &mut Option<String>) -> String {
    if component.contains(target_sep) {
        let fixed = component.replace(target_sep, "_");
        *note = Some(format!(
            "`{component}` contains the target separator `{target_sep}`: renamed to `{fixed}`"
        ));
        fixed
    } else {
        component.to_string()
    }
}

/// Target folders to CREATE, parents first, including missing ancestors of
/// each mapped folder (RFC 3501 6.3.3 lets a server skip creating them).
pub fn folders_to_create(target: &Side, pairs: &[FolderPair]) -> Vec<String> {
    let existing: std::collections::HashSet<String> =
        target.folders.iter().map(|f| fold(&f.name)).collect();
    let mut out: Vec<String> = Vec::new();
    for p in pairs {
        let parts = components(target, &p.target);
        for depth in 1..=parts.len() {
            let name = join(target, &parts[..depth]);
            if is_inbox(&name) || existing.contains(&name) || out.contains(&name) {
                continue;
            }
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dovecot_source() -> Side {
        Side {
            separator: '.',
            prefix: String::new(),
            folders: vec![
                Folder::new("INBOX"),
                Folder::special("Sent", SpecialUse::Sent),
                Folder::new("Sent.2019"),
                Folder::special("Drafts", SpecialUse::Drafts),
                Folder::special("Trash", SpecialUse::Trash),
                Folder::new("Trash.Old"),
                Folder::special("Junk", SpecialUse::Junk),
                Folder::special("Archive", SpecialUse::Archive),
                Folder::new("Archive.2010.Q1"),
                Folder::new("a.b.c.d.e.f"),
                Folder::new("Réunions"),
                Folder::new("Tom & \"Jerry\""),
                Folder::new("Projects.Sent"),
            ],
        }
    }

    fn exchange_target() -> Side {
        Side {
            separator: '/',
            prefix: String::new(),
            folders: vec![
                Folder::new("INBOX"),
                Folder::special("Sent Items", SpecialUse::Sent),
                Folder::special("Deleted Items", SpecialUse::Trash),
                Folder::special("Junk Email", SpecialUse::Junk),
                Folder::special("Drafts", SpecialUse::Drafts),
            ],
        }
    }

    fn target_of<'a>(pairs: &'a [FolderPair], source: &str) -> &'a FolderPair {
        pairs
            .iter()
            .find(|p| p.source == source)
            .unwrap_or_else(|| panic!("no pair for {source}"))
    }

    #[test]
    fn maps_the_tree() {
        let pairs = map_folders(&dovecot_source(), &exchange_target(), &BTreeMap::new(), &[]);
        let table = [
            ("INBOX", "INBOX", false),
            ("Sent", "Sent Items", false),
            ("Sent.2019", "Sent Items/2019", true),
            ("Drafts", "Drafts", false),
            ("Trash", "Deleted Items", false),
            ("Trash.Old", "Deleted Items/Old", true),
            ("Junk", "Junk Email", false),
            // The target has no \Archive: the source name is kept.
            ("Archive", "Archive", true),
            ("Archive.2010.Q1", "Archive/2010/Q1", true),
            ("a.b.c.d.e.f", "a/b/c/d/e/f", true),
            ("Réunions", "Réunions", true),
            ("Tom & \"Jerry\"", "Tom & \"Jerry\"", true),
            // Only top-level names are read as localized special folders.
            ("Projects.Sent", "Projects/Sent", true),
        ];
        for (src, tgt, create) in table {
            let p = target_of(&pairs, src);
            assert_eq!((p.target.as_str(), p.create), (tgt, create), "{src}");
        }
        assert_eq!(pairs.len(), table.len());
        assert!(!pairs.iter().any(|p| p.target == "Sent"), "no second Sent");
    }

    #[test]
    fn localized_names_without_attributes() {
        let source = Side {
            separator: '/',
            prefix: String::new(),
            folders: [
                "INBOX",
                "Gesendete Elemente",
                "Gesendete Elemente/Alt",
                "Gelöschte Elemente",
                "Spam",
                "Entwürfe",
            ]
            .into_iter()
            .map(Folder::new)
            .collect(),
        };
        let target = Side {
            separator: '.',
            prefix: "INBOX.".into(),
            folders: [
                "INBOX",
                "INBOX.Sent",
                "INBOX.Trash",
                "INBOX.Junk",
                "INBOX.Drafts",
            ]
            .into_iter()
            .map(Folder::new)
            .collect(),
        };
        let pairs = map_folders(&source, &target, &BTreeMap::new(), &[]);
        for (src, tgt) in [
            ("Gesendete Elemente", "INBOX.Sent"),
            ("Gesendete Elemente/Alt", "INBOX.Sent.Alt"),
            ("Gelöschte Elemente", "INBOX.Trash"),
            ("Spam", "INBOX.Junk"),
            ("Entwürfe", "INBOX.Drafts"),
            ("INBOX", "INBOX"),
        ] {
            assert_eq!(target_of(&pairs, src).target, tgt, "{src}");
            assert_eq!(target_of(&pairs, src).create, src.contains('/'), "{src}");
        }
    }

    #[test]
    fn courier_prefix_on_the_source() {
        let source = Side {
            separator: '.',
            prefix: "INBOX.".into(),
            folders: [
                "INBOX",
                "INBOX.Sent Items",
                "INBOX.Clients",
                "INBOX.Clients.ACME",
            ]
            .into_iter()
            .map(Folder::new)
            .collect(),
        };
        let pairs = map_folders(&source, &exchange_target(), &BTreeMap::new(), &[]);
        assert_eq!(target_of(&pairs, "INBOX.Sent Items").target, "Sent Items");
        assert_eq!(
            target_of(&pairs, "INBOX.Clients.ACME").target,
            "Clients/ACME"
        );
        assert_eq!(target_of(&pairs, "INBOX").target, "INBOX");
    }

    #[test]
    fn separator_inside_a_name_is_replaced_and_reported() {
        let source = Side {
            separator: '.',
            prefix: String::new(),
            folders: vec![Folder::new("Q1/Q2.sub")],
        };
        let pairs = map_folders(&source, &exchange_target(), &BTreeMap::new(), &[]);
        assert_eq!(pairs[0].target, "Q1_Q2/sub");
        assert!(pairs[0].note.as_deref().unwrap().contains("Q1/Q2"));
        // '.' inside a name is fine on a '/' target and the other way round.
        let source = Side {
            separator: '/',
            prefix: String::new(),
            folders: vec![Folder::new("v1.2/notes")],
        };
        let target = Side {
            separator: '.',
            prefix: String::new(),
            folders: vec![],
        };
        let pairs = map_folders(&source, &target, &BTreeMap::new(), &[]);
        assert_eq!(pairs[0].target, "v1_2.notes");
        assert!(pairs[0].note.is_some());
    }

    #[test]
    fn overrides_and_excludes() {
        let mut overrides = BTreeMap::new();
        overrides.insert("Archive".to_string(), "Old Mail/Archive".to_string());
        overrides.insert("Sent".to_string(), "Sent Items/From Old".to_string());
        let pairs = map_folders(
            &dovecot_source(),
            &exchange_target(),
            &overrides,
            &["a.b".to_string()],
        );
        assert_eq!(
            target_of(&pairs, "Archive.2010.Q1").target,
            "Old Mail/Archive/2010/Q1"
        );
        assert_eq!(
            target_of(&pairs, "Sent.2019").target,
            "Sent Items/From Old/2019"
        );
        assert!(!pairs.iter().any(|p| p.source.starts_with("a.b")));
        let create = folders_to_create(&exchange_target(), &pairs);
        let pos = |n: &str| {
            create
                .iter()
                .position(|c| c == n)
                .unwrap_or_else(|| panic!("{n} not created"))
        };
        assert!(pos("Old Mail") < pos("Old Mail/Archive"));
        assert!(pos("Old Mail/Archive/2010") < pos("Old Mail/Archive/2010/Q1"));
        assert!(!create.iter().any(|c| c == "Sent Items"));
    }

    #[test]
    fn two_sources_on_one_target_are_kept_apart() {
        let source = Side {
            separator: '.',
            prefix: String::new(),
            folders: vec![
                Folder::special("Sent", SpecialUse::Sent),
                Folder::new("Sent Items"),
            ],
        };
        let pairs = map_folders(&source, &exchange_target(), &BTreeMap::new(), &[]);
        let targets: Vec<_> = pairs.iter().map(|p| p.target.as_str()).collect();
        assert!(
            targets.contains(&"Sent Items") && targets.contains(&"Sent Items (2)"),
            "{targets:?}"
        );
    }
}
