//! Typed stage parameters and their canonical form.
//!
//! Each stage declares its parameters with a type and default. Values from
//! pipeline.yaml, a profile or `-P key=value` are checked against that type and
//! normalised, so `3e-4` and `0.0003`, or `1` and `1.0` for a float, hash alike.

use anyhow::{bail, Result};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy)]
pub enum ParamType {
    Float,
    Int,
    Bool,
    Str,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
    FloatList,
    StrList,
    /// Free-form YAML value (for example a search space); hashed in canonical form.
    Any,
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// Default as YAML text, parsed once when the pipeline loads.
    pub default: &'static str,
    pub help: &'static str,
}

pub const fn param(name: &'static str, ty: ParamType, default: &'static str, help: &'static str) -> ParamSpec {
    ParamSpec { name, ty, default, help }
}

/// Canonical parameters of one stage: sorted, typed, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, Value>);

impl Params {
    pub fn canonical_json(&self) -> String {
        // BTreeMap serialises in key order; nested objects are canonicalised on insert.
        serde_json::to_string(&self.0).expect("params serialise")
    }
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.0.get(key).ok_or_else(|| anyhow::anyhow!("parameter `{key}` is not declared"))
    }
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)?.as_f64().ok_or_else(|| anyhow::anyhow!("parameter `{key}` is not a number"))
    }
    pub fn i64(&self, key: &str) -> Result<i64> {
        self.get(key)?.as_i64().ok_or_else(|| anyhow::anyhow!("parameter `{key}` is not an integer"))
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.i64(key)?;
        usize::try_from(v).map_err(|_| anyhow::anyhow!("parameter `{key}` must be ≥ 0, got {v}"))
    }
    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.i64(key)?;
        u64::try_from(v).map_err(|_| anyhow::anyhow!("parameter `{key}` must be ≥ 0, got {v}"))
    }
    pub fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?.as_bool().ok_or_else(|| anyhow::anyhow!("parameter `{key}` is not a boolean"))
    }
    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key)?.as_str().ok_or_else(|| anyhow::anyhow!("parameter `{key}` is not a string"))
    }
    pub fn f64_list(&self, key: &str) -> Result<Vec<f64>> {
        match self.get(key)? {
            Value::Array(a) => a.iter().map(|v| v.as_f64().ok_or_else(|| anyhow::anyhow!("`{key}` holds a non-number"))).collect(),
            _ => bail!("parameter `{key}` is not a list"),
        }
    }
    pub fn str_list(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key)? {
            Value::Array(a) => a.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("`{key}` holds a non-string"))).collect(),
            _ => bail!("parameter `{key}` is not a list"),
        }
    }
}

/// Convert YAML to JSON with object keys sorted, so equal values hash equally.
pub fn yaml_to_canonical_json(v: &serde_yaml::Value) -> Result<Value> {
    Ok(match v {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                float_value(f)?
            }
        }
        serde_yaml::Value::String(s) => Value::String(s.clone()),
        serde_yaml::Value::Sequence(seq) => Value::Array(seq.iter().map(yaml_to_canonical_json).collect::<Result<_>>()?),
        serde_yaml::Value::Mapping(m) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                let key = match k {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)?.trim().to_owned(),
                };
                out.insert(key, yaml_to_canonical_json(v)?);
            }
            Value::Object(out.into_iter().collect())
        }
        serde_yaml::Value::Tagged(t) => yaml_to_canonical_json(&t.value)?,
    })
}

fn float_value(f: f64) -> Result<Value> {
    serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| anyhow::anyhow!("{f} is not a finite number"))
}

fn type_name(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::Null => "null".into(),
        serde_yaml::Value::Bool(b) => format!("boolean {b}"),
        serde_yaml::Value::Number(n) => format!("number {n}"),
        serde_yaml::Value::String(s) => format!("string {s:?}"),
        serde_yaml::Value::Sequence(_) => "a list".into(),
        serde_yaml::Value::Mapping(_) => "a mapping".into(),
        serde_yaml::Value::Tagged(_) => "a tagged value".into(),
    }
}

/// Check `value` against `ty` and return its canonical JSON form.
pub fn coerce(ty: ParamType, value: &serde_yaml::Value) -> Result<Value> {
    use serde_yaml::Value as Y;
    let got = type_name(value);
    Ok(match (ty, value) {
        (ParamType::Float, Y::Number(n)) => float_value(n.as_f64().unwrap_or(f64::NAN))?,
        (ParamType::Float, _) => bail!("expected a number, got {got}"),
        (ParamType::Int, Y::Number(n)) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => bail!("expected an integer, got {got}"),
        },
        (ParamType::Int, _) => bail!("expected an integer, got {got}"),
        (ParamType::Bool, Y::Bool(b)) => Value::Bool(*b),
        (ParamType::Bool, _) => bail!("expected true or false, got {got}"),
        (ParamType::Str, Y::String(s)) => Value::String(s.clone()),
        (ParamType::Str, _) => bail!("expected a string, got {got}"),
        (ParamType::Choice(options), Y::String(s)) => {
            if !options.contains(&s.as_str()) {
                bail!("expected one of {options:?}, got {s:?}");
            }
            Value::String(s.clone())
        }
        (ParamType::Choice(options), _) => bail!("expected one of {options:?}, got {got}"),
        (ParamType::FloatList, Y::Sequence(seq)) => Value::Array(
            seq.iter()
                .map(|v| match v {
                    Y::Number(n) => float_value(n.as_f64().unwrap_or(f64::NAN)),
                    other => bail!("expected a list of numbers, found {}", type_name(other)),
                })
                .collect::<Result<_>>()?,
        ),
        (ParamType::FloatList, _) => bail!("expected a list of numbers, got {got}"),
        (ParamType::StrList, Y::Sequence(seq)) => Value::Array(
            seq.iter()
                .map(|v| match v {
                    Y::String(s) => Ok(Value::String(s.clone())),
                    other => bail!("expected a list of strings, found {}", type_name(other)),
                })
                .collect::<Result<_>>()?,
        ),
        (ParamType::StrList, _) => bail!("expected a list of strings, got {got}"),
        (ParamType::Any, v) => yaml_to_canonical_json(v)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn y(s: &str) -> serde_yaml::Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn float_spellings_are_canonical() {
        assert_eq!(coerce(ParamType::Float, &y("3e-4")).unwrap(), coerce(ParamType::Float, &y("0.0003")).unwrap());
        assert_eq!(coerce(ParamType::Float, &y("1")).unwrap(), coerce(ParamType::Float, &y("1.0")).unwrap());
    }

    #[test]
    fn wrong_types_are_rejected() {
        assert!(coerce(ParamType::Int, &y("2.5")).is_err());
        assert!(coerce(ParamType::Float, &y("fast")).is_err());
        assert!(coerce(ParamType::Choice(&["adam", "sgd"]), &y("adamw")).is_err());
    }

    #[test]
    fn mapping_order_does_not_matter() {
        let a = coerce(ParamType::Any, &y("{b: 1, a: {d: 2, c: 3}}")).unwrap();
        let b = coerce(ParamType::Any, &y("{a: {c: 3, d: 2}, b: 1}")).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    }
}
