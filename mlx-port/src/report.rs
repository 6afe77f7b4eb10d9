//! Verification reports, as JSON and as a Markdown table.

use crate::compare::Diff;
use crate::fixture::Fixture;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// One compared tensor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    #[serde(flatten)]
    pub diff: Diff,
    pub pass: bool,
}

impl Row {
    pub fn new(name: &str, diff: Diff, pass: bool) -> Row {
        Row {
            name: name.to_owned(),
            diff,
            pass,
        }
    }
}

/// One whole-model check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, pass: bool, detail: String) -> Check {
        Check {
            name: name.to_owned(),
            pass,
            detail,
        }
    }
}

/// The outcome of verifying one fixture.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub fixture: String,
    pub description: String,
    pub max_abs_tolerance: f32,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(fixture: &Fixture) -> Report {
        Report {
            fixture: fixture.name(),
            description: fixture.manifest.description.clone(),
            max_abs_tolerance: fixture.manifest.tolerances.max_abs,
            rows: Vec::new(),
            checks: Vec::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.pass) && self.checks.iter().all(|c| c.pass)
    }

    /// The first tensor, in forward order, that is off: where a port goes wrong.
    pub fn first_bad(&self) -> Option<&str> {
        self.first_bad_row().map(|r| r.name.as_str())
    }

    /// The first row that fails, with its numbers.
    pub fn first_bad_row(&self) -> Option<&Row> {
        self.rows.iter().find(|r| !r.pass)
    }

    /// The failed checks' names.
    pub fn failed_checks(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.name.as_str())
            .collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialize")
    }

    pub fn to_markdown(&self) -> String {
        let verdict = |pass: bool| if pass { "pass" } else { "**FAIL**" };
        let mut md = String::new();
        let _ = writeln!(
            md,
            "### {} — {}\n",
            self.fixture,
            if self.passed() { "PASS" } else { "FAIL" }
        );
        if !self.description.is_empty() {
            let _ = writeln!(md, "{}\n", self.description);
        }
        let _ = writeln!(md, "| layer | max-abs | max-rel | cosine | verdict |");
        let _ = writeln!(md, "|---|---:|---:|---:|---|");
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {:.2e} | {:.2e} | {:.7} | {} |",
                r.name,
                r.diff.max_abs,
                r.diff.max_rel,
                r.diff.cosine,
                verdict(r.pass)
            );
        }
        let _ = writeln!(md, "\n| check | verdict | detail |");
        let _ = writeln!(md, "|---|---|---|");
        for c in &self.checks {
            let _ = writeln!(md, "| {} | {} | {} |", c.name, verdict(c.pass), c.detail);
        }
        if let Some(bad) = self.first_bad() {
            let _ = writeln!(
                md,
                "\nFirst tensor off: `{bad}` (max-abs tolerance {:.0e}).",
                self.max_abs_tolerance
            );
        }
        md
    }
}
