//! Verdicts, results and the summary of a run.

use std::fmt;
use std::time::Duration;

/// How one property ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// It held.
    Passed,
    /// It did not hold: why.
    Failed(String),
    /// It did not run: why (the store does not declare the guarantee it needs, the service
    /// is unavailable and not required, or a hook it needs is absent). Never a pass.
    Skipped(String),
}

/// One property's result.
#[derive(Clone, Debug)]
pub struct PropertyResult {
    /// The property's name.
    pub name: &'static str,
    /// How it ended.
    pub verdict: Verdict,
    /// How long it took.
    pub elapsed: Duration,
}

impl PropertyResult {
    /// Panics with the failure message if the property failed; prints the reason if it was
    /// skipped (a skip is reported, never counted as a pass).
    pub fn assert_ok(&self) {
        match &self.verdict {
            Verdict::Failed(why) => panic!("conformance property `{}` failed: {why}", self.name),
            Verdict::Skipped(why) => {
                eprintln!(
                    "conformance property `{}` SKIPPED (not passed): {why}",
                    self.name
                )
            }
            Verdict::Passed => {}
        }
    }
}

/// The results of a run, in run order.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per property.
    pub results: Vec<PropertyResult>,
}

impl Report {
    fn with(&self, f: impl Fn(&Verdict) -> bool) -> Vec<&PropertyResult> {
        self.results.iter().filter(|r| f(&r.verdict)).collect()
    }

    /// The properties that failed.
    pub fn failures(&self) -> Vec<&PropertyResult> {
        self.with(|v| matches!(v, Verdict::Failed(_)))
    }

    /// The properties that were skipped.
    pub fn skipped(&self) -> Vec<&PropertyResult> {
        self.with(|v| matches!(v, Verdict::Skipped(_)))
    }

    /// The properties that ran and held.
    pub fn passed(&self) -> Vec<&PropertyResult> {
        self.with(|v| *v == Verdict::Passed)
    }

    /// Whether the named property failed.
    pub fn failed(&self, name: &str) -> bool {
        self.failures().iter().any(|r| r.name == name)
    }

    /// One line: how many ran, passed, failed and were skipped.
    pub fn summary(&self) -> String {
        let (p, f, s) = (
            self.passed().len(),
            self.failures().len(),
            self.skipped().len(),
        );
        format!(
            "conformance: ran {} ({p} passed, {f} failed), {s} skipped",
            p + f
        )
    }

    /// Panics listing every failed property, if any.
    pub fn assert_ok(&self) {
        if !self.failures().is_empty() {
            panic!("conformance failures:\n{self}");
        }
    }
}

impl fmt::Display for PropertyResult {
    /// One line: `pass`, `FAIL` or `skip`, the name, the time taken and the reason.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tag, why) = match &self.verdict {
            Verdict::Passed => ("pass", ""),
            Verdict::Failed(why) => ("FAIL", why.as_str()),
            Verdict::Skipped(why) => ("skip", why.as_str()),
        };
        write!(f, "{tag} {:<30} {:>9.2?} {why}", self.name, self.elapsed)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            writeln!(f, "{r}")?;
        }
        writeln!(f, "{}", self.summary())
    }
}
