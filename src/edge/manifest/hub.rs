//! `$edgeHub`: schema, routes, store and forward.

use super::*;

impl Checker {
    pub(super) fn edge_hub(&mut self, hub: &Map<String, Value>, path: &str) {
        let schema = match hub.get("schemaVersion").and_then(Value::as_str) {
            Some(v @ ("1.0" | "1.1" | "1.2")) => v,
            Some(v) => {
                self.err(
                    format!("{path}.schemaVersion"),
                    format!("{v:?} is not an edgeHub schema version (1.0, 1.1, 1.2)"),
                );
                "1.2"
            }
            None => {
                if !self.layered {
                    self.err(format!("{path}.schemaVersion"), "missing (\"1.2\")");
                }
                "1.2"
            }
        };
        match hub.get("routes") {
            Some(Value::Object(routes)) => {
                for (name, route) in routes {
                    let field = format!("{path}.routes.{name}");
                    let text = match route {
                        Value::String(text) => Some(text.as_str()),
                        Value::Object(spec) => {
                            if schema == "1.0" {
                                self.err(
                                    &field,
                                    "route objects (priority, timeToLiveSecs) need $edgeHub schemaVersion 1.1 or later",
                                );
                            }
                            if let Some(p) = spec.get("priority") {
                                if p.as_u64().is_none_or(|p| p > 9) {
                                    self.err(format!("{field}.priority"), "must be 0 to 9");
                                }
                            }
                            if let Some(t) = spec.get("timeToLiveSecs") {
                                if t.as_u64().is_none_or(|t| t > u64::from(u32::MAX)) {
                                    self.err(
                                        format!("{field}.timeToLiveSecs"),
                                        "must be an unsigned integer",
                                    );
                                }
                            }
                            let text = spec.get("route").and_then(Value::as_str);
                            if text.is_none() {
                                self.err(format!("{field}.route"), "missing");
                            }
                            text
                        }
                        _ => {
                            self.err(&field, "must be a route string or a route object");
                            None
                        }
                    };
                    if let Some(text) = text {
                        if !is_route(text) {
                            self.err(
                                &field,
                                format!("{text:?} is not \"FROM <source> [WHERE …] INTO <sink>\""),
                            );
                        }
                    }
                }
            }
            Some(_) => self.err(format!("{path}.routes"), "must be an object"),
            None if self.layered => {}
            None => self.err(format!("{path}.routes"), "missing"),
        }
        if let Some(store) = hub.get("storeAndForwardConfiguration") {
            if store
                .get("timeToLiveSecs")
                .is_some_and(|t| t.as_u64().is_none_or(|t| t > u64::from(u32::MAX)))
            {
                self.err(
                    format!("{path}.storeAndForwardConfiguration.timeToLiveSecs"),
                    "must be an unsigned integer",
                );
            }
        }
        self.twin(&Value::Object(hub.clone()), path);
    }
}

fn is_route(text: &str) -> bool {
    let upper = text.trim().to_ascii_uppercase();
    upper.starts_with("FROM ") && upper.contains(" INTO ")
}
