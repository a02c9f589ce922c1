//! The model card every model dir distill writes carries: `README.md` with Hugging Face's YAML
//! header (base_model, license, tags, datasets, pipeline) and a body that says where the weights
//! came from — the teacher, the data, the loss, the steps, the figures measured.
//!
//! Lineage travels through the cards: `convert` names the GGUF's original model, `prune` and the
//! trainer copy their teacher's `base_model` and `license` into what they write.

use crate::error::Result;
use crate::fsio::write_atomic;
use std::path::Path;

pub const CARD_FILE: &str = "README.md";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCard {
    pub title: String,
    /// The Hugging Face id these weights originate from (the teacher's, for a student).
    pub base_model: Option<String>,
    /// An SPDX-style id as the Hub spells it (`apache-2.0`); `other` when unknown.
    pub license: Option<String>,
    pub tags: Vec<String>,
    pub datasets: Vec<String>,
    /// (heading, markdown body), in order.
    pub sections: Vec<(String, String)>,
}

/// What a model dir's card says about its origin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lineage {
    pub base_model: Option<String>,
    pub license: Option<String>,
}

impl ModelCard {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            tags: vec!["distill".into()],
            ..Self::default()
        }
    }

    /// A card that inherits `from`'s base model and licence.
    pub fn derived(title: impl Into<String>, from: &Lineage) -> Self {
        Self {
            base_model: from.base_model.clone(),
            license: from.license.clone(),
            ..Self::new(title)
        }
    }

    pub fn tag(mut self, tag: &str) -> Self {
        if !self.tags.iter().any(|t| t == tag) {
            self.tags.push(tag.to_string());
        }
        self
    }

    pub fn section(mut self, heading: &str, body: impl Into<String>) -> Self {
        self.sections.push((heading.to_string(), body.into()));
        self
    }

    pub fn render(&self) -> String {
        let mut s = String::from("---\n");
        if let Some(b) = &self.base_model {
            s += &format!("base_model: {}\n", yaml_str(b));
        }
        s += &format!(
            "license: {}\n",
            yaml_str(self.license.as_deref().unwrap_or("other"))
        );
        s += "library_name: transformers\npipeline_tag: text-generation\n";
        for (key, items) in [("tags", &self.tags), ("datasets", &self.datasets)] {
            if !items.is_empty() {
                s += &format!("{key}:\n");
                for i in items {
                    s += &format!("- {}\n", yaml_str(i));
                }
            }
        }
        s += "---\n\n";
        s += &format!("# {}\n", self.title);
        for (h, body) in &self.sections {
            s += &format!("\n## {h}\n\n{}\n", body.trim_end());
        }
        s
    }

    /// Writes `dir/README.md` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(dir.join(CARD_FILE), self.render().as_bytes())
    }
}

/// A YAML scalar: plain when that reads back as the same string, else double-quoted.
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !s.starts_with(['-', '.'])
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
        )
        && s.parse::<f64>().is_err();
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("a string serialises")
    }
}

/// The base model and licence in `dir/README.md`'s YAML header; nothing for a dir without a
/// card (or with a card that has no header). Only `key: value` lines are read.
pub fn lineage(dir: &Path) -> Lineage {
    let Ok(text) = std::fs::read_to_string(dir.join(CARD_FILE)) else {
        return Lineage::default();
    };
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("---") {
        return Lineage::default();
    }
    let mut l = Lineage::default();
    for line in lines.take_while(|l| l.trim() != "---") {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let v = serde_json::from_str::<String>(v)
            .ok()
            .unwrap_or_else(|| v.trim_matches('\'').to_string());
        if v.is_empty() {
            continue;
        }
        match k.trim() {
            "base_model" => l.base_model = Some(v),
            "license" => l.license = Some(v),
            _ => {}
        }
    }
    l
}

/// The card's paragraph on licence: the inherited one named, an unknown one flagged.
pub fn licence_note(l: &Lineage) -> String {
    match l.license.as_deref() {
        Some(lic) if lic != "other" => format!(
            "Derived from the teacher's weights, so the teacher's licence applies: `{lic}`."
        ),
        _ => "Derived from the teacher's weights; the teacher's licence is not recorded in its \
              dir (no model card): check it before you publish this model."
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_reads_back_its_lineage_and_quotes_what_yaml_would_misread() {
        let tmp = tempfile::tempdir().unwrap();
        let card = ModelCard {
            base_model: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
            license: Some("apache-2.0".into()),
            datasets: vec!["wiki: a, b".into(), "yes".into()],
            ..ModelCard::new("student")
        }
        .tag("distillation")
        .section("Training", "4 steps");
        card.write(tmp.path()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(CARD_FILE)).unwrap();
        assert!(
            text.starts_with(
                "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0\n"
            ),
            "{text}"
        );
        assert!(text.contains("- \"wiki: a, b\"\n- \"yes\"\n"), "{text}");
        assert!(
            text.contains("tags:\n- distill\n- distillation\n"),
            "{text}"
        );
        assert!(text.contains("\n## Training\n\n4 steps\n"), "{text}");
        assert_eq!(
            lineage(tmp.path()),
            Lineage {
                base_model: card.base_model.clone(),
                license: card.license.clone()
            }
        );
        let derived = ModelCard::derived("cut", &lineage(tmp.path()));
        assert_eq!(derived.base_model, card.base_model);
        assert_eq!(lineage(&tmp.path().join("absent")), Lineage::default());
        assert!(licence_note(&Lineage::default()).contains("not recorded"));
    }
}
