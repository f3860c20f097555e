//! What a scenario run saw: one record per call, violations in words, and the
//! summary line `N scenarios, M calls, K violations`.

use serde::Serialize;

/// One call as KooGallery saw it (after its retries), or one step of the
/// usage flow (`adm`: posted to the gateway's admin API; `sim`: checked at
/// the simulated usage API).
#[derive(Clone, Debug, Serialize)]
pub struct CallRecord {
    /// 1-based position in the scenario.
    pub step: usize,
    /// `v1` or `v2`, or `adm`/`sim` for a usage flow step.
    pub generation: &'static str,
    pub activity: String,
    pub order_id: Option<String>,
    /// HTTP status of the last attempt (none: no answer).
    pub http_status: Option<u16>,
    pub result_code: Option<String>,
    pub expect: String,
    pub instance_id: Option<String>,
    /// The last answer's `Body-Sign` is valid for the access key.
    pub signature_ok: bool,
    pub attempts: u32,
    /// Of the last attempt.
    pub latency_ms: f64,
    /// Protocol violations, in words; empty when the call went as KooGallery expects.
    pub violations: Vec<String>,
}

/// One scenario's calls.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub about: String,
    pub calls: Vec<CallRecord>,
    /// Why the scenario stopped early (counts as a violation).
    pub aborted: Option<String>,
}

impl CallRecord {
    /// A KooGallery call, whose answer is signed (`Body-Sign`).
    pub fn is_signed_call(&self) -> bool {
        matches!(self.generation, "v1" | "v2")
    }
}

/// A scenario not run, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub name: String,
    pub why: String,
}

impl ScenarioReport {
    pub fn violations(&self) -> usize {
        self.calls.iter().map(|c| c.violations.len()).sum::<usize>() + usize::from(self.aborted.is_some())
    }
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub run_id: String,
    pub gateway: String,
    pub scenarios: Vec<ScenarioReport>,
    /// Scenarios selected but not run (not counted in the summary).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

impl Report {
    pub fn calls(&self) -> usize {
        self.scenarios.iter().map(|s| s.calls.len()).sum()
    }

    /// Violations counted one per problem found (a call may have several).
    pub fn violations(&self) -> usize {
        self.scenarios.iter().map(ScenarioReport::violations).sum()
    }

    /// No violation at all.
    pub fn ok(&self) -> bool {
        self.violations() == 0
    }

    /// Every violation as `scenario #step activity: text`.
    pub fn violation_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.scenarios {
            for c in &s.calls {
                for v in &c.violations {
                    out.push(format!("{} #{} {}: {v}", s.name, c.step, c.activity));
                }
            }
            if let Some(why) = &s.aborted {
                out.push(format!("{}: {why}", s.name));
            }
        }
        out
    }

    /// `N scenarios, M calls, K violations`.
    pub fn summary(&self) -> String {
        format!("{} scenarios, {} calls, {} violations", self.scenarios.len(), self.calls(), self.violations())
    }

    /// The table of every call, scenario by scenario, then the summary line.
    pub fn table(&self) -> String {
        let mut out = format!("run {} against {}\n", self.run_id, self.gateway);
        for s in &self.scenarios {
            out.push_str(&format!("\n== {}: {}\n", s.name, s.about));
            out.push_str(&format!(
                "{:>3} {:<3} {:<21} {:<28} {:>4} {:<6} {:<6} {:<36} {:<3} {:>5} {:>9}\n",
                "#", "GEN", "ACTIVITY", "ORDER", "HTTP", "CODE", "EXPECT", "INSTANCE", "SIG", "TRIES", "LATENCY"
            ));
            for c in &s.calls {
                out.push_str(&format!(
                    "{:>3} {:<3} {:<21} {:<28} {:>4} {:<6} {:<6} {:<36} {:<3} {:>5} {:>7.1}ms\n",
                    c.step,
                    c.generation,
                    c.activity,
                    c.order_id.as_deref().unwrap_or("-"),
                    c.http_status.map_or("-".into(), |s| s.to_string()),
                    c.result_code.as_deref().unwrap_or("-"),
                    c.expect,
                    c.instance_id.as_deref().unwrap_or("-"),
                    match (c.is_signed_call(), c.signature_ok) {
                        (false, _) => "-",
                        (true, true) => "ok",
                        (true, false) => "BAD",
                    },
                    c.attempts,
                    c.latency_ms,
                ));
                for v in &c.violations {
                    out.push_str(&format!("    ! {v}\n"));
                }
            }
            if let Some(why) = &s.aborted {
                out.push_str(&format!("    ! stopped: {why}\n"));
            }
        }
        for s in &self.skipped {
            out.push_str(&format!("\n== {}: skipped: {}\n", s.name, s.why));
        }
        out.push('\n');
        out.push_str(&self.summary());
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(violations: &[&str]) -> CallRecord {
        CallRecord {
            step: 1,
            generation: "v2",
            activity: "newInstance".into(),
            order_id: Some("O".into()),
            http_status: Some(200),
            result_code: Some("000000".into()),
            expect: "000000".into(),
            instance_id: None,
            signature_ok: violations.is_empty(),
            attempts: 1,
            latency_ms: 1.0,
            violations: violations.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn counts_and_summary() {
        let report = Report {
            run_id: "R1".into(),
            gateway: "http://x".into(),
            scenarios: vec![
                ScenarioReport {
                    name: "a".into(),
                    about: String::new(),
                    calls: vec![call(&[]), call(&[])],
                    aborted: None,
                },
                ScenarioReport {
                    name: "b".into(),
                    about: String::new(),
                    calls: vec![call(&["unsigned", "resultCode 000001"])],
                    aborted: Some("stopped".into()),
                },
            ],
            skipped: vec![Skipped { name: "c".into(), why: "no admin API".into() }],
        };
        assert_eq!(report.summary(), "2 scenarios, 3 calls, 3 violations");
        assert!(!report.ok());
        assert_eq!(report.violation_lines().len(), 3);
        assert!(report.table().ends_with("2 scenarios, 3 calls, 3 violations\n"));
        assert!(report.table().contains("    ! unsigned"));
        assert!(report.table().contains("== c: skipped: no admin API\n"));
        let mut usage_row = call(&[]);
        usage_row.generation = "adm";
        usage_row.signature_ok = false;
        assert!(!usage_row.is_signed_call() && call(&[]).is_signed_call());
    }
}
