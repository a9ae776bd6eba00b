//! The reference configuration file and the `nanochat` binary's configuration errors.

use nanochat::config::Settings;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nanochat.toml");

/// `section.key` for every key of every section (a key's value may itself be a table, as
/// rates are).
fn keys(value: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for (section, table) in value.as_object().expect("sections") {
        for key in table.as_object().expect("keys").keys() {
            out.push(format!("{section}.{key}"));
        }
    }
    out
}

#[test]
fn the_reference_config_lists_every_key_at_its_default() {
    let loaded =
        Settings::load_from(Some(REFERENCE.as_ref()), Vec::new()).expect("reference loads");
    assert_eq!(
        loaded,
        Settings::default(),
        "the reference file states the defaults"
    );
    let text = std::fs::read_to_string(REFERENCE).unwrap();
    // Every key of the settings, including optional ones, via their JSON shape.
    let mut defaults = serde_json::to_value(Settings::default()).unwrap();
    defaults["server"]["secret_file"] = "x".into();
    defaults["database"]["url"] = "x".into();
    for key in keys(&defaults) {
        let (section, name) = key.split_once('.').unwrap();
        assert!(
            text.contains(&format!("[{section}]")),
            "section {section} missing"
        );
        assert!(
            text.contains(&format!("\n{name} = ")) || text.contains(&format!("\n# {name} = ")),
            "key {key} missing from deploy/nanochat.toml"
        );
        let env = format!(
            "NANOCHAT__{}__{}",
            section.to_uppercase(),
            name.to_uppercase()
        );
        assert!(
            text.contains(&env),
            "{env} missing from deploy/nanochat.toml"
        );
    }
}

#[test]
fn config_check_names_the_bad_key_and_accepts_the_reference() {
    let bin = env!("CARGO_BIN_EXE_nanochat");
    let ok = std::process::Command::new(bin)
        .args(["--config", REFERENCE, "config", "check"])
        .env_remove("NANOCHAT_CONFIG")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = std::process::Command::new(bin)
        .args(["config", "check"])
        .env("NANOCHAT__LIMITS__MAX_CT_BYTES", "3")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("limits.max_ct_bytes"), "{stderr}");
    // The server itself refuses to start with the same message.
    let dir = tempfile::tempdir().unwrap();
    let serve = std::process::Command::new(bin)
        .env("NANOCHAT__LIMITS__MAX_CT_BYTES", "3")
        .env("NANOCHAT__SERVER__DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&serve.stderr).contains("limits.max_ct_bytes"));
}
