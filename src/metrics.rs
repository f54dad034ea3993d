//! Training metrics stored with a checkpoint (loss, grad norm, ...), and
//! the conditions that select a step by them: after a loss spike, a
//! trainer goes back to the newest step whose loss was still good.
//!
//! Metrics are a map from name to `f64` in the manifest's optional
//! `metrics` field. A non-finite value (a NaN loss, an infinite grad norm)
//! is stored as JSON `null` and reads back as NaN; no condition matches it.

use crate::error::{Error, Result};
use crate::tier::ChunkTier;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME: usize = 128;

/// Most metrics one checkpoint may carry.
pub const MAX_METRICS: usize = 1024;

/// Check a metric name: 1 to 128 bytes of ASCII letters, digits, `_`,
/// `.`, `-` and `/`, so that it can be written in a [`MetricFilter`].
pub fn validate_metric_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Err(Error::invalid("metric name", format!("{name:?}: {reason}")));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_METRIC_NAME {
        return bad("longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'))
    {
        return bad("may hold only ASCII letters, digits, '_', '.', '-' and '/'");
    }
    Ok(())
}

/// The metrics of a checkpoint: a map from name to value. Non-finite
/// values are stored as `null` and read back as NaN, so equality counts
/// every NaN equal to every other (a manifest equals its re-read self).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Metrics(#[serde(with = "finite_or_null")] pub BTreeMap<String, f64>);

impl Metrics {
    /// Whether there are no metrics (the manifest then omits the field).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PartialEq for Metrics {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((ka, a), (kb, b))| ka == kb && (a == b || (a.is_nan() && b.is_nan())))
    }
}

impl std::ops::Deref for Metrics {
    type Target = BTreeMap<String, f64>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Metrics {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl From<BTreeMap<String, f64>> for Metrics {
    fn from(m: BTreeMap<String, f64>) -> Self {
        Metrics(m)
    }
}

/// Check the metrics of a save: names and count.
pub(crate) fn validate_metrics(metrics: &BTreeMap<String, f64>) -> Result<()> {
    if metrics.len() > MAX_METRICS {
        return Err(Error::invalid(
            "metrics",
            format!(
                "{} metrics, more than the {MAX_METRICS} allowed",
                metrics.len()
            ),
        ));
    }
    metrics.keys().try_for_each(|n| validate_metric_name(n))
}

/// A comparison in a [`MetricFilter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricOp {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl MetricOp {
    fn symbol(self) -> &'static str {
        match self {
            MetricOp::Lt => "<",
            MetricOp::Le => "<=",
            MetricOp::Gt => ">",
            MetricOp::Ge => ">=",
            MetricOp::Eq => "==",
            MetricOp::Ne => "!=",
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            MetricOp::Lt => a < b,
            MetricOp::Le => a <= b,
            MetricOp::Gt => a > b,
            MetricOp::Ge => a >= b,
            MetricOp::Eq => a == b,
            MetricOp::Ne => a != b,
        }
    }
}

/// One `NAME OP VALUE` condition.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricCondition {
    /// The metric.
    pub name: String,
    /// The comparison.
    pub op: MetricOp,
    /// The value compared against.
    pub value: f64,
}

/// Conditions on a checkpoint's metrics, all of which must hold, e.g.
/// `loss<2.5,grad_norm<=10`. A checkpoint without one of the named metrics,
/// or with a non-finite value for it, does not match.
///
/// Parsed from text: conditions separated by `,` (or ` and `), each
/// `NAME OP NUMBER` with `OP` one of `<`, `<=`, `>`, `>=`, `==`, `!=`;
/// spaces around the parts are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricFilter {
    /// The conditions.
    pub conditions: Vec<MetricCondition>,
}

impl MetricFilter {
    /// Whether every condition holds for `metrics`.
    pub fn matches(&self, metrics: &BTreeMap<String, f64>) -> bool {
        self.conditions.iter().all(|c| {
            metrics
                .get(&c.name)
                .is_some_and(|&v| v.is_finite() && c.op.holds(v, c.value))
        })
    }
}

impl FromStr for MetricFilter {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| Error::invalid("metric condition", reason);
        let mut conditions = Vec::new();
        for part in s.split(',').flat_map(|p| p.split(" and ")) {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad(format!("{s:?}: empty condition")));
            }
            let at = part
                .find(['<', '>', '=', '!'])
                .ok_or_else(|| bad(format!("{part:?}: expected NAME OP NUMBER, e.g. loss<2.5")))?;
            let (name, rest) = (part[..at].trim(), &part[at..]);
            let (op, value) = [
                ("<=", MetricOp::Le),
                (">=", MetricOp::Ge),
                ("==", MetricOp::Eq),
                ("!=", MetricOp::Ne),
                ("<", MetricOp::Lt),
                (">", MetricOp::Gt),
            ]
            .iter()
            .find_map(|(sym, op)| rest.strip_prefix(sym).map(|v| (*op, v.trim())))
            .ok_or_else(|| bad(format!("{part:?}: unknown operator")))?;
            validate_metric_name(name).map_err(|e| bad(format!("{part:?}: {e}")))?;
            let value: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .ok_or_else(|| bad(format!("{part:?}: {value:?} is not a finite number")))?;
            conditions.push(MetricCondition {
                name: name.to_string(),
                op,
                value,
            });
        }
        Ok(MetricFilter { conditions })
    }
}

impl fmt::Display for MetricFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.conditions.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}{}{}", c.name, c.op.symbol(), c.value)?;
        }
        Ok(())
    }
}

/// The newest committed step of `run` on `tier` whose metrics match
/// `filter`, or `None` if none does. Reads manifests newest first and
/// stops at the first match; an unreadable manifest on the way is an
/// error, not a step silently passed over.
pub fn latest_matching(
    tier: &dyn ChunkTier,
    run: &str,
    filter: &MetricFilter,
) -> Result<Option<u64>> {
    for step in tier.steps(run)?.into_iter().rev() {
        if filter.matches(&tier.manifest(run, step)?.metrics) {
            return Ok(Some(step));
        }
    }
    Ok(None)
}

/// Serde for metrics: non-finite values as `null`, `null` read back as
/// NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let out: BTreeMap<&str, Option<f64>> = m
            .iter()
            .map(|(k, v)| (k.as_str(), v.is_finite().then_some(*v)))
            .collect();
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
        Ok(m.into_iter()
            .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest whose metrics hold a NaN (`null` in JSON) decodes,
    /// re-encodes and decodes to a manifest equal to itself, as the
    /// manifest fuzz target requires of every decodable manifest.
    #[test]
    fn nan_metrics_survive_a_re_encode_as_equal() {
        use crate::format::manifest::{decode_manifest_file, encode_envelope, encode_manifest};
        let body = br#"{"format_version":1,"run":"r","step":1,"created_unix_ms":0,"chunk_size":4096,"tensors":[],"blobs":[],"metadata":null,"metrics":{"loss":null,"lr":0.5}}"#;
        let path = std::path::Path::new("m");
        let m = decode_manifest_file(&encode_envelope(body), path).unwrap();
        assert!(m.metrics["loss"].is_nan());
        let again = decode_manifest_file(&encode_manifest(&m).unwrap(), path).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn parses_and_matches() {
        let f: MetricFilter = "loss < 2.5, grad_norm<=10".parse().unwrap();
        assert_eq!(f.conditions.len(), 2);
        let m = |loss: f64| BTreeMap::from([("loss".into(), loss), ("grad_norm".into(), 3.0)]);
        assert!(f.matches(&m(2.0)));
        assert!(!f.matches(&m(2.5)));
        assert!(!f.matches(&m(f64::NAN)));
        assert!(!f.matches(&BTreeMap::from([("loss".into(), 1.0)])));
        assert_eq!(f.to_string(), "loss<2.5,grad_norm<=10");
        let g: MetricFilter = "loss<3 and acc>=0.5".parse().unwrap();
        assert_eq!(g.conditions[1].op, MetricOp::Ge);
        for bad in [
            "", "loss", "loss<", "loss<abc", "<3", "lo ss<3", "loss<inf", "loss=<3",
        ] {
            assert!(bad.parse::<MetricFilter>().is_err(), "{bad:?} parsed");
        }
    }
}
