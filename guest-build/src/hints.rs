//! One-line hints for the well-known ways a guest build fails, printed after cargo's own
//! output: a guest without `pvrun::entry!`/`export_functions!`, without `#![no_std]` or
//! `#![no_main]`, and a dependency that needs `std`.
//!
//! The hints are found in rustc's diagnostics (cargo's JSON messages), so they do not
//! depend on how the messages are rendered.

use cargo_metadata::diagnostic::Diagnostic;

/// The hints collected from one build, in the order first seen, without repeats.
#[derive(Debug, Default)]
pub struct Hints {
    lines: Vec<String>,
}

/// Everything a diagnostic says: its message, rendered text (which holds the linker's
/// output for a link failure) and its children's messages.
fn all_text(d: &Diagnostic, out: &mut String) {
    out.push_str(&d.message);
    out.push('\n');
    if let Some(r) = &d.rendered {
        out.push_str(r);
        out.push('\n');
    }
    for c in &d.children {
        all_text(c, out);
    }
}

/// `X` in "crate `std` (which `X` depends on)".
fn crate_depending_on_std(text: &str) -> Option<&str> {
    const PAT: &str = "crate `std` (which `";
    let start = text.find(PAT)? + PAT.len();
    let rest = &text[start..];
    let end = rest.find("` depends on)")?;
    Some(&rest[..end])
}

/// The hint for a guest without an entry point.
pub const NO_ENTRY: &str = "hint: the guest has no entry point: add `pvrun::entry!(main);` to src/main.rs (or `pvrun::export_functions! { \"name\" => function }` for a function guest)";

/// The hint for a guest without `#![no_std]`.
pub const NO_STD: &str = "hint: the guest links the standard library, which pvrun guests do not have: put `#![no_std]` and `#![no_main]` at the top of src/main.rs";

/// The hint for a guest without `#![no_main]`.
pub const NO_MAIN: &str = "hint: put `#![no_main]` at the top of src/main.rs: the SDK provides the entry point, and `pvrun::entry!(main);` names your `main`";

/// The hint for a dependency that needs `std`.
pub fn std_dependency(krate: &str) -> String {
    format!(
        "hint: dependency `{krate}` needs the standard library, which pvrun guests do not have: turn off its `std` feature (`{krate} = {{ version = \"...\", default-features = false }}` in Cargo.toml) or use a `no_std` crate instead"
    )
}

/// The hint for a platform hook whose SDK feature is off.
pub fn sdk_feature(feature: &str) -> String {
    format!(
        "hint: a dependency needs the SDK's `{feature}` backend, which is off: turn guest-sdk's `{feature}` feature back on (it is a default feature)"
    )
}

impl Hints {
    /// Looks at one compiler diagnostic, emitted while compiling crate `compiling` (its
    /// crate name), for the guest whose crate name is `guest`.
    pub fn observe(&mut self, d: &Diagnostic, compiling: &str, guest: &str) {
        let mut text = String::new();
        all_text(d, &mut text);
        let code = d.code.as_ref().map(|c| c.code.as_str());
        if text.contains("undefined symbol: __pvrun_main")
            || text.contains("undefined reference to `__pvrun_main'")
            || text.contains("`#[panic_handler]` function required, but not found")
        {
            self.add(NO_ENTRY.to_string());
        }
        for (symbol, feature) in [
            ("__getrandom_v03_custom", "getrandom"),
            ("_critical_section_1_0_acquire", "critical-section"),
        ] {
            if text.contains(&format!("undefined symbol: {symbol}"))
                || text.contains(&format!("undefined reference to `{symbol}'"))
            {
                self.add(sdk_feature(feature));
            }
        }
        if text.contains("using `fn main` requires the standard library")
            || text.contains("requires `start` lang_item")
        {
            self.add(NO_MAIN.to_string());
        }
        if code == Some("E0152") {
            match crate_depending_on_std(&text) {
                Some(k) if k == guest => self.add(NO_STD.to_string()),
                Some(k) => self.add(std_dependency(k)),
                None => {}
            }
        }
        // Targets without `std` (x86_64-unknown-none) say this instead of E0152.
        if code == Some("E0463") && text.contains("can't find crate for `std`") {
            if compiling == guest {
                self.add(NO_STD.to_string());
            } else {
                self.add(std_dependency(compiling));
            }
        }
    }

    fn add(&mut self, line: String) {
        if !self.lines.contains(&line) {
            self.lines.push(line);
        }
    }

    /// The hint lines.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A diagnostic as rustc writes it in cargo's JSON messages.
    fn diag(message: &str, code: Option<&str>, notes: &[&str]) -> Diagnostic {
        let child = |m: &str| {
            serde_json::json!({"message": m, "code": null, "level": "note", "spans": [],
                "children": [], "rendered": null})
        };
        let code = code.map(|c| serde_json::json!({"code": c, "explanation": null}));
        serde_json::from_value(serde_json::json!({
            "message": message, "code": code, "level": "error", "spans": [],
            "children": notes.iter().map(|n| child(n)).collect::<Vec<_>>(),
            "rendered": format!("error: {message}\n"),
        }))
        .unwrap()
    }

    fn hints_for(d: &Diagnostic, compiling: &str) -> Vec<String> {
        let mut h = Hints::default();
        h.observe(d, compiling, "guest");
        h.observe(d, compiling, "guest"); // seen twice, said once
        h.lines().to_vec()
    }

    #[test]
    fn each_known_failure_gets_its_hint() {
        let link = |sym: &str| {
            diag(
                "linking with `cc` failed: exit status: 1",
                None,
                &[&format!(
                    "rust-lld: error: undefined symbol: {sym}\n>>> referenced by x"
                )],
            )
        };
        assert_eq!(hints_for(&link("__pvrun_main"), "guest"), [NO_ENTRY]);
        assert_eq!(
            hints_for(&link("__getrandom_v03_custom"), "guest"),
            [sdk_feature("getrandom")]
        );
        assert_eq!(
            hints_for(&link("_critical_section_1_0_acquire"), "guest"),
            [sdk_feature("critical-section")]
        );
        let e0152 = |who: &str| {
            diag(
                "duplicate lang item in crate `pvrun` (which `guest` depends on): `panic_impl`",
                Some("E0152"),
                &[&format!(
                    "the lang item is first defined in crate `std` (which `{who}` depends on)"
                )],
            )
        };
        assert_eq!(hints_for(&e0152("guest"), "guest"), [NO_STD]);
        assert_eq!(
            hints_for(&e0152("serde_json"), "guest"),
            [std_dependency("serde_json")]
        );
        let e0463 = diag("can't find crate for `std`", Some("E0463"), &[]);
        assert_eq!(hints_for(&e0463, "guest"), [NO_STD]);
        assert_eq!(hints_for(&e0463, "anyhow"), [std_dependency("anyhow")]);
        let no_main = diag("using `fn main` requires the standard library", None, &[]);
        assert_eq!(hints_for(&no_main, "guest"), [NO_MAIN]);
        // Anything else: no hint.
        let other = diag("mismatched types", Some("E0308"), &[]);
        assert!(hints_for(&other, "guest").is_empty());
    }

    #[test]
    fn finds_the_crate_that_depends_on_std() {
        let t = "duplicate lang item in crate `std` (which `stdonly` depends on): `panic_impl`";
        assert_eq!(crate_depending_on_std(t), Some("stdonly"));
        assert_eq!(crate_depending_on_std("crate `core`"), None);
    }
}
