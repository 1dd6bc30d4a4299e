//! The decoder against the published contract. A small validator for exactly the JSON Schema
//! keywords `jobs/schema/` uses is the oracle: one test walks every keyword of every schema file
//! and, from the examples, builds payloads that break just that keyword (and payloads at its
//! edge that keep it); property tests drive the decoder with generated payloads. A keyword the
//! validator does not know fails the tests, so a schema cannot grow a rule the decoder lacks.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use regex::Regex;
use serde_json::{Value, json};

use super::*;

const KINDS: [&str; 2] = ["vision.annotate", "llm.complete"];

/// Keywords that describe and never refuse.
const ANNOTATIONS: [&str; 6] = [
    "$schema",
    "$id",
    "title",
    "description",
    "default",
    // In 2020-12 an annotation: the decoder does not check that content is base64, the API does.
    "contentEncoding",
];

fn example(kind: &str) -> Value {
    serde_json::from_str(match kind {
        "vision.annotate" => include_str!("../../../jobs/examples/vision.annotate.json"),
        "llm.complete" => include_str!("../../../jobs/examples/llm.complete.json"),
        _ => unreachable!("{kind}"),
    })
    .unwrap()
}

struct Schemas {
    files: BTreeMap<&'static str, Value>,
    patterns: RefCell<HashMap<String, Regex>>,
}

impl Schemas {
    fn load() -> Self {
        let files = [
            (
                "common.json",
                include_str!("../../../jobs/schema/common.json"),
            ),
            (
                "vision.annotate.json",
                include_str!("../../../jobs/schema/vision.annotate.json"),
            ),
            (
                "llm.complete.json",
                include_str!("../../../jobs/schema/llm.complete.json"),
            ),
        ]
        .into_iter()
        .map(|(name, text)| (name, serde_json::from_str(text).unwrap()))
        .collect();
        Schemas {
            files,
            patterns: RefCell::default(),
        }
    }

    fn file(&self, name: &str) -> &Value {
        self.files
            .get(name)
            .unwrap_or_else(|| panic!("no schema file {name}"))
    }

    fn kind_file(kind: &str) -> String {
        format!("{kind}.json")
    }

    fn valid_kind(&self, kind: &str, v: &Value) -> bool {
        self.valid(self.file(&Self::kind_file(kind)), v)
    }

    fn valid(&self, schema: &Value, v: &Value) -> bool {
        let s = schema.as_object().expect("a schema is an object");
        s.iter().all(|(k, kv)| self.keyword(k, kv, v))
    }

    fn keyword(&self, k: &str, kv: &Value, v: &Value) -> bool {
        let n = || kv.as_u64().expect("a count") as usize;
        let limit = || kv.as_f64().expect("a number");
        match k {
            k if ANNOTATIONS.contains(&k) => true,
            "type" => has_type(kv.as_str().expect("one type"), v),
            "enum" => kv.as_array().unwrap().iter().any(|e| same(e, v)),
            "const" => same(kv, v),
            "minLength" => v.as_str().is_none_or(|s| s.chars().count() >= n()),
            "maxLength" => v.as_str().is_none_or(|s| s.chars().count() <= n()),
            "pattern" => v.as_str().is_none_or(|s| {
                let mut cache = self.patterns.borrow_mut();
                let pattern = kv.as_str().unwrap();
                cache
                    .entry(pattern.to_owned())
                    .or_insert_with(|| Regex::new(pattern).expect("the pattern compiles"))
                    .is_match(s)
            }),
            "format" => match kv.as_str() {
                Some("uuid") => v.as_str().is_none_or(is_uuid_text),
                other => panic!("format {other:?} is not known to the tests (nor the decoder)"),
            },
            "minimum" => v.as_f64().is_none_or(|x| x >= limit()),
            "maximum" => v.as_f64().is_none_or(|x| x <= limit()),
            "minItems" => v.as_array().is_none_or(|a| a.len() >= n()),
            "maxItems" => v.as_array().is_none_or(|a| a.len() <= n()),
            "items" => v
                .as_array()
                .is_none_or(|a| a.iter().all(|i| self.valid(kv, i))),
            "contains" => v
                .as_array()
                .is_none_or(|a| a.iter().any(|i| self.valid(kv, i))),
            "required" => v.as_object().is_none_or(|o| {
                kv.as_array()
                    .unwrap()
                    .iter()
                    .all(|f| o.contains_key(f.as_str().unwrap()))
            }),
            "properties" => v.as_object().is_none_or(|o| {
                kv.as_object()
                    .unwrap()
                    .iter()
                    .all(|(name, sub)| o.get(name).is_none_or(|x| self.valid(sub, x)))
            }),
            "oneOf" => {
                kv.as_array()
                    .unwrap()
                    .iter()
                    .filter(|sub| self.valid(sub, v))
                    .count()
                    == 1
            }
            "allOf" => kv.as_array().unwrap().iter().all(|sub| self.valid(sub, v)),
            "$ref" => self.valid(self.file(kv.as_str().unwrap()), v),
            other => panic!(
                "the schemas use {other:?}, which neither these tests nor (probably) the decoder \
                 know: teach both"
            ),
        }
    }
}

fn has_type(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_number().is_some_and(|n| {
            n.is_u64() || n.is_i64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }),
        other => panic!("type {other:?}"),
    }
}

/// JSON Schema's equality: numbers by value (1 and 1.0 are equal), the rest structurally.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, p)| y.get(k).is_some_and(|q| same(p, q)))
        }
        _ => a == b,
    }
}

/// RFC 9562's text form, written independently of the decoder's.
fn is_uuid_text(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// One step from a value to a child.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// The decoder's spelling of a location: `messages[2].content`.
fn field_of(at: &[Step]) -> String {
    let mut s = String::new();
    for step in at {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn get<'v>(v: &'v Value, at: &[Step]) -> Option<&'v Value> {
    at.iter().try_fold(v, |v, step| match step {
        Step::Key(k) => v.get(k),
        Step::Index(i) => v.get(i),
    })
}

fn get_mut<'v>(v: &'v mut Value, at: &[Step]) -> &'v mut Value {
    at.iter().fold(v, |v, step| match step {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

/// What a refusal must name: exactly a field, or (inside a `oneOf` branch, where the decoder may
/// blame the image as a whole) the field or something inside it.
#[derive(Debug)]
enum Expect {
    Field(String),
    Within(String),
}

impl Expect {
    fn allows(&self, field: &str) -> bool {
        match self {
            Expect::Field(f) => field == f,
            Expect::Within(f) => {
                field == f
                    || field.starts_with(&format!("{f}."))
                    || field.starts_with(&format!("{f}["))
            }
        }
    }
}

struct Case {
    what: String,
    payload: Value,
    /// None: a payload at the keyword's edge, which the schema may well accept.
    broken: Option<Expect>,
}

/// Builds the cases for one kind by walking its schema over its example.
struct Walk<'s> {
    schemas: &'s Schemas,
    root: Value,
    cases: Vec<Case>,
    /// Keyword locations (`file#/pointer`) that produced a case or were descended into.
    covered: BTreeSet<String>,
}

impl Walk<'_> {
    fn with(&self, at: &[Step], edit: impl FnOnce(&mut Value)) -> Value {
        let mut p = self.root.clone();
        edit(get_mut(&mut p, at));
        p
    }

    fn push(&mut self, loc: &str, what: String, payload: Value, broken: Option<Expect>) {
        self.covered.insert(loc.to_owned());
        self.cases.push(Case {
            what,
            payload,
            broken,
        });
    }

    fn walk(&mut self, file: &str, ptr: &str, schema: &Value, at: &[Step], within: Option<&str>) {
        let Some(here) = get(&self.root, at).cloned() else {
            return;
        };
        let field = field_of(at);
        let expect = |f: String| match within {
            Some(w) => Expect::Within(w.to_owned()),
            None => Expect::Field(f),
        };
        for (k, kv) in schema.as_object().unwrap() {
            if ANNOTATIONS.contains(&k.as_str()) {
                continue;
            }
            let loc = format!("{file}#{ptr}/{k}");
            let what = |s: String| format!("{loc} at {field:?}: {s}");
            let n = kv.as_u64().unwrap_or(0) as usize;
            match k.as_str() {
                "type" => {
                    let samples = [
                        Value::Null,
                        json!(true),
                        json!(1.5),
                        json!(7),
                        json!("s"),
                        json!([]),
                        json!({}),
                    ];
                    for s in samples
                        .into_iter()
                        .filter(|s| !has_type(kv.as_str().unwrap(), s))
                    {
                        let p = self.with(at, |v| *v = s.clone());
                        self.push(&loc, what(format!("{s}")), p, Some(expect(field.clone())));
                    }
                }
                "enum" => {
                    let allowed = kv.as_array().unwrap();
                    let first = allowed[0].as_str().expect("string enums");
                    let flipped: String = first
                        .chars()
                        .map(|c| {
                            if c.is_uppercase() {
                                c.to_ascii_lowercase()
                            } else {
                                c.to_ascii_uppercase()
                            }
                        })
                        .collect();
                    for bad in [json!("NOT_IN_THE_ENUM"), json!(flipped), json!(7)] {
                        let p = self.with(at, |v| *v = bad.clone());
                        self.push(&loc, what(format!("{bad}")), p, Some(expect(field.clone())));
                    }
                    for good in allowed {
                        let p = self.with(at, |v| *v = good.clone());
                        self.push(&loc, what(format!("{good}")), p, None);
                    }
                }
                "const" => {
                    let bad = match kv {
                        Value::Number(n) => json!(n.as_f64().unwrap() + 1.0),
                        Value::String(s) => json!(format!("{s}x")),
                        other => panic!("const {other}"),
                    };
                    for bad in [bad, json!(kv.to_string())] {
                        let p = self.with(at, |v| *v = bad.clone());
                        self.push(&loc, what(format!("{bad}")), p, Some(expect(field.clone())));
                    }
                    // The same value in another spelling (1.0 for 1) is the same constant.
                    let good = kv.as_f64().map_or(kv.clone(), |f| json!(f));
                    let p = self.with(at, |v| *v = good);
                    self.push(&loc, what("the constant".into()), p, None);
                }
                "minLength" if n > 0 => {
                    let p = self.with(at, |v| *v = "a".repeat(n - 1).into());
                    self.push(
                        &loc,
                        what(format!("{} chars", n - 1)),
                        p,
                        Some(expect(field.clone())),
                    );
                    let p = self.with(at, |v| *v = "a".repeat(n).into());
                    self.push(&loc, what(format!("{n} chars")), p, None);
                }
                "maxLength" => {
                    let p = self.with(at, |v| *v = "a".repeat(n + 1).into());
                    self.push(
                        &loc,
                        what(format!("{} chars", n + 1)),
                        p,
                        Some(expect(field.clone())),
                    );
                    // Two bytes a character: the cap counts characters, as JSON Schema does.
                    let p = self.with(at, |v| *v = "é".repeat(n).into());
                    self.push(&loc, what(format!("{n} two-byte chars")), p, None);
                }
                "pattern" => {
                    let s = here.as_str().expect("a pattern's example is a string");
                    let mid = s
                        .char_indices()
                        .nth(s.chars().count() / 2)
                        .map_or(0, |(i, _)| i);
                    let probes = [
                        '\u{0}', '\u{1}', '\u{8}', '\t', '\n', '\u{b}', '\u{c}', '\r', '\u{1b}',
                        '\u{1f}', '\u{7f}', '\u{80}', '\u{9f}', '\u{2028}', 'é',
                    ];
                    let re = Regex::new(kv.as_str().unwrap()).unwrap();
                    for c in probes {
                        let probed = format!("{}{c}{}", &s[..mid], &s[mid..]);
                        let broken = (!re.is_match(&probed)).then(|| expect(field.clone()));
                        let p = self.with(at, |v| *v = probed.into());
                        self.push(&loc, what(format!("U+{:04X} inside", c as u32)), p, broken);
                    }
                }
                "format" => {
                    assert_eq!(kv, "uuid", "{loc}");
                    let s = here.as_str().unwrap();
                    let bad = [
                        "not-a-uuid".to_owned(),
                        s.replace('-', ""),
                        format!("{{{s}}}"),
                        format!("urn:uuid:{s}"),
                        format!("{}g", &s[..35]),
                        format!(" {s}"),
                    ];
                    for b in bad {
                        let p = self.with(at, |v| *v = b.clone().into());
                        self.push(&loc, what(b), p, Some(expect(field.clone())));
                    }
                    let p = self.with(at, |v| *v = s.to_uppercase().into());
                    self.push(&loc, what("upper case".into()), p, None);
                }
                "minimum" | "maximum" => {
                    let m = kv.as_f64().unwrap();
                    let beyond = if k == "minimum" { m - 1.0 } else { m + 1.0 };
                    let p = self.with(at, |v| *v = json!(beyond as i64));
                    self.push(
                        &loc,
                        what(format!("{beyond}")),
                        p,
                        Some(expect(field.clone())),
                    );
                    for edge in [json!(m as i64), json!(m)] {
                        let p = self.with(at, |v| *v = edge.clone());
                        self.push(&loc, what(format!("{edge}")), p, None);
                    }
                }
                "minItems" | "maxItems" => {
                    let items = here.as_array().unwrap().clone();
                    assert!(!items.is_empty(), "{loc}: the example has items to cycle");
                    let resized =
                        |len: usize| -> Value { items.iter().cycle().take(len).cloned().collect() };
                    let (bad, edge) = if k == "minItems" {
                        (n.checked_sub(1), n)
                    } else {
                        (Some(n + 1), n)
                    };
                    if let Some(bad) = bad {
                        let p = self.with(at, |v| *v = resized(bad));
                        self.push(
                            &loc,
                            what(format!("{bad} items")),
                            p,
                            Some(expect(field.clone())),
                        );
                    }
                    let p = self.with(at, |v| *v = resized(edge));
                    self.push(&loc, what(format!("{edge} items")), p, None);
                }
                "contains" => {
                    let kept: Vec<Value> = here
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|i| !self.schemas.valid(kv, i))
                        .cloned()
                        .collect();
                    let p = self.with(at, |v| *v = kept.into());
                    self.push(
                        &loc,
                        what("no item matching".into()),
                        p,
                        Some(expect(field.clone())),
                    );
                }
                "required" => {
                    for name in kv.as_array().unwrap() {
                        let name = name.as_str().unwrap();
                        let p = self.with(at, |v| {
                            v.as_object_mut().unwrap().remove(name);
                        });
                        let mut inner = at.to_vec();
                        inner.push(Step::Key(name.to_owned()));
                        self.push(
                            &loc,
                            what(format!("without {name}")),
                            p,
                            Some(expect(field_of(&inner))),
                        );
                    }
                }
                "properties" => {
                    // Unknown fields are allowed (no additionalProperties): the contract is additive.
                    let p = self.with(at, |v| {
                        v["x_added_later"] = json!({ "nested": [1, "two", null] });
                    });
                    self.push(&loc, what("an unknown field".into()), p, None);
                    for (name, sub) in kv.as_object().unwrap() {
                        let mut inner = at.to_vec();
                        inner.push(Step::Key(name.clone()));
                        self.walk(
                            file,
                            &format!("{ptr}/properties/{name}"),
                            sub,
                            &inner,
                            within,
                        );
                    }
                }
                "items" => {
                    self.covered.insert(loc);
                    for i in 0..here.as_array().unwrap().len() {
                        let mut inner = at.to_vec();
                        inner.push(Step::Index(i));
                        self.walk(file, &format!("{ptr}/items"), kv, &inner, within);
                    }
                }
                "oneOf" => {
                    let branches = kv.as_array().unwrap();
                    // Matching none, and (from two items of the example that match different
                    // branches) matching two.
                    let mut bad = vec![json!({})];
                    if let Some((Step::Index(_), parent)) = at.split_last() {
                        let siblings = get(&self.root, parent).unwrap().as_array().unwrap();
                        let matching =
                            |b: &Value| siblings.iter().find(|s| self.schemas.valid(b, s));
                        if let (Some(Value::Object(a)), Some(Value::Object(b))) =
                            (matching(&branches[0]), matching(&branches[1]))
                        {
                            bad.push(Value::Object(
                                a.clone().into_iter().chain(b.clone()).collect(),
                            ));
                        }
                    }
                    for b in bad {
                        let p = self.with(at, |v| *v = b.clone());
                        self.push(&loc, what(format!("{b}")), p, Some(expect(field.clone())));
                    }
                    for (i, branch) in branches.iter().enumerate() {
                        if self.schemas.valid(branch, &here) {
                            let w = within.map_or(field.clone(), str::to_owned);
                            self.walk(file, &format!("{ptr}/oneOf/{i}"), branch, at, Some(&w));
                        }
                    }
                }
                "allOf" => {
                    self.covered.insert(loc);
                    for (i, sub) in kv.as_array().unwrap().iter().enumerate() {
                        self.walk(file, &format!("{ptr}/allOf/{i}"), sub, at, within);
                    }
                }
                "$ref" => {
                    self.covered.insert(loc);
                    let name = kv.as_str().unwrap();
                    let target = self.schemas.file(name).clone();
                    self.walk(name, "", &target, at, within);
                }
                // A keyword the walk cannot break is one the decoder was never shown to enforce.
                other => panic!("{loc}: the walk does not know how to break {other:?}"),
            }
        }
    }
}

/// Every keyword location of a schema file, the way the walk names them.
fn keyword_locations(file: &str, schema: &Value, ptr: &str, out: &mut BTreeSet<String>) {
    for (k, kv) in schema.as_object().unwrap() {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        out.insert(format!("{file}#{ptr}/{k}"));
        match k.as_str() {
            "properties" => {
                for (name, sub) in kv.as_object().unwrap() {
                    keyword_locations(file, sub, &format!("{ptr}/properties/{name}"), out);
                }
            }
            "items" => keyword_locations(file, kv, &format!("{ptr}/items"), out),
            "oneOf" | "allOf" => {
                for (i, sub) in kv.as_array().unwrap().iter().enumerate() {
                    keyword_locations(file, sub, &format!("{ptr}/{k}/{i}"), out);
                }
            }
            // `contains` is broken as a whole; its inner keywords are the oracle's to read.
            _ => {}
        }
    }
}

fn raw_for(kind: &str, payload: String) -> RawJob {
    let ex = example(kind);
    RawJob {
        id: "j".into(),
        kind: kind.into(),
        tier: ex["tier"].as_str().unwrap().into(),
        organization_id: ex["organization_id"].as_str().unwrap().into(),
        payload,
        token: 1,
        attempt: 1,
        max_attempts: 1,
        enqueued_at_ms: 0,
        interrupts: 0,
        prior: Default::default(),
    }
}

#[test]
fn every_keyword_of_every_schema_is_enforced_by_the_decoder() {
    let schemas = Schemas::load();
    let prices = PriceCatalog::builtin();
    let mut covered = BTreeSet::new();
    let mut counts = (0, 0);
    for kind in KINDS {
        let root = example(kind);
        assert!(
            schemas.valid_kind(kind, &root),
            "the {kind} example keeps its schema"
        );
        let file = Schemas::kind_file(kind);
        let mut walk = Walk {
            schemas: &schemas,
            root,
            cases: Vec::new(),
            covered: BTreeSet::new(),
        };
        walk.walk(&file, "", &schemas.file(&file).clone(), &[], None);
        for case in walk.cases {
            let schema_ok = schemas.valid_kind(kind, &case.payload);
            let got = decode(&raw_for(kind, case.payload.to_string()), &prices);
            match (&case.broken, &got) {
                (Some(expect), Err(e)) => {
                    assert!(!schema_ok, "{}: the walk broke nothing", case.what);
                    assert_eq!(e.rule, Rule::Schema, "{}: {e}", case.what);
                    assert!(
                        expect.allows(&e.field),
                        "{}: {e} should name {expect:?}",
                        case.what
                    );
                    counts.0 += 1;
                }
                (Some(_), Ok(_)) => {
                    panic!("{}: the decoder accepts what the schema refuses", case.what)
                }
                // At an edge: the decoder refuses under the schema exactly when the schema does;
                // the catalog and the queue may refuse what the schema allows (a model name of
                // 100 a's is no model).
                (None, got) => {
                    let schema_refused = matches!(got, Err(e) if e.rule == Rule::Schema);
                    assert_eq!(
                        schema_refused, !schema_ok,
                        "{}: decoder {got:?}, schema accepts: {schema_ok}",
                        case.what
                    );
                    counts.1 += 1;
                }
            }
        }
        covered.extend(walk.covered);
    }
    let mut all = BTreeSet::new();
    for (name, schema) in &schemas.files {
        keyword_locations(name, schema, "", &mut all);
    }
    let missed: Vec<_> = all.difference(&covered).collect();
    assert!(
        missed.is_empty(),
        "keywords no case exercised (the examples must show every field): {missed:?}"
    );
    assert!(counts.0 > 100 && counts.1 > 50, "{counts:?}");
}

/// A refusal names a field of the payload (its parent exists; the field too, unless it is the
/// one missing) or is about the payload as a whole, and carries no control character.
fn check_refusal(text: &str, v: Option<&Value>, e: &DecodeError) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(
        !msg.bytes().any(|b| b < 0x20 || b == 0x7f),
        "control character in {msg:?}"
    );
    let Some(v) = v else {
        prop_assert!(
            e.field.is_empty() && e.reason.starts_with("the payload is not JSON"),
            "{msg}"
        );
        return Ok(());
    };
    if e.field.is_empty() {
        prop_assert!(!v.is_object(), "{msg} for an object: {text}");
        prop_assert!(
            e.reason.starts_with("the payload must be a JSON object"),
            "{msg}"
        );
        return Ok(());
    }
    let prefix = format!("invalid payload: {}: ", e.field);
    prop_assert!(msg.starts_with(&prefix), "{msg}");
    let steps = parse_field(&e.field);
    if e.reason == "missing field" {
        let (Some(Step::Key(name)), parent) = (steps.last(), &steps[..steps.len() - 1]) else {
            return Err(TestCaseError::fail(format!("{msg}: a missing index")));
        };
        let parent = get(v, parent).and_then(Value::as_object);
        prop_assert!(
            parent.is_some_and(|o| !o.contains_key(name)),
            "{msg}: {text}"
        );
    } else {
        prop_assert!(get(v, &steps).is_some(), "{msg} names no field of {text}");
    }
    Ok(())
}

fn parse_field(field: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for part in field.split('.') {
        let mut pieces = part.split('[');
        steps.push(Step::Key(pieces.next().unwrap().to_owned()));
        for index in pieces {
            steps.push(Step::Index(index.trim_end_matches(']').parse().unwrap()));
        }
    }
    steps
}

thread_local! {
    static SCHEMAS: Schemas = Schemas::load();
    static PRICES: PriceCatalog = PriceCatalog::builtin();
}

/// Decodes `text` as a job of `kind` and holds the outcome to the schema and the naming rule.
fn check(kind: &str, text: String) -> Result<(), TestCaseError> {
    let got = PRICES.with(|p| decode(&raw_for(kind, text.clone()), p));
    let value: Option<Value> = serde_json::from_str(&text).ok();
    if let Some(v) = &value {
        let schema_ok = SCHEMAS.with(|s| s.valid_kind(kind, v));
        let schema_refused = matches!(&got, Err(e) if e.rule == Rule::Schema);
        prop_assert_eq!(schema_refused, !schema_ok, "{:?} for {}", got, text);
    }
    if let Err(e) = &got {
        check_refusal(&text, value.as_ref(), e)?;
    }
    Ok(())
}

/// Field names of the schemas and values that matter to them, so generated payloads reach past
/// the first check.
fn words() -> Vec<Value> {
    let mut out: Vec<Value> = [
        "organization_id",
        "tier",
        "version",
        "provider",
        "model",
        "messages",
        "role",
        "content",
        "max_tokens",
        "fallback",
        "images",
        "features",
        "type",
        "maxResults",
        "uri",
        "idempotency_key",
        "correlation_id",
        "subject_id",
        "subject_type",
        "user",
        "system",
        "openai",
        "anthropic",
        "gemini",
        "gpt-4o-mini",
        "claude-haiku-4-5",
        "gemini-2.5-pro",
        "LABEL_DETECTION",
        "growth_team",
        "enterprise",
        "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d",
        "0B6F1B3E-2A55-4A6E-9A43-2F6F6F1B2C3D",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-0",
        "0x10",
        "",
        " ",
        "\u{0}",
        "a\u{1}b",
        "\t",
        "\n",
        "\u{7f}",
        "\u{2028}",
        "gs://b/o",
    ]
    .into_iter()
    .map(Value::from)
    .collect();
    out.extend([
        json!(0),
        json!(-1),
        json!(1),
        json!(1.0),
        json!(1.5),
        json!(64.0),
        json!(1e300),
        json!(-1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(16_384),
        json!(16_385),
        json!(200_000),
        json!(200_001),
        json!(2_147_483_647_u64),
        json!(2_147_483_648_u64),
    ]);
    out
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(words()).prop_map(|w| match w {
            Value::String(s) => s,
            other => other.to_string(),
        }),
        prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        // Around the caps: 50, 100, 200 and 2048 characters.
        (
            prop::sample::select(vec![
                49usize, 50, 51, 99, 100, 101, 199, 200, 201, 2048, 2049
            ]),
            any::<char>()
        )
            .prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(words()),
        string().prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec((string(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One change to a payload, at the `at`-th of its locations (wrapping).
#[derive(Debug, Clone)]
enum Mutation {
    Remove(usize),
    Replace(usize, Value),
    InsertChar(usize, char, usize),
    Nest(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        2 => at.prop_map(Mutation::Remove),
        3 => (at, arbitrary_json()).prop_map(|(a, v)| Mutation::Replace(a, v)),
        3 => (at, prop::sample::select(words())).prop_map(|(a, v)| Mutation::Replace(a, v)),
        2 => (at, prop::sample::select(vec!['\u{0}', '\u{1}', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{2028}', 'é']), any::<usize>())
            .prop_map(|(a, c, i)| Mutation::InsertChar(a, c, i)),
        // Past 127 levels serde_json stops reading: the payload is then not JSON.
        1 => (at, 1usize..160).prop_map(|(a, d)| Mutation::Nest(a, d)),
    ]
}

fn locations(v: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(Step::Key(k.clone()));
                locations(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(Step::Index(i));
                locations(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn apply(v: &mut Value, m: &Mutation) {
    let mut all = Vec::new();
    locations(v, &mut Vec::new(), &mut all);
    let pick = |i: usize| all[i % all.len()].clone();
    match m {
        Mutation::Remove(i) => {
            let at = pick(*i);
            if let Some((last, parent)) = at.split_last() {
                match (get_mut(v, parent), last) {
                    (Value::Object(o), Step::Key(k)) => {
                        o.remove(k);
                    }
                    (Value::Array(a), Step::Index(i)) => {
                        a.remove(*i);
                    }
                    _ => unreachable!("a location's parent holds it"),
                }
            }
        }
        Mutation::Replace(i, new) => *get_mut(v, &pick(*i)) = new.clone(),
        Mutation::InsertChar(i, c, pos) => {
            if let Value::String(s) = get_mut(v, &pick(*i)) {
                let at = s
                    .char_indices()
                    .map(|(b, _)| b)
                    .nth(pos % (s.chars().count() + 1));
                s.insert(at.unwrap_or(s.len()), *c);
            }
        }
        Mutation::Nest(i, depth) => {
            let target = get_mut(v, &pick(*i));
            for _ in 0..*depth {
                *target = Value::Array(vec![target.take()]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6_000))]

    /// Examples with one to four changes: fields removed, replaced by other types, edge numbers,
    /// NaN-like strings, control characters, deep nesting.
    #[test]
    fn decoding_mutated_examples_never_panics_and_agrees_with_the_schemas(
        kind in prop::sample::select(KINDS.to_vec()),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let mut v = example(kind);
        for m in &mutations {
            apply(&mut v, m);
        }
        check(kind, v.to_string())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    /// Any JSON value at all, and objects of arbitrary values under the schemas' field names.
    #[test]
    fn decoding_arbitrary_json_never_panics_and_agrees_with_the_schemas(
        kind in prop::sample::select(KINDS.to_vec()),
        v in prop_oneof![
            arbitrary_json(),
            prop::collection::vec((prop::sample::select(words()), arbitrary_json()), 0..10)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.as_str().map_or(k.to_string(), str::to_owned), v)).collect())),
        ],
    ) {
        check(kind, v.to_string())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The example's text cut, or with a token spliced in (NaN, a raw control byte, a stray
    /// bracket): mostly not JSON at all, refused as a whole.
    #[test]
    fn decoding_mangled_text_never_panics(
        kind in prop::sample::select(KINDS.to_vec()),
        at in any::<usize>(),
        cut in any::<bool>(),
        token in prop::sample::select(vec![
            "NaN", "Infinity", "-", "1e999", "\u{0}", "\\u0000", "\"", "{", "]", ",", ":", "null",
            "\\", "\u{7f}", "\\ud800", "0.0e", "[[[[[[[[",
        ]),
    ) {
        let text = example(kind).to_string();
        let mut at = at % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mangled = if cut {
            text[..at].to_owned()
        } else {
            format!("{}{token}{}", &text[..at], &text[at..])
        };
        check(kind, mangled)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    /// `callback_url` set to generated text near the pattern's edges (schemes in other cases,
    /// spaces and controls, lengths around 2,048): the decoder agrees with the schema.
    #[test]
    fn a_generated_callback_url_is_refused_exactly_when_the_schema_refuses_it(
        scheme in prop::sample::select(vec!["https://", "http://", "HTTPS://", "ftp://", "https:/", "", "http://"]),
        rest in prop_oneof![
            "[ -~\u{80}-\u{10FFFF}]{0,40}",
            "[a-z.]{1,10}[\t\n\r \u{7f}\u{0}\u{1f}][a-z]{0,5}",
            (2030usize..2060).prop_map(|n| "a".repeat(n)),
        ],
    ) {
        let mut v = example("llm.complete");
        v["callback_url"] = format!("{scheme}{rest}").into();
        check("llm.complete", v.to_string())?;
    }
}
