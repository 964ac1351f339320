//! The final figures of a scenario: a table for people, one JSON object for machines.

use serde_json::{Map, Value};

pub struct Report {
    scenario: &'static str,
    rows: Vec<(String, Value)>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            rows: Vec::new(),
        }
    }

    pub fn add(&mut self, name: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.rows.push((name.into(), value.into()));
        self
    }

    pub fn print(&self, json: bool) {
        if json {
            let mut object = Map::new();
            object.insert("scenario".into(), self.scenario.into());
            for (name, value) in &self.rows {
                object.insert(name.clone(), value.clone());
            }
            println!("{}", Value::Object(object));
            return;
        }
        let width = self
            .rows
            .iter()
            .map(|(name, _)| name.len())
            .max()
            .unwrap_or(0);
        println!("{}", self.scenario);
        for (name, value) in &self.rows {
            let shown = match value {
                Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {name:<width$}  {shown}");
        }
    }
}

/// A histogram of microseconds, from 1 µs to an hour at 3 significant digits. (`Histogram::new`
/// starts at a tiny range, and a saturating record clamps to it instead of growing.)
pub fn histogram() -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    Ok(hdrhistogram::Histogram::new_with_bounds(
        1,
        3_600_000_000,
        3,
    )?)
}

/// Percentiles of a histogram of microseconds, in milliseconds, as `{what}_p50_ms` and so on.
pub fn percentiles(report: &mut Report, what: &str, histogram: &hdrhistogram::Histogram<u64>) {
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let name = |suffix: &str| format!("{what}_{suffix}");
    report
        .add(name("p50_ms"), ms(0.5))
        .add(name("p90_ms"), ms(0.9))
        .add(name("p99_ms"), ms(0.99))
        .add(name("p999_ms"), ms(0.999))
        .add(name("max_ms"), histogram.max() as f64 / 1000.0);
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len}",
        )
        .expect("a valid template"),
    );
    bar.set_message(what.to_owned());
    bar
}
