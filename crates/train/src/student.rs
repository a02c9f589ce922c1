//! Student construction from the run config: a preset or explicit shape sharing the teacher's
//! tokenizer with random (seeded) init, or `init = "teacher-layers"`: the teacher's embeddings,
//! final norm (and lm_head) and a chosen subset of its layers (DistilBERT / Minitron).

use crate::config::{StudentInit, StudentSection};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use distill_core::{CausalLm, Config, Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// (layers, hidden, heads, kv_heads, intermediate) of the named shapes.
pub fn preset(name: &str) -> Result<(usize, usize, usize, usize, usize)> {
    Ok(match name {
        "tiny" => (2, 32, 4, 2, 64),
        "4l-256" => (4, 256, 4, 4, 768),
        "6l-384" => (6, 384, 6, 2, 1024),
        _ => {
            return Err(Error::Msg(format!(
                "student.preset = \"{name}\": expected tiny, 4l-256 or 6l-384"
            )))
        }
    })
}

/// The student's config: the teacher's, reshaped.
pub fn student_config(teacher: &Config, s: &StudentSection) -> Result<Config> {
    let (mut l, mut h, mut nh, mut kv, mut ff) = match &s.preset {
        Some(p) => preset(p)?,
        None if s.init == StudentInit::TeacherLayers => (
            teacher.num_hidden_layers / 2,
            teacher.hidden_size,
            teacher.num_attention_heads,
            teacher.num_key_value_heads,
            teacher.intermediate_size,
        ),
        None => (0, 0, 0, 0, 0),
    };
    l = s.layers.unwrap_or(l);
    h = s.hidden.unwrap_or(h);
    nh = s.heads.unwrap_or(nh);
    kv = s.kv_heads.unwrap_or(kv.max(1).min(nh.max(1)));
    ff = s.intermediate.unwrap_or(ff);
    if l == 0 || h == 0 || nh == 0 || ff == 0 {
        return Err(Error::Msg(
            "student shape incomplete: give student.preset or layers, hidden, heads and intermediate"
                .into(),
        ));
    }
    if h % nh != 0 || nh % kv != 0 {
        return Err(Error::Msg(format!(
            "student shape: hidden {h} must be a multiple of heads {nh}, and heads of kv_heads {kv}"
        )));
    }
    let vocab = s.vocab_size.unwrap_or(teacher.vocab_size);
    Ok(Config {
        vocab_size: vocab,
        hidden_size: h,
        intermediate_size: ff,
        num_hidden_layers: l,
        num_attention_heads: nh,
        num_key_value_heads: kv,
        // The teacher's own head_dim where the attention keeps its shape (Gemma's is not
        // hidden / heads).
        head_dim: if (h, nh) == (teacher.hidden_size, teacher.num_attention_heads) {
            teacher.head_dim
        } else {
            h / nh
        },
        torch_dtype: "float32".into(),
        // Gemma 3's layer types: a copied layer keeps its own (its weights were trained for
        // that attention); a new student follows Gemma's pattern at its depth.
        gemma3: match &teacher.gemma3 {
            Some(g) => Some(distill_core::Gemma3 {
                sliding_layers: match s.init {
                    StudentInit::TeacherLayers => layer_map(teacher, s, l)?
                        .iter()
                        .map(|&i| g.sliding_layers[i])
                        .collect(),
                    _ => distill_core::Gemma3::default_layers(l),
                },
                ..g.clone()
            }),
            None => None,
        },
        ..teacher.clone()
    })
}

/// The teacher layers a `teacher-layers` student of `n` layers copies: `student.teacher_layers`,
/// checked, or by default every k-th from 0.
pub fn layer_map(teacher: &Config, s: &StudentSection, n: usize) -> Result<Vec<usize>> {
    let map = match &s.teacher_layers {
        Some(m) => m.clone(),
        None => default_layer_map(teacher.num_hidden_layers, n),
    };
    if map.len() != n || map.iter().any(|&i| i >= teacher.num_hidden_layers) {
        return Err(Error::Msg(format!(
            "student.teacher_layers = {map:?}: need {n} indices below {}",
            teacher.num_hidden_layers
        )));
    }
    Ok(map)
}

/// Teacher layers a student of `n` layers copies by default: every k-th from 0.
pub fn default_layer_map(teacher_layers: usize, n: usize) -> Vec<usize> {
    let k = (teacher_layers / n.max(1)).max(1);
    (0..n).map(|i| (i * k).min(teacher_layers - 1)).collect()
}

/// Builds the student (trainable, on a VarMap).
pub fn build_student(
    teacher_dir: &Path,
    teacher_cfg: &Config,
    s: &StudentSection,
    device: &Device,
) -> Result<(CausalLm, VarMap, Config)> {
    if s.init == StudentInit::Model {
        let dir = s.model.as_deref().ok_or_else(|| {
            Error::Msg("student.init = \"model\" needs student.model = \"DIR\"".into())
        })?;
        return student_from_dir(dir, teacher_dir, s.seed, device);
    }
    let cfg = student_config(teacher_cfg, s)?;
    let (model, varmap) = CausalLm::init_seeded(&cfg, s.seed, device)?;
    if s.init == StudentInit::TeacherLayers {
        copy_teacher_layers(teacher_dir, teacher_cfg, &cfg, s, &varmap, device)?;
    }
    Ok((model, varmap, cfg))
}

fn copy_teacher_layers(
    teacher_dir: &Path,
    tc: &Config,
    sc: &Config,
    s: &StudentSection,
    varmap: &VarMap,
    device: &Device,
) -> Result<()> {
    let shape = |c: &Config| {
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.vocab_size,
        )
    };
    if shape(tc) != shape(sc) {
        return Err(Error::Msg(format!(
            "student.init = \"teacher-layers\" needs the teacher's width (hidden, heads, kv_heads, \
             intermediate, vocab = {:?}); the student has {:?}",
            shape(tc),
            shape(sc)
        )));
    }
    let map = layer_map(tc, s, sc.num_hidden_layers)?;
    let files = distill_core::weights::safetensors_files(teacher_dir)?;
    // SAFETY: model dirs are read-only inputs for the whole run.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::file(&files[0], e))?;
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let src = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, tail) = rest.split_once('.').expect("layer tensor names have a dot");
                let i: usize = i.parse().expect("layer index");
                format!("model.layers.{}.{tail}", map[i])
            }
            None => name.clone(),
        };
        let t = st
            .load(&src, device)
            .map_err(|e| Error::file(&files[0], format!("teacher tensor {src}: {e}")))?
            .to_dtype(DType::F32)?;
        var.set(&t)?;
    }
    Ok(())
}

/// A trainable student that starts as the model in `dir`, which must share the teacher's
/// tokenizer (the same ids mean the same tokens to both).
pub fn student_from_dir(
    dir: &Path,
    teacher_dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<(CausalLm, VarMap, Config)> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "student model dir does not exist"));
    }
    let cfg = Config::from_file(dir.join("config.json"))?;
    let theirs = distill_core::Tokenizer::from_dir(dir)?;
    let teachers = distill_core::Tokenizer::from_dir(teacher_dir)?;
    if theirs.hash() != teachers.hash() {
        return Err(Error::file(
            dir.join("tokenizer.json"),
            format!(
                "the student's tokenizer differs from the teacher's ({}): distillation needs the \
                 same token ids",
                teacher_dir.display()
            ),
        ));
    }
    let mut tensors = distill_core::weights::load_tensors(dir, device)?;
    let (model, varmap) = CausalLm::init_seeded(&cfg, seed, device)?;
    let weights = distill_core::weights::safetensors_files(dir)?;
    {
        let data = varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            let t = tensors.remove(name).ok_or_else(|| {
                Error::file(&weights[0], format!("no tensor {name} for its config.json"))
            })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::file(
                    &weights[0],
                    format!(
                        "tensor {name} is {:?}, config.json implies {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(&t)?;
        }
    }
    Ok((model, varmap, cfg))
}

/// The input embedding's name (also the output projection when tied).
pub const EMBEDDINGS: &str = "model.embed_tokens.weight";

/// Fixed tensors first, the VarMap's variables for everything else.
struct FrozenOrVars {
    frozen: HashMap<String, Tensor>,
    vars: VarMap,
}

impl SimpleBackend for FrozenOrVars {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.frozen.get(name) {
            Some(t) if t.shape() == &s => Ok(t.clone()),
            Some(t) => candle_core::bail!("frozen {name} is {:?}, expected {s:?}", t.shape()),
            None => self.vars.get(s, name, h, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.frozen.get(name) {
            Some(t) => Ok(t.clone()),
            None => SimpleBackend::get_unchecked(&self.vars, name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.frozen.contains_key(name) || SimpleBackend::contains_tensor(&self.vars, name)
    }
}

/// Takes the tensors `names` out of `varmap` and rebuilds the model with them as plain tensors:
/// no gradient is computed for them and the optimizer never sees them. Returns the model and the
/// frozen tensors (which a checkpoint must write beside the VarMap's).
pub fn freeze(
    cfg: &Config,
    varmap: &VarMap,
    names: &[&str],
    device: &Device,
) -> Result<(CausalLm, HashMap<String, Tensor>)> {
    let mut frozen = HashMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for &name in names {
            let var = data
                .remove(name)
                .ok_or_else(|| Error::Msg(format!("cannot freeze {name}: no such parameter")))?;
            frozen.insert(name.to_string(), var.as_tensor().detach());
        }
    }
    let backend = FrozenOrVars {
        frozen: frozen.clone(),
        vars: varmap.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    Ok((CausalLm::load(vb, cfg)?, frozen))
}

/// A copy of the student that tracks no gradient (its weights detached from the VarMap's and
/// frozen tensors, its input projections fused as a teacher's are): for sampling its own
/// continuations between updates. Built again after each update; the weights are shared, not
/// copied, except where projections are fused.
pub fn frozen_copy(
    cfg: &Config,
    varmap: &VarMap,
    frozen: &HashMap<String, Tensor>,
    device: &Device,
) -> Result<CausalLm> {
    let mut tensors: HashMap<String, Tensor> = distill_core::weights::varmap_tensors(varmap)
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    tensors.extend(frozen.iter().map(|(k, v)| (k.clone(), v.detach())));
    Ok(CausalLm::load(
        VarBuilder::from_tensors(tensors, DType::F32, device),
        cfg,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> StudentSection {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_gemma_student_keeps_the_attention_type_of_each_copied_layer() {
        // The tiny Gemma: layers 0 and 1 slide, layer 2 attends to everything.
        let teacher = Config::tiny_gemma3();
        let types = |s: &StudentSection| {
            student_config(&teacher, s)
                .unwrap()
                .gemma3
                .unwrap()
                .sliding_layers
        };
        let copied = section("init = \"teacher-layers\"\nlayers = 2\nteacher_layers = [2, 0]");
        assert_eq!(types(&copied), vec![false, true]);
        // The default map (every k-th from 0) keeps each copied layer's type too.
        let default_map = section("init = \"teacher-layers\"\nlayers = 3");
        assert_eq!(types(&default_map), vec![true, true, false]);
        // A new student of that shape follows Gemma's own pattern at its depth.
        let fresh = section("layers = 2\nhidden = 64\nheads = 4\nkv_heads = 2\nintermediate = 128");
        assert_eq!(types(&fresh), distill_core::Gemma3::default_layers(2));
        // A map that names a layer the teacher lacks is one error, not a panic.
        let bad = section("init = \"teacher-layers\"\nlayers = 1\nteacher_layers = [5]");
        let err = student_config(&teacher, &bad).unwrap_err().to_string();
        assert!(err.contains("teacher_layers = [5]"), "{err}");
    }
}
