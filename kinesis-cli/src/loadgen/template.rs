//! Record templates: text with `{{field}}` placeholders, filled with random values per record.
//!
//! | placeholder | value |
//! |---|---|
//! | `{{uuid}}` | a random UUID v4, the same for every `{{uuid}}` of one record and its partition key |
//! | `{{firstname}}`, `{{lastname}}` | a first name, a last name |
//! | `{{name}}` | `firstname lastname` |
//! | `{{sentence}}` | a sentence of 6 to 12 words, capitalised, ending with a full stop |
//! | `{{int}}` | an integer in 0..=1000; `{{int:MIN:MAX}}` in MIN..=MAX |
//! | `{{float}}` | a number in 0..100 with two decimals; `{{float:MIN:MAX}}` in MIN..MAX |
//! | `{{seq}}` | the record's number within its producer, from 0 |
//! | `{{producer}}` | the producer's number, from 1 |
//! | `{{timestamp}}` | milliseconds since the Unix epoch |
//!
//! The default template is the record of the published 32-producer benchmark:
//! `{"id":"{{uuid}}","firstname":"{{firstname}}","lastname":"{{lastname}}","description":"{{sentence}}","balance":0}`
//! with the UUID as the partition key.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// The record of the published benchmark (about 150 bytes).
pub const DEFAULT_TEMPLATE: &str = r#"{"id":"{{uuid}}","firstname":"{{firstname}}","lastname":"{{lastname}}","description":"{{sentence}}","balance":0}"#;

/// The default partition key: the record's UUID.
pub const DEFAULT_PARTITION_KEY: &str = "{{uuid}}";

/// A template that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{{` without a closing `}}`.
    #[error("unclosed placeholder at byte {0}: expected `}}}}`")]
    Unclosed(usize),
    /// A placeholder name that is not one of the known fields.
    #[error(
        "unknown placeholder {{{{{0}}}}}: expected uuid, firstname, lastname, name, sentence, int, int:MIN:MAX, float, float:MIN:MAX, seq, producer or timestamp"
    )]
    Unknown(String),
    /// A range whose bounds do not parse or are reversed.
    #[error("bad range in {{{{{0}}}}}: expected {{{{int:MIN:MAX}}}} with MIN <= MAX")]
    BadRange(String),
    /// The partition key template can produce an empty key.
    #[error("the partition key template is empty")]
    EmptyKey,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Uuid,
    FirstName,
    LastName,
    Name,
    Sentence,
    Int(i64, i64),
    Float(f64, f64),
    Seq,
    Producer,
    Timestamp,
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`.
    ///
    /// # Errors
    /// [`TemplateError`] for an unclosed or unknown placeholder, or a bad range.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or(TemplateError::Unclosed(offset + open))?;
            parts.push(placeholder(after[..close].trim())?);
            offset += open + 2 + close + 2;
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// Whether the template holds no placeholder and no text.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(t) if t.is_empty()))
    }

    /// Appends the template filled for one record to `out`.
    pub fn render(&self, values: &Values, out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Uuid => out.push_str(&values.uuid),
                Part::FirstName => out.push_str(values.first_name),
                Part::LastName => out.push_str(values.last_name),
                Part::Name => {
                    out.push_str(values.first_name);
                    out.push(' ');
                    out.push_str(values.last_name);
                }
                Part::Sentence => sentence(out),
                Part::Int(min, max) => {
                    let _ = write!(out, "{}", fastrand::i64(*min..=*max));
                }
                Part::Float(min, max) => {
                    let _ = write!(out, "{:.2}", min + fastrand::f64() * (max - min));
                }
                Part::Seq => {
                    let _ = write!(out, "{}", values.seq);
                }
                Part::Producer => {
                    let _ = write!(out, "{}", values.producer);
                }
                Part::Timestamp => {
                    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                    let _ = write!(out, "{millis}");
                }
            }
        }
    }
}

/// The values one record shares between its data and its partition key.
#[derive(Debug)]
pub struct Values {
    uuid: String,
    first_name: &'static str,
    last_name: &'static str,
    seq: u64,
    producer: usize,
}

impl Values {
    /// Fresh random values for record `seq` of producer `producer`.
    pub fn new(producer: usize, seq: u64) -> Self {
        let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
        Self {
            uuid: uuid.hyphenated().to_string(),
            first_name: FIRST_NAMES[fastrand::usize(..FIRST_NAMES.len())],
            last_name: LAST_NAMES[fastrand::usize(..LAST_NAMES.len())],
            seq,
            producer,
        }
    }
}

fn placeholder(name: &str) -> Result<Part, TemplateError> {
    let mut fields = name.split(':');
    let head = fields.next().unwrap_or_default();
    let args: Vec<&str> = fields.collect();
    let bad = || TemplateError::BadRange(name.to_owned());
    Ok(match (head, args.as_slice()) {
        ("uuid", []) => Part::Uuid,
        ("firstname", []) => Part::FirstName,
        ("lastname", []) => Part::LastName,
        ("name", []) => Part::Name,
        ("sentence", []) => Part::Sentence,
        ("seq", []) => Part::Seq,
        ("producer", []) => Part::Producer,
        ("timestamp", []) => Part::Timestamp,
        ("int", []) => Part::Int(0, 1000),
        ("int", [min, max]) => {
            let (min, max) = (min.parse().map_err(|_| bad())?, max.parse().map_err(|_| bad())?);
            if min > max {
                return Err(bad());
            }
            Part::Int(min, max)
        }
        ("float", []) => Part::Float(0.0, 100.0),
        ("float", [min, max]) => {
            let (min, max): (f64, f64) = (min.parse().map_err(|_| bad())?, max.parse().map_err(|_| bad())?);
            if !min.is_finite() || !max.is_finite() || min > max {
                return Err(bad());
            }
            Part::Float(min, max)
        }
        ("int" | "float", _) => return Err(bad()),
        _ => return Err(TemplateError::Unknown(name.to_owned())),
    })
}

fn sentence(out: &mut String) {
    let words = 6 + fastrand::usize(..7);
    for i in 0..words {
        let word = WORDS[fastrand::usize(..WORDS.len())];
        if i == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push(' ');
            out.push_str(word);
        }
    }
    out.push('.');
}

const FIRST_NAMES: &[&str] = &[
    "Ada", "Alan", "Amara", "Ana", "Arjun", "Beatriz", "Bo", "Carlos", "Chen", "Chloe", "Dmitri", "Elena", "Emeka",
    "Farah", "Finn", "Grace", "Hana", "Hugo", "Ines", "Ivan", "Jamal", "Jia", "Jonas", "Kai", "Kenji", "Lars", "Leila",
    "Lucia", "Mateo", "Maya", "Mei", "Nadia", "Niko", "Noor", "Olga", "Omar", "Priya", "Quinn", "Rafael", "Rosa",
    "Sam", "Sofia", "Tariq", "Tess", "Uma", "Viktor", "Wen", "Yara", "Yusuf", "Zoe",
];

const LAST_NAMES: &[&str] = &[
    "Abara",
    "Andersen",
    "Bauer",
    "Costa",
    "Dubois",
    "Eriksson",
    "Fernandes",
    "Garcia",
    "Haddad",
    "Ivanova",
    "Jensen",
    "Kim",
    "Kowalski",
    "Larsen",
    "Lopez",
    "Mensah",
    "Moreau",
    "Nakamura",
    "Novak",
    "Okafor",
    "Olsen",
    "Park",
    "Patel",
    "Quispe",
    "Rossi",
    "Santos",
    "Schmidt",
    "Silva",
    "Singh",
    "Tanaka",
    "Torres",
    "Ueda",
    "Varga",
    "Wagner",
    "Weber",
    "Xu",
    "Yilmaz",
    "Zhang",
    "Zielinski",
    "Zimmermann",
];

const WORDS: &[&str] = &[
    "account",
    "after",
    "amber",
    "ancient",
    "answer",
    "autumn",
    "balance",
    "basket",
    "before",
    "bright",
    "bridge",
    "calm",
    "candle",
    "careful",
    "center",
    "charge",
    "clever",
    "cloud",
    "copper",
    "crowd",
    "daily",
    "distant",
    "during",
    "early",
    "engine",
    "evening",
    "every",
    "famous",
    "field",
    "forest",
    "fresh",
    "garden",
    "gentle",
    "golden",
    "harbor",
    "heavy",
    "hidden",
    "history",
    "island",
    "journey",
    "kettle",
    "ladder",
    "lantern",
    "large",
    "letter",
    "little",
    "market",
    "meadow",
    "middle",
    "morning",
    "narrow",
    "never",
    "number",
    "ocean",
    "orange",
    "paper",
    "patient",
    "pencil",
    "quiet",
    "rapid",
    "record",
    "river",
    "rocket",
    "saddle",
    "second",
    "silver",
    "simple",
    "slowly",
    "stone",
    "stream",
    "summer",
    "table",
    "through",
    "timber",
    "today",
    "travel",
    "under",
    "valley",
    "velvet",
    "village",
    "wander",
    "window",
    "winter",
    "wooden",
    "yellow",
    "yesterday",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_makes_json_of_the_published_shape() {
        let template = Template::parse(DEFAULT_TEMPLATE).unwrap();
        let key = Template::parse(DEFAULT_PARTITION_KEY).unwrap();
        let mut sizes = Vec::new();
        for seq in 0..200 {
            let values = Values::new(3, seq);
            let (mut data, mut pk) = (String::new(), String::new());
            template.render(&values, &mut data);
            key.render(&values, &mut pk);
            let json: serde_json::Value = serde_json::from_str(&data).expect("valid JSON");
            assert_eq!(json["id"].as_str(), Some(pk.as_str()), "the id is the partition key");
            assert!(uuid::Uuid::parse_str(&pk).is_ok_and(|u| u.get_version_num() == 4), "{pk}");
            assert!(json["firstname"].as_str().is_some_and(|s| !s.is_empty()));
            assert!(json["lastname"].as_str().is_some_and(|s| !s.is_empty()));
            let description = json["description"].as_str().unwrap();
            assert!(description.ends_with('.') && description.split(' ').count() >= 6, "{description}");
            assert_eq!(json["balance"], 0);
            sizes.push(data.len());
        }
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!((120..=200).contains(&mean), "about 150 bytes a record: {mean}");
    }

    #[test]
    fn user_templates_fill_every_field_and_ranges() {
        let template =
            Template::parse("{{producer}}/{{seq}} {{name}} t={{int:-5:5}} f={{float:1:2}} {{ timestamp }}").unwrap();
        for seq in 0..100 {
            let mut out = String::new();
            template.render(&Values::new(7, seq), &mut out);
            let fields: Vec<&str> = out.split(' ').collect();
            assert_eq!(fields[0], format!("7/{seq}"));
            let t: i64 = fields[3].strip_prefix("t=").unwrap().parse().unwrap();
            assert!((-5..=5).contains(&t), "{out}");
            let f: f64 = fields[4].strip_prefix("f=").unwrap().parse().unwrap();
            assert!((1.0..=2.0).contains(&f), "{out}");
            assert!(fields[5].parse::<u128>().unwrap() > 1_700_000_000_000, "{out}");
        }
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        assert_eq!(Template::parse("a {{uuid"), Err(TemplateError::Unclosed(2)));
        assert_eq!(Template::parse("{{nope}}"), Err(TemplateError::Unknown("nope".into())));
        assert_eq!(Template::parse("{{int:9:1}}"), Err(TemplateError::BadRange("int:9:1".into())));
        assert_eq!(Template::parse("{{int:x:1}}"), Err(TemplateError::BadRange("int:x:1".into())));
        assert_eq!(Template::parse("{{int:1}}"), Err(TemplateError::BadRange("int:1".into())));
        assert!(Template::parse("").unwrap().is_empty());
        assert!(!Template::parse("plain").unwrap().is_empty());
    }
}
