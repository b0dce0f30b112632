//! The layering rules, checked by reading the workspace's files: which crate may depend on
//! which, that storage knows no network or protobuf, that only the broker's edge names
//! prost, tonic or axum, and that only the log writer appends to the commit log. Runs in milliseconds and needs no tool beyond `cargo test`.
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The names in a crate's `[dependencies]` table (not dev- or build-dependencies).
fn dependencies(crate_dir: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace().join(crate_dir).join("Cargo.toml")).unwrap();
    let mut names = Vec::new();
    let mut in_section = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == "[dependencies]";
            continue;
        }
        if !in_section || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
        names.push(name.to_owned());
    }
    names
}

/// Every `.rs` file below `dir`, depth first.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Whether the source names an item of one of `crates` (a path `krate::…` or a `use krate`).
fn names_any(source: &str, crates: &[&str]) -> bool {
    source.lines().any(|line| {
        let code = line.split("//").next().unwrap_or_default();
        crates.iter().any(|krate| {
            code.match_indices(&format!("{krate}::")).any(|(at, _)| {
                // `prost::` but not `tonic_prost::` or `ferrumq_prost::`.
                !code[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            }) || code.trim_start().starts_with(&format!("use {krate};"))
        })
    })
}

#[test]
fn crates_depend_only_on_the_workspace_crates_the_layering_allows() {
    let allowed: &[(&str, &[&str])] = &[
        ("protocol", &[]),
        ("storage", &[]),
        ("nameserver", &["ferrumq-protocol"]),
        (
            "broker",
            &["ferrumq-storage", "ferrumq-protocol", "ferrumq-nameserver"],
        ),
        ("client", &["ferrumq-protocol"]),
        ("tools", &["ferrumq-protocol", "ferrumq-client"]),
        (
            "benches",
            &["ferrumq-storage", "ferrumq-protocol", "ferrumq-client"],
        ),
    ];
    for (crate_dir, may_use) in allowed {
        for dependency in dependencies(crate_dir) {
            if dependency.starts_with("ferrumq-") {
                assert!(
                    may_use.contains(&dependency.as_str()),
                    "{crate_dir} depends on {dependency}; it may depend on {may_use:?} only"
                );
            }
        }
    }
}

#[test]
fn storage_knows_no_network_async_runtime_protobuf_or_raft() {
    let forbidden = [
        "tonic",
        "prost",
        "prost-types",
        "axum",
        "hyper",
        "h2",
        "tokio",
        "openraft",
    ];
    for dependency in dependencies("storage") {
        assert!(
            !forbidden.contains(&dependency.as_str()),
            "storage depends on {dependency}"
        );
    }
    for file in rust_files(&workspace().join("storage/src")) {
        let source = std::fs::read_to_string(&file).unwrap();
        assert!(
            !names_any(&source, &["tonic", "prost", "prost_types", "axum", "tokio"]),
            "{} names a network, runtime or protobuf crate",
            file.display()
        );
    }
}

/// Files of the broker's domain that still name prost, tonic or axum, to be moved behind the
/// edge. The list only shrinks: a file that no longer names them must leave it.
const DOMAIN_FILES_STILL_SPEAKING_THE_WIRE: &[&str] = &["cluster.rs", "message.rs", "service.rs"];

#[test]
fn only_the_brokers_edge_names_prost_tonic_or_axum() {
    let src = workspace().join("broker/src");
    let edge = ["api/", "main.rs"];
    for file in rust_files(&src) {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if edge.iter().any(|prefix| relative.starts_with(prefix)) {
            continue;
        }
        let speaks_wire = names_any(
            &std::fs::read_to_string(&file).unwrap(),
            &["prost", "prost_types", "tonic", "axum"],
        );
        let listed = DOMAIN_FILES_STILL_SPEAKING_THE_WIRE.contains(&relative.as_str());
        assert!(
            !speaks_wire || listed,
            "broker/src/{relative} names prost, tonic or axum: only the edge may"
        );
        assert!(
            speaks_wire || !listed,
            "broker/src/{relative} no longer names prost, tonic or axum: take it off the list"
        );
    }
}

/// One log writer: every broker append goes through `log_writer.rs`, where "committed" is
/// decided, so replication changes it in one place.
#[test]
fn only_the_log_writer_appends_to_the_commit_log() {
    let src = workspace().join("broker/src");
    let appending: Vec<String> = rust_files(&src)
        .into_iter()
        .filter(|path| !path.ends_with("log_writer.rs"))
        .filter(|path| {
            let source = std::fs::read_to_string(path).unwrap();
            source.lines().any(|line| {
                let code = line.split("//").next().unwrap_or_default();
                code.contains(".append(&") || code.contains("append_batch(")
            })
        })
        .map(|path| path.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert!(
        appending.is_empty(),
        "these broker files append to the log without the log writer: {appending:?}"
    );
}

#[test]
fn no_module_is_a_grab_bag() {
    for crate_dir in [
        "protocol",
        "storage",
        "nameserver",
        "broker",
        "client",
        "tools",
        "benches",
    ] {
        for file in rust_files(&workspace().join(crate_dir).join("src")) {
            let name = file.file_name().unwrap().to_string_lossy();
            assert!(
                !["utils.rs", "helpers.rs", "common.rs", "misc.rs"].contains(&name.as_ref()),
                "{} names no concept",
                file.display()
            );
        }
    }
}

#[test]
fn names_any_reads_paths_and_uses_not_longer_names() {
    assert!(names_any("let x = prost::Message::decode(b);", &["prost"]));
    assert!(names_any("use tonic;", &["tonic"]));
    assert!(!names_any("use tonic_prost::ProstCodec;", &["prost"]));
    assert!(!names_any(
        "// tonic::Status is mapped at the edge",
        &["tonic"]
    ));
}
