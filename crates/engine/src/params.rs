//! Typed stage parameters and their canonical form.
//!
//! Each stage declares its parameters once, as a struct written with
//! [`params!`]: the struct is what the stage reads, and its `SPECS` (name,
//! kind, default, meaning) are what pipeline.yaml is checked against and what
//! `liverseg params --markdown` documents. Values from pipeline.yaml, a
//! profile or `-P key=value` are checked against their kind and normalised,
//! so `3e-4` and `0.0003`, or `1` and `1.0` for a float, hash alike.

use anyhow::{bail, Result};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamKind {
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

impl ParamKind {
    /// As the docs write it: `float`, `int`, ..., or the choices.
    pub fn describe(self) -> String {
        match self {
            ParamKind::Choice(c) => c.join(" | "),
            other => format!("{other:?}").to_lowercase(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// The key in pipeline.yaml (`lr`, or `data.root` for dataset keys).
    pub name: &'static str,
    pub kind: ParamKind,
    /// Default as YAML text, parsed once when the pipeline loads.
    pub default: &'static str,
    pub help: &'static str,
}

impl ParamSpec {
    /// The same spec with another default (one struct serving two stages).
    pub fn with_default(&self, default: &'static str) -> ParamSpec {
        ParamSpec { default, ..self.clone() }
    }
}

/// Declare a stage's parameters: a struct the stage reads, and its `SPECS`.
///
/// ```ignore
/// params! {
///     pub struct SplitParams {
///         fractions: Vec<f64> = floats "[0.70, 0.16, 0.14]", "train, validation, test shares of patients";
///         seed: u64 = int "42", "split seed";
///     }
/// }
/// ```
/// Each field: `name [as "key"]: Type = kind "default (YAML)", "meaning";`
/// where kind is one of float, int, bool, str, choice (the type's `NAMES`),
/// floats, strs, any. The calling crate needs serde.
#[macro_export]
macro_rules! params {
    ($(#[$m:meta])* $vis:vis struct $name:ident {
        $( $(#[$fm:meta])* $field:ident $(as $key:literal)? : $ty:ty = $kind:ident $default:literal, $help:literal; )*
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        $vis struct $name {
            $( $(#[$fm])* $(#[serde(rename = $key)])? pub $field: $ty, )*
        }

        impl $name {
            /// Every key, in declaration order: what pipeline.yaml is checked against.
            pub const SPECS: &'static [$crate::params::ParamSpec] = &[
                $( $crate::params::ParamSpec {
                    name: $crate::params!(@key $field $($key)?),
                    kind: $crate::params!(@kind $kind $ty),
                    default: $default,
                    help: $help,
                }, )*
            ];
        }
    };
    (@key $field:ident $key:literal) => { $key };
    (@key $field:ident) => { stringify!($field) };
    (@kind float $ty:ty) => { $crate::params::ParamKind::Float };
    (@kind int $ty:ty) => { $crate::params::ParamKind::Int };
    (@kind bool $ty:ty) => { $crate::params::ParamKind::Bool };
    (@kind str $ty:ty) => { $crate::params::ParamKind::Str };
    (@kind choice $ty:ty) => { $crate::params::ParamKind::Choice(<$ty>::NAMES) };
    (@kind floats $ty:ty) => { $crate::params::ParamKind::FloatList };
    (@kind strs $ty:ty) => { $crate::params::ParamKind::StrList };
    (@kind any $ty:ty) => { $crate::params::ParamKind::Any };
}

/// Canonical parameters of one stage: sorted, typed, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, Value>);

impl Params {
    /// The typed struct of a stage (its `params!` struct), parsed from the
    /// canonical values.
    pub fn typed<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let map: serde_json::Map<String, Value> = self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        serde_json::from_value(Value::Object(map)).map_err(|e| anyhow::anyhow!("parameters do not fit their declaration: {e}"))
    }

    pub fn canonical_json(&self) -> String {
        // BTreeMap serialises in key order; nested objects are canonicalised on insert.
        serde_json::to_string(&self.0).expect("params serialise")
    }
    /// These params less `names`: what a stage's key and manifest hold.
    pub fn keyed(&self, unkeyed: &[&str]) -> Params {
        Params(self.0.iter().filter(|(k, _)| !unkeyed.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.0.get(key).ok_or_else(|| anyhow::anyhow!("parameter `{key}` is not declared"))
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

/// Check `value` against `kind` and return its canonical JSON form.
pub fn coerce(kind: ParamKind, value: &serde_yaml::Value) -> Result<Value> {
    use serde_yaml::Value as Y;
    let got = type_name(value);
    Ok(match (kind, value) {
        (ParamKind::Float, Y::Number(n)) => float_value(n.as_f64().unwrap_or(f64::NAN))?,
        (ParamKind::Float, _) => bail!("expected a number, got {got}"),
        (ParamKind::Int, Y::Number(n)) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => bail!("expected an integer, got {got}"),
        },
        (ParamKind::Int, _) => bail!("expected an integer, got {got}"),
        (ParamKind::Bool, Y::Bool(b)) => Value::Bool(*b),
        (ParamKind::Bool, _) => bail!("expected true or false, got {got}"),
        (ParamKind::Str, Y::String(s)) => Value::String(s.clone()),
        (ParamKind::Str, _) => bail!("expected a string, got {got}"),
        (ParamKind::Choice(options), Y::String(s)) => {
            if !options.contains(&s.as_str()) {
                bail!("expected one of {options:?}, got {s:?}");
            }
            Value::String(s.clone())
        }
        (ParamKind::Choice(options), _) => bail!("expected one of {options:?}, got {got}"),
        (ParamKind::FloatList, Y::Sequence(seq)) => Value::Array(
            seq.iter()
                .map(|v| match v {
                    Y::Number(n) => float_value(n.as_f64().unwrap_or(f64::NAN)),
                    other => bail!("expected a list of numbers, found {}", type_name(other)),
                })
                .collect::<Result<_>>()?,
        ),
        (ParamKind::FloatList, _) => bail!("expected a list of numbers, got {got}"),
        (ParamKind::StrList, Y::Sequence(seq)) => Value::Array(
            seq.iter()
                .map(|v| match v {
                    Y::String(s) => Ok(Value::String(s.clone())),
                    other => bail!("expected a list of strings, found {}", type_name(other)),
                })
                .collect::<Result<_>>()?,
        ),
        (ParamKind::StrList, _) => bail!("expected a list of strings, got {got}"),
        (ParamKind::Any, v) => yaml_to_canonical_json(v)?,
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
        assert_eq!(coerce(ParamKind::Float, &y("3e-4")).unwrap(), coerce(ParamKind::Float, &y("0.0003")).unwrap());
        assert_eq!(coerce(ParamKind::Float, &y("1")).unwrap(), coerce(ParamKind::Float, &y("1.0")).unwrap());
    }

    #[test]
    fn wrong_types_are_rejected() {
        assert!(coerce(ParamKind::Int, &y("2.5")).is_err());
        assert!(coerce(ParamKind::Float, &y("fast")).is_err());
        assert!(coerce(ParamKind::Choice(&["adam", "sgd"]), &y("adamw")).is_err());
    }

    #[test]
    fn mapping_order_does_not_matter() {
        let a = coerce(ParamKind::Any, &y("{b: 1, a: {d: 2, c: 3}}")).unwrap();
        let b = coerce(ParamKind::Any, &y("{a: {c: 3, d: 2}, b: 1}")).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    }
}
