//! Name patterns of issuing rules: literal text, `*` for any run of characters, and the
//! placeholders `{cn}` (the client certificate's common name) and `{user}` (the Basic user).
//!
//! `*` never matches an asterisk in the value: `*.plant.local` allows any host below
//! `plant.local`, never the wildcard name `*.plant.local` itself. A literal asterisk is
//! written `{*}`: `{*}.plant.local` allows exactly the wildcard certificate name.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Star,
    Cn,
    User,
}

/// How a pattern writes a literal asterisk (a wildcard name's `*`).
pub const LITERAL_STAR: &str = "{*}";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
    source: String,
}

/// The values placeholders stand for, for one identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Vars<'a> {
    pub cn: Option<&'a str>,
    pub user: Option<&'a str>,
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Pattern, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(c) = rest.chars().next() {
            let placeholder = [("{cn}", Part::Cn), ("{user}", Part::User)]
                .into_iter()
                .find(|(p, _)| rest.starts_with(p));
            if let Some(after) = rest.strip_prefix(LITERAL_STAR) {
                literal.push('*');
                rest = after;
            } else if let Some((text, part)) = placeholder {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(part);
                rest = &rest[text.len()..];
            } else if c == '*' {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                if parts.last() != Some(&Part::Star) {
                    parts.push(Part::Star);
                }
                rest = &rest[1..];
            } else if c == '{' || c == '}' {
                return Err(format!(
                    "pattern {source:?}: unknown placeholder (use {{cn}}, {{user}} or {{*}} for a literal asterisk)"
                ));
            } else {
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Pattern {
            parts,
            source: source.to_owned(),
        })
    }

    /// Whether `value` matches, placeholders standing for `vars`; a placeholder whose value
    /// the identity lacks never matches. `fold_case` compares ASCII case-insensitively
    /// (DNS names).
    pub fn matches(&self, value: &str, vars: Vars<'_>, fold_case: bool) -> bool {
        // Substitute first; substituted text is literal even if it contains '*'.
        let mut tokens: Vec<Token> = Vec::new();
        for part in &self.parts {
            let literal = match part {
                Part::Star => {
                    tokens.push(Token::Star);
                    continue;
                }
                Part::Literal(s) => s.as_str(),
                Part::Cn => match vars.cn {
                    Some(cn) => cn,
                    None => return false,
                },
                Part::User => match vars.user {
                    Some(user) => user,
                    None => return false,
                },
            };
            tokens.extend(literal.chars().map(Token::Char));
        }
        let value: Vec<char> = value.chars().collect();
        glob(&tokens, &value, fold_case)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[derive(Clone, Copy)]
enum Token {
    Char(char),
    Star,
}

/// Wildcard matching with backtracking to the most recent star only: O(pattern × value) at
/// worst, never exponential. A star never takes an asterisk of the value: only a literal
/// `{*}` matches one (so a star cannot grant a wildcard name).
fn glob(tokens: &[Token], value: &[char], fold_case: bool) -> bool {
    let same = |a: char, b: char| {
        if fold_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut t, mut v) = (0, 0);
    let mut resume: Option<(usize, usize)> = None;
    while v < value.len() {
        match tokens.get(t) {
            Some(Token::Char(c)) if same(*c, value[v]) => {
                t += 1;
                v += 1;
            }
            Some(Token::Star) => {
                resume = Some((t, v));
                t += 1;
            }
            _ => match resume {
                // The star cannot grow over an asterisk, and no earlier star could either.
                Some((_, at)) if value[at] == '*' => return false,
                Some((star, at)) => {
                    t = star + 1;
                    v = at + 1;
                    resume = Some((star, at + 1));
                }
                None => return false,
            },
        }
    }
    tokens[t.min(tokens.len())..]
        .iter()
        .all(|tok| matches!(tok, Token::Star))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, v: &str) -> bool {
        Pattern::parse(p).unwrap().matches(
            v,
            Vars {
                cn: Some("dev1"),
                user: Some("estuser"),
            },
            false,
        )
    }

    #[test]
    fn literals_stars_and_placeholders() {
        assert!(m("dev1", "dev1"));
        assert!(!m("dev1", "dev10"));
        assert!(m("*", "anything"));
        assert!(m("*", ""));
        assert!(m("{cn}", "dev1"));
        assert!(!m("{cn}", "dev2"));
        assert!(m("aziot-edge CA {cn}", "aziot-edge CA dev1"));
        assert!(!m("aziot-edge CA {cn}", "aziot-edge CA dev1x"));
        assert!(m("{cn}.plant.local", "dev1.plant.local"));
        assert!(m("*.plant.local", "a.b.plant.local"));
        assert!(!m("*.plant.local", "plant.local"));
        assert!(m("plant-*-gw", "plant-7-gw"));
        assert!(!m("plant-*-gw", "plant-7-gw2"));
        assert!(m("a*b*c", "aXbYc"));
        assert!(!m("a*b*c", "aXcYb"));
        assert!(m("{user}-*", "estuser-3"));
    }

    #[test]
    fn missing_placeholder_values_never_match() {
        let p = Pattern::parse("{cn}").unwrap();
        assert!(!p.matches("", Vars::default(), false));
        let p = Pattern::parse("x-{user}").unwrap();
        assert!(!p.matches(
            "x-",
            Vars {
                cn: Some("a"),
                user: None
            },
            false
        ));
    }

    #[test]
    fn substituted_text_is_literal() {
        let p = Pattern::parse("{cn}").unwrap();
        assert!(!p.matches(
            "anything",
            Vars {
                cn: Some("*"),
                user: None
            },
            false
        ));
        assert!(p.matches(
            "*",
            Vars {
                cn: Some("*"),
                user: None
            },
            false
        ));
    }

    #[test]
    fn case_folding_for_dns() {
        let p = Pattern::parse("*.Plant.local").unwrap();
        assert!(p.matches("GW.plant.LOCAL", Vars::default(), true));
        assert!(!p.matches("GW.plant.LOCAL", Vars::default(), false));
    }

    #[test]
    fn a_star_never_grants_a_literal_asterisk() {
        // The pattern meant "any host below plant.local", not the wildcard name itself.
        assert!(m("*.plant.local", "gw1.plant.local"));
        assert!(!m("*.plant.local", "*.plant.local"));
        assert!(!m("*", "*"));
        assert!(!m("*", "a*b"));
        assert!(!m("plant-*", "plant-*"));
        // A literal asterisk is written {*}.
        assert!(m("{*}.plant.local", "*.plant.local"));
        assert!(!m("{*}.plant.local", "gw1.plant.local"));
        assert!(m("*{*}*", "a*b"));
        assert!(!m("*{*}", "**"));
        assert_eq!(
            Pattern::parse("{*}.x").unwrap().to_string(),
            "{*}.x",
            "shown as written"
        );
    }

    /// The matcher against a plain recursive one, over every pattern and value of a small
    /// alphabet: stars that cannot take an asterisk must not make backtracking unsound.
    #[test]
    fn glob_agrees_with_a_reference_matcher() {
        fn reference(tokens: &[Token], value: &[char]) -> bool {
            match tokens.split_first() {
                None => value.is_empty(),
                Some((Token::Char(c), rest)) => {
                    value.first() == Some(c) && reference(rest, &value[1..])
                }
                Some((Token::Star, rest)) => (0..=value.len())
                    .take_while(|&n| n == 0 || value[n - 1] != '*')
                    .any(|n| reference(rest, &value[n..])),
            }
        }
        fn all(alphabet: &[char], max: usize) -> Vec<Vec<char>> {
            let mut out = vec![vec![]];
            let mut last = vec![vec![]];
            for _ in 0..max {
                let next: Vec<Vec<char>> = last
                    .iter()
                    .flat_map(|s: &Vec<char>| {
                        alphabet.iter().map(move |c| {
                            let mut s = s.clone();
                            s.push(*c);
                            s
                        })
                    })
                    .collect();
                out.extend(next.iter().cloned());
                last = next;
            }
            out
        }
        let patterns = all(&['a', '*', 's'], 5);
        let values = all(&['a', 'b', '*'], 5);
        for p in &patterns {
            let tokens: Vec<Token> = p
                .iter()
                .map(|c| {
                    if *c == 's' {
                        Token::Star
                    } else {
                        Token::Char(*c)
                    }
                })
                .collect();
            for v in &values {
                assert_eq!(
                    glob(&tokens, v, false),
                    reference(&tokens, v),
                    "pattern {p:?} value {v:?}"
                );
            }
        }
    }

    #[test]
    fn bad_placeholders_are_refused() {
        assert!(Pattern::parse("{device}").is_err());
        assert!(Pattern::parse("x}").is_err());
    }
}
