//! Reading deploy/compose.yaml the way `docker compose` does, without Docker: the `.env`
//! file, `${VAR}` interpolation (with `:-`, `-`, `:?`, `?`, `:+`, `+` and `$$`), `<<` merge
//! keys, and each service's command, environment, volumes and replicas; plus the runtime
//! stage of deploy/Dockerfile (working directory, environment, entry point).

use std::collections::BTreeMap;

use serde_norway::Value;

/// Variables of a `.env` file, in file order.
pub type Vars = BTreeMap<String, String>;

/// Parses a compose `.env` file: `KEY=VALUE` lines, `#` comments, `export ` prefixes;
/// single-quoted values literal, double-quoted values with `\n`, `\"` and `\\` escapes,
/// unquoted values trimmed and cut at ` #`.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!(".env line {}: no '=': {raw}", n + 1))?;
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(format!(".env line {}: bad variable name {key:?}", n + 1));
        }
        let value = value.trim_start();
        let value = if let Some(rest) = value.strip_prefix('\'') {
            rest.split_once('\'')
                .ok_or_else(|| format!(".env line {}: unterminated ' quote", n + 1))?
                .0
                .to_owned()
        } else if let Some(rest) = value.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = rest.chars();
            loop {
                match chars.next() {
                    None => return Err(format!(".env line {}: unterminated \" quote", n + 1)),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => v.push('\n'),
                        Some(c) => v.push(c),
                        None => return Err(format!(".env line {}: dangling \\", n + 1)),
                    },
                    Some(c) => v.push(c),
                }
            }
            v
        } else {
            value
                .split_once(" #")
                .map_or(value, |(v, _)| v)
                .trim()
                .to_owned()
        };
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

/// Interpolates `text` as compose does. An unset variable without a default is an error
/// here (compose substitutes an empty string with a warning, which is never what the file
/// means); `${VAR:?message}` fails with `message`.
pub fn interpolate(text: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // The matching brace (defaults may hold ${...} of their own).
                let mut depth = 1;
                let mut j = i + 2;
                while j < chars.len() && depth > 0 {
                    match chars[j] {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                if depth > 0 {
                    return Err(format!("unterminated ${{ in {text:?}"));
                }
                let inner: String = chars[i + 2..j - 1].iter().collect();
                out.push_str(&braced(&inner, vars)?);
                i = j;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                out.push_str(
                    vars.get(&name)
                        .ok_or_else(|| format!("variable {name} is not set"))?,
                );
                i = j;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

/// One `${...}` body: `NAME`, `NAME:-default`, `NAME-default`, `NAME:?err`, `NAME?err`,
/// `NAME:+alt`, `NAME+alt`.
fn braced(inner: &str, vars: &Vars) -> Result<String, String> {
    let end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let (name, rest) = inner.split_at(end);
    if name.is_empty() {
        return Err(format!("bad substitution ${{{inner}}}"));
    }
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let op = |o: &str| rest.strip_prefix(o);
    if rest.is_empty() {
        return value
            .cloned()
            .ok_or_else(|| format!("variable {name} is not set"));
    }
    if let Some(default) = op(":-") {
        return if set_nonempty {
            Ok(value.unwrap().clone())
        } else {
            interpolate(default, vars)
        };
    }
    if let Some(message) = op(":?") {
        return if set_nonempty {
            Ok(value.unwrap().clone())
        } else {
            Err(format!(
                "required variable {name} is missing a value: {message}"
            ))
        };
    }
    if let Some(alt) = op(":+") {
        return if set_nonempty {
            interpolate(alt, vars)
        } else {
            Ok(String::new())
        };
    }
    if let Some(default) = op("-") {
        return match value {
            Some(v) => Ok(v.clone()),
            None => interpolate(default, vars),
        };
    }
    if let Some(message) = op("?") {
        return value
            .cloned()
            .ok_or_else(|| format!("required variable {name} is missing a value: {message}"));
    }
    if let Some(alt) = op("+") {
        return if value.is_some() {
            interpolate(alt, vars)
        } else {
            Ok(String::new())
        };
    }
    Err(format!("bad substitution ${{{inner}}}"))
}

/// Interpolates every string scalar of `value` (mapping values and sequence items; keys
/// are left alone, as compose does).
pub fn interpolate_yaml(value: &mut Value, vars: &Vars) -> Result<(), String> {
    match value {
        Value::String(s) => *s = interpolate(s, vars)?,
        Value::Sequence(items) => {
            for item in items {
                interpolate_yaml(item, vars)?;
            }
        }
        Value::Mapping(map) => {
            for (_, v) in map.iter_mut() {
                interpolate_yaml(v, vars)?;
            }
        }
        Value::Tagged(tagged) => interpolate_yaml(&mut tagged.value, vars)?,
        _ => {}
    }
    Ok(())
}

/// A compose file, interpolated and merged.
pub struct ComposeFile {
    pub root: Value,
}

/// One service as compose would run it.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub image: Option<String>,
    /// `command` (arguments to the image's entry point).
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    /// (source, target): a named volume, a host path or `./relative` to the compose file.
    pub volumes: Vec<(String, String)>,
    pub replicas: usize,
    /// `restart: "no"` (a one-shot job).
    pub one_shot: bool,
    /// Services this one waits for, with the condition.
    pub depends_on: Vec<(String, String)>,
    pub extra_hosts: Vec<String>,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl ComposeFile {
    /// Parses `text`, resolves `<<` merge keys (x- anchors) and interpolates with `vars`.
    pub fn parse(text: &str, vars: &Vars) -> Result<Self, String> {
        let mut root: Value =
            serde_norway::from_str(text).map_err(|e| format!("compose.yaml: {e}"))?;
        root.apply_merge()
            .map_err(|e| format!("compose.yaml merge keys: {e}"))?;
        interpolate_yaml(&mut root, vars)?;
        Ok(Self { root })
    }

    /// The services, in file order.
    pub fn services(&self) -> Result<Vec<Service>, String> {
        let services = self
            .root
            .get("services")
            .and_then(Value::as_mapping)
            .ok_or("compose.yaml has no services")?;
        let mut out = Vec::new();
        for (name, s) in services {
            let name = scalar(name).ok_or("a service name is not a string")?;
            let command = match s.get("command") {
                None => Vec::new(),
                Some(Value::Sequence(items)) => items
                    .iter()
                    .map(|i| scalar(i).ok_or_else(|| format!("{name}: command item {i:?}")))
                    .collect::<Result<_, _>>()?,
                Some(Value::String(line)) => line.split_whitespace().map(String::from).collect(),
                Some(other) => return Err(format!("{name}: command {other:?}")),
            };
            let environment = match s.get("environment") {
                None => Vec::new(),
                Some(Value::Mapping(map)) => map
                    .iter()
                    .map(|(k, v)| {
                        let k = scalar(k).ok_or_else(|| format!("{name}: environment key"))?;
                        let v = scalar(v).ok_or_else(|| {
                            format!("{name}: environment {k} has no value (from the shell)")
                        })?;
                        Ok((k, v))
                    })
                    .collect::<Result<_, String>>()?,
                Some(Value::Sequence(items)) => items
                    .iter()
                    .map(|i| {
                        let line = scalar(i).ok_or_else(|| format!("{name}: environment item"))?;
                        let (k, v) = line
                            .split_once('=')
                            .ok_or_else(|| format!("{name}: environment {line} has no '='"))?;
                        Ok((k.to_owned(), v.to_owned()))
                    })
                    .collect::<Result<_, String>>()?,
                Some(other) => return Err(format!("{name}: environment {other:?}")),
            };
            let volumes = match s.get("volumes") {
                None => Vec::new(),
                Some(Value::Sequence(items)) => items
                    .iter()
                    .map(|i| {
                        let spec = scalar(i)
                            .ok_or_else(|| format!("{name}: only short volume syntax is read"))?;
                        let mut parts = spec.splitn(3, ':');
                        let source = parts.next().unwrap_or_default().to_owned();
                        let target = parts
                            .next()
                            .ok_or_else(|| format!("{name}: volume {spec} has no target"))?
                            .to_owned();
                        Ok((source, target))
                    })
                    .collect::<Result<_, String>>()?,
                Some(other) => return Err(format!("{name}: volumes {other:?}")),
            };
            let replicas = match s.get("deploy").and_then(|d| d.get("replicas")) {
                None => 1,
                Some(v) => scalar(v)
                    .and_then(|r| r.parse().ok())
                    .ok_or_else(|| format!("{name}: deploy.replicas {v:?} is not a number"))?,
            };
            let one_shot = s.get("restart").and_then(scalar).as_deref() == Some("no");
            let depends_on = match s.get("depends_on") {
                None => Vec::new(),
                Some(Value::Sequence(items)) => items
                    .iter()
                    .filter_map(scalar)
                    .map(|d| (d, "service_started".to_owned()))
                    .collect(),
                Some(Value::Mapping(map)) => map
                    .iter()
                    .map(|(k, v)| {
                        (
                            scalar(k).unwrap_or_default(),
                            v.get("condition")
                                .and_then(scalar)
                                .unwrap_or_else(|| "service_started".into()),
                        )
                    })
                    .collect(),
                Some(other) => return Err(format!("{name}: depends_on {other:?}")),
            };
            let extra_hosts = s
                .get("extra_hosts")
                .and_then(Value::as_sequence)
                .map(|items| items.iter().filter_map(scalar).collect())
                .unwrap_or_default();
            out.push(Service {
                image: s.get("image").and_then(scalar),
                name,
                command,
                environment,
                volumes,
                replicas,
                one_shot,
                depends_on,
                extra_hosts,
            });
        }
        Ok(out)
    }
}

/// The runtime (last) stage of a Dockerfile: `WORKDIR`, `ENV` and `ENTRYPOINT`.
#[derive(Debug, Default)]
pub struct Image {
    pub workdir: String,
    pub env: Vec<(String, String)>,
    pub entrypoint: Vec<String>,
}

/// Reads the last stage of `dockerfile`.
pub fn runtime_image(dockerfile: &str) -> Image {
    // Logical lines: a trailing backslash continues the instruction.
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in dockerfile.lines() {
        let t = raw.trim();
        if t.starts_with('#') && current.is_empty() {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(t);
            lines.push(std::mem::take(&mut current));
        }
    }
    let last_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    let mut image = Image::default();
    for line in &lines[last_from..] {
        if let Some(dir) = line.strip_prefix("WORKDIR ") {
            image.workdir = dir.trim().to_owned();
        } else if let Some(env) = line.strip_prefix("ENV ") {
            for word in env.split_whitespace() {
                let (k, v) = word.split_once('=').expect("ENV KEY=VALUE");
                image.env.push((k.to_owned(), v.to_owned()));
            }
        } else if let Some(ep) = line.strip_prefix("ENTRYPOINT ") {
            image.entrypoint = serde_json::from_str(ep.trim()).expect("ENTRYPOINT [...] (JSON)");
        }
    }
    image
}
