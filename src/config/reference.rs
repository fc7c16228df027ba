//! Keeps the config reference (docs/configuration.md), the annotated example
//! (config/all-in-one.toml) and the parser in step: a key added to one of them and
//! forgotten in another fails here.

use std::collections::BTreeSet;

use super::raw::RawConfig;

const REFERENCE: &str = include_str!("../../docs/configuration.md");
const ALL_IN_ONE: &str = include_str!("../../config/all-in-one.toml");

/// The tables of the file and how to put an unknown key in each.
const SECTIONS: [(&str, &str); 4] = [
    ("[server]", "[server]\nzz_not_a_key = 1\n"),
    ("[store]", "[store]\nzz_not_a_key = 1\n"),
    ("[providers.", "[providers.p]\nzz_not_a_key = 1\n"),
    ("[[routes]]", "[[routes]]\nzz_not_a_key = 1\n"),
];

/// The keys the parser accepts in a table, read off serde's "unknown field" message,
/// which lists every field the struct has.
fn accepted(probe: &str) -> BTreeSet<String> {
    let error = match toml::from_str::<RawConfig>(probe) {
        Ok(_) => panic!("the probe key was accepted: {probe}"),
        Err(e) => e.to_string(),
    };
    let expected = error
        .split_once("expected")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no field list in: {error}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The keys the reference documents under the heading holding `section`.
fn documented(section: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut inside = false;
    for line in REFERENCE.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            inside = heading.contains(section)
                && !(section == "[server]" && heading.contains("[[routes]]"));
            continue;
        }
        if inside {
            if let Some(row) = line.strip_prefix("| `") {
                if let Some((key, _)) = row.split_once('`') {
                    keys.insert(key.to_owned());
                }
            }
        }
    }
    keys
}

#[test]
fn every_key_the_parser_accepts_is_documented_and_nothing_else() {
    for (section, probe) in SECTIONS {
        let parser = accepted(probe);
        let docs = documented(section);
        assert!(
            !parser.is_empty(),
            "{section}: no keys read from the parser"
        );
        let undocumented: Vec<_> = parser.difference(&docs).collect();
        let unknown: Vec<_> = docs.difference(&parser).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "{section}: accepted but not in docs/configuration.md: {undocumented:?}; \
             documented but not accepted: {unknown:?}"
        );
    }
}

#[test]
fn every_documented_key_is_shown_in_the_all_in_one_example() {
    let shown = |key: &str| {
        ALL_IN_ONE.lines().any(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    for (section, _) in SECTIONS {
        let missing: Vec<_> = documented(section)
            .into_iter()
            .filter(|key| !shown(key))
            .collect();
        assert!(
            missing.is_empty(),
            "{section}: keys missing from config/all-in-one.toml (set or commented): {missing:?}"
        );
    }
}
