//! IoT Hub's twin limits on every desired section.

use super::*;

impl Checker {
    pub(super) fn twin(&mut self, desired: &Value, path: &str) {
        let size = serde_json::to_string(desired).map(|t| t.len()).unwrap_or(0);
        if size > TWIN_MAX_DESIRED {
            self.err(
                path,
                format!("{size} bytes; IoT Hub takes at most {TWIN_MAX_DESIRED} bytes of desired properties per twin"),
            );
        }
        let mut deep = false;
        self.twin_value(desired, path, 0, &mut deep);
    }

    pub(super) fn twin_value(&mut self, value: &Value, path: &str, depth: usize, deep: &mut bool) {
        match value {
            Value::Object(map) => {
                if depth > TWIN_MAX_DEPTH && !*deep {
                    *deep = true;
                    self.err(
                        path,
                        format!("nested deeper than IoT Hub's {TWIN_MAX_DEPTH} levels"),
                    );
                }
                for (key, child) in map {
                    let field = format!("{path}.{key}");
                    if let Err(e) = check_twin_key(key) {
                        self.err(&field, e);
                    }
                    self.twin_value(child, &field, depth + 1, deep);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.twin_value(item, &format!("{path}[{i}]"), depth + 1, deep);
                }
            }
            Value::String(text) if text.len() > TWIN_MAX_STRING => self.err(
                path,
                format!(
                    "a string of {} bytes; IoT Hub takes at most {TWIN_MAX_STRING} per value",
                    text.len()
                ),
            ),
            Value::Number(n)
                if n.as_i64().is_some_and(|n| n.unsigned_abs() > 1 << 52)
                    || n.as_u64().is_some_and(|n| n > 1 << 52) =>
            {
                self.err(path, "integers in a twin lie within ±2^52");
            }
            _ => {}
        }
    }
}

/// IoT Hub's rules for keys of twin documents.
pub(super) fn check_twin_key(key: &str) -> Result<(), String> {
    if key.len() > TWIN_MAX_KEY {
        return Err(format!(
            "a key of {} bytes; twin keys are at most 1 KB",
            key.len()
        ));
    }
    if key.is_empty() {
        return Err("an empty key".to_owned());
    }
    if let Some(c) = key
        .chars()
        .find(|c| matches!(c, '.' | '$' | ' ') || c.is_control())
    {
        return Err(format!(
            "the key {key:?} holds {c:?}; twin keys may not contain '.', '$', spaces or control characters"
        ));
    }
    Ok(())
}
