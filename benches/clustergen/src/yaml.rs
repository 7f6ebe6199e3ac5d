//! A YAML printer for JSON values in kubectl's `-o yaml` style: block style, sorted keys, sequences
//! flush with their key, and strings double-quoted only where plain text would read as another type.

use serde_json::{Map, Value};

/// Appends `map` as block YAML at `indent`; the first key continues the current line when `inline`
/// (a `- ` sequence item).
pub(crate) fn map(m: &Map<String, Value>, indent: usize, inline: bool, out: &mut String) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !inline {
            pad(indent, out);
        }
        scalar_str(k, out);
        match v {
            Value::Object(o) if !o.is_empty() => {
                out.push_str(":\n");
                map(o, indent + 2, false, out);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push_str(":\n");
                seq(a, indent, out);
            }
            _ => {
                out.push_str(": ");
                scalar(v, out);
                out.push('\n');
            }
        }
    }
}

/// Appends `a` as a block sequence whose dashes sit at `indent`.
fn seq(a: &[Value], indent: usize, out: &mut String) {
    for v in a {
        pad(indent, out);
        out.push_str("- ");
        match v {
            Value::Object(o) if !o.is_empty() => map(o, indent + 2, true, out),
            _ => {
                scalar(v, out);
                out.push('\n');
            }
        }
    }
}

/// Appends `n` spaces.
fn pad(n: usize, out: &mut String) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// Appends a scalar, or an empty collection in flow style (`{}`, `[]`).
fn scalar(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => scalar_str(s, out),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
    }
}

/// Appends a string, plain when that reads back as the same string, else double-quoted.
fn scalar_str(s: &str, out: &mut String) {
    if plain_is_safe(s) {
        out.push_str(s);
    } else {
        // A JSON string literal is a valid YAML double-quoted scalar.
        out.push_str(&Value::String(s.to_string()).to_string());
    }
}

/// Whether `s` printed plain would be read back (by YAML 1.1 or 1.2 readers) as this string.
fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if "-?:,[]{}#&*!|>'\"%@` ".contains(first)
        || s.ends_with(' ')
        || s.contains(": ")
        || s.contains(" #")
    {
        return false;
    }
    if s.ends_with(':') || s.chars().any(|c| c.is_control() || c == '\t') {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    let special = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", ".inf", ".nan", "-.inf",
    ];
    if special.contains(&lower.as_str()) {
        return false;
    }
    // Numbers (including sexagesimal 1:20 and 0x/0o forms) and timestamps read as other types.
    let digits_and = |extra: &str| s.chars().all(|c| c.is_ascii_digit() || extra.contains(c));
    let sexagesimal = s.contains(':') && digits_and(":._+-");
    let numberish = s.parse::<f64>().is_ok() || digits_and("_+-") || sexagesimal;
    let radix = (lower.starts_with("0x") || lower.starts_with("0o") || lower.starts_with("0b"))
        && s.len() > 2;
    let timestamp = s.len() >= 10
        && s.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && s.as_bytes()[4] == b'-';
    !(numberish || radix || timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quotes_only_what_would_change_type() {
        let v = json!({
            "a": "None", "b": "1001", "c": "2026-01-01T00:00:00Z", "d": "10.96.0.1",
            "e": "fd00:10:96::5", "f": "true", "g": "", "h": "svc-1.ns-1.svc.cluster.local",
        });
        let mut out = String::new();
        map(v.as_object().unwrap(), 0, false, &mut out);
        assert_eq!(
            out,
            "a: None\nb: \"1001\"\nc: \"2026-01-01T00:00:00Z\"\nd: 10.96.0.1\ne: fd00:10:96::5\nf: \"true\"\ng: \"\"\nh: svc-1.ns-1.svc.cluster.local\n"
        );
    }

    #[test]
    fn nested_values_read_back_unchanged() {
        let v = json!({
            "items": [{ "k": 1, "m": { "x": [ "a", "10" ], "e": {}, "l": [] } }, { "z": false }],
            "s": { "t": null, "labels": { "kubernetes.io/service-name": "svc-3" } },
        });
        let mut out = String::new();
        map(v.as_object().unwrap(), 0, false, &mut out);
        let back: Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(back, v);
        assert!(out.contains("items:\n- k: 1\n  m:\n"), "{out}");
    }
}
