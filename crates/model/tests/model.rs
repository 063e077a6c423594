//! The models: the study's parameter count, output shapes, smp's weight names,
//! and input-size checks.

use liverseg_model::{summary, weights as io, ModelSpec, SegmentationModel};
use liverseg_recipe::{Arch, Encoder};
use tch::{nn, Device, Kind, Tensor};

fn spec(arch: &str, encoder: &str) -> ModelSpec {
    ModelSpec { arch: arch.parse::<Arch>().unwrap(), encoder: encoder.parse::<Encoder>().unwrap(), in_channels: 1, classes: 2 }
}

#[test]
fn deeplabv3plus_resnet34_has_the_studys_parameter_count() {
    let vs = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs.root(), &spec("deeplabv3plus", "resnet34")).unwrap();
    assert_eq!(liverseg_model::trainable_parameters(&vs), 22_431_442);
    let table = summary::summary(&spec("deeplabv3plus", "resnet34"), 224).unwrap();
    assert!(table.trim_end().ends_with("Trainable params: 22,431,442"), "{table}");
    assert!(table.contains("decoder.block2") && table.contains("[1, 2, 224, 224]"));
}

#[test]
fn outputs_are_n_by_classes_by_h_by_w() {
    for (arch, enc) in [("deeplabv3plus", "resnet18"), ("deeplabv3plus", "resnet50"), ("resnet", "resnet34")] {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = SegmentationModel::new(&vs.root(), &spec(arch, enc)).unwrap();
        let x = Tensor::rand([2, 1, 64, 96], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| m.forward(&x, false));
        assert_eq!(y.size(), [2, 2, 64, 96], "{arch}/{enc}");
    }
}

#[test]
fn input_sides_must_divide_by_the_output_stride() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = SegmentationModel::new(&vs.root(), &spec("deeplabv3plus", "resnet34")).unwrap();
    let err = m.check_input(100, 224).unwrap_err().to_string();
    assert!(err.contains("divisible by 16"), "{err}");
    assert!("unet".parse::<Arch>().is_err(), "an unknown architecture is refused when named");
}

/// Names and shapes equal segmentation_models_pytorch's state_dict
/// (tests/fixtures/smp_deeplabv3plus_resnet34.tsv, from bench/smp_state_dict.py).
#[test]
fn weight_names_match_smp() {
    let fixture = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/smp_deeplabv3plus_resnet34.tsv")).unwrap();
    let mut want: Vec<String> = fixture.lines().map(|l| l.replace(' ', "")).collect();
    want.sort();
    let vs = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs.root(), &spec("deeplabv3plus", "resnet34")).unwrap();
    let mut got: Vec<String> = io::state_dict_names(&vs).into_iter().map(|(n, s)| format!("{n}\t{s:?}").replace(' ', "")).collect();
    got.sort();
    assert_eq!(got.len(), 277);
    assert_eq!(got, want);
}

#[test]
fn weights_round_trip_and_partial_loads_check_shapes() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join("roundtrip.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let m = SegmentationModel::new(&vs.root(), &spec("resnet", "resnet18")).unwrap();
    io::save(&vs, &path, 3).unwrap();
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let m2 = SegmentationModel::new(&vs2.root(), &spec("resnet", "resnet18")).unwrap();
    io::load(&mut vs2, &path, true).unwrap();
    let x = Tensor::rand([1, 1, 64, 64], (Kind::Float, Device::Cpu));
    let (a, b) = tch::no_grad(|| (m.forward(&x, false), m2.forward(&x, false)));
    assert_eq!(f64::try_from((a - b).abs().max()).unwrap(), 0.0);
    // A resnet34 file holds every resnet18 name, but strict loading still refuses it.
    let vs34 = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs34.root(), &spec("deeplabv3plus", "resnet34")).unwrap();
    let p34 = dir.join("r34.safetensors");
    io::save(&vs34, &p34, 0).unwrap();
    let mut vs3 = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs3.root(), &spec("deeplabv3plus", "resnet18")).unwrap();
    let err = format!("{:#}", io::load(&mut vs3, &p34, true).unwrap_err());
    assert!(err.contains("r34.safetensors") && err.contains("unexpected tensor `encoder.layer1.2"), "{err}");
    // A partial load (e.g. encoder weights exported from Python) fills what it names,
    // but a shape mismatch is an error that names the tensor.
    let mut vs4 = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs4.root(), &spec("deeplabv3plus", "resnet18")).unwrap();
    assert!(io::load(&mut vs4, &p34, false).unwrap() > 100);
    let mut vs5 = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs5.root(), &ModelSpec { in_channels: 3, ..spec("deeplabv3plus", "resnet34") }).unwrap();
    let err = format!("{:#}", io::load(&mut vs5, &p34, false).unwrap_err());
    assert!(err.contains("`encoder.conv1.weight` has shape [64, 1, 7, 7], the model expects [64, 3, 7, 7]"), "{err}");
}

/// (numel, mean, std, excess kurtosis) of a tensor, in f64.
fn moments(t: &Tensor) -> (f64, f64, f64, f64) {
    let x = t.to_kind(Kind::Double).flatten(0, -1);
    let n = x.numel() as f64;
    let mean = f64::try_from(x.mean(Kind::Double)).unwrap();
    let centred = &x - mean;
    let var = f64::try_from(centred.pow_tensor_scalar(2).mean(Kind::Double)).unwrap();
    let m4 = f64::try_from(centred.pow_tensor_scalar(4).mean(Kind::Double)).unwrap();
    let kurtosis = if var > 0.0 { m4 / (var * var) - 3.0 } else { 0.0 };
    (n, mean, var.sqrt(), kurtosis)
}

/// Every tensor starts as smp builds it (torchvision's ResNet init in the
/// encoder, PyTorch's defaults in the decoder and head): its mean, std and
/// kurtosis agree with smp's (tests/fixtures/smp_init_deeplabv3plus_resnet34.tsv,
/// from bench/smp_init_stats.py) within six standard errors of two samples
/// of that size; constants (BatchNorm, biases, running statistics) exactly.
#[test]
fn initialisation_matches_smp_per_tensor() {
    let fixture = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/smp_init_deeplabv3plus_resnet34.tsv")).unwrap();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    SegmentationModel::new(&vs.root(), &spec("deeplabv3plus", "resnet34")).unwrap();
    let ours: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut checked = 0;
    for line in fixture.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        let (name, want): (&str, Vec<f64>) = (f[0], f[1..].iter().map(|v| v.parse().unwrap()).collect());
        let (n, mean, std, kurt) = moments(ours.get(name).unwrap_or_else(|| panic!("{name}: not in liverseg's model")));
        assert_eq!(n, want[0], "{name}: numel");
        let (w_mean, w_std, w_kurt) = (want[1], want[2], want[3]);
        if w_std == 0.0 {
            assert!(std == 0.0 && mean == w_mean, "{name}: constant {w_mean} in smp, mean {mean} std {std} here");
        } else {
            let tol_mean = 6.0 * w_std * (2.0 / n).sqrt();
            let tol_std = 6.0 * w_std / n.sqrt();
            assert!((mean - w_mean).abs() <= tol_mean, "{name}: mean {mean}, smp {w_mean} (±{tol_mean})");
            assert!((std - w_std).abs() <= tol_std, "{name}: std {std}, smp {w_std} (±{tol_std})");
            if n >= 4096.0 {
                let tol_kurt = 6.0 * (48.0 / n).sqrt();
                assert!((kurt - w_kurt).abs() <= tol_kurt, "{name}: kurtosis {kurt}, smp {w_kurt} (±{tol_kurt}): another distribution");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, ours.len(), "every variable of ours is in the fixture");
}

/// The same weights give the same logits in liverseg and in smp (eval mode,
/// BatchNorm statistics moved off their initial values first), to 1e-4.
#[test]
fn logits_equal_smps_for_the_same_weights() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    let has_smp = std::process::Command::new(&python).args(["-c", "import segmentation_models_pytorch, safetensors"]).output().is_ok_and(|o| o.status.success());
    if !has_smp {
        eprintln!("SKIPPED the smp output check: segmentation_models_pytorch is not in .venv (make test installs it)");
        return;
    }
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = SegmentationModel::new(&vs.root(), &spec("deeplabv3plus", "resnet34")).unwrap();
    tch::no_grad(|| {
        for _ in 0..3 {
            let _ = m.forward(&(Tensor::randn([4, 1, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 + 0.5), true);
        }
    });
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smp_forward");
    std::fs::create_dir_all(&dir).unwrap();
    let (weights, input, output) = (dir.join("weights.safetensors"), dir.join("x.safetensors"), dir.join("logits.safetensors"));
    io::save(&vs, &weights, 3).unwrap();
    let x = Tensor::randn([2, 1, 96, 128], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("x", &x)], &input).unwrap();
    let out = std::process::Command::new(&python).arg(root.join("tests/scripts/smp_forward.py")).args([&weights, &input, &output]).output().unwrap();
    assert!(out.status.success(), "smp_forward.py: {}", String::from_utf8_lossy(&out.stderr));
    let theirs = Tensor::read_safetensors(&output).unwrap().remove(0).1;
    let ours = tch::no_grad(|| m.forward(&x, false));
    assert_eq!(ours.size(), theirs.size());
    let diff = f64::try_from((&ours - &theirs).abs().max()).unwrap();
    let scale = f64::try_from(theirs.abs().max()).unwrap();
    assert!(diff <= 1e-4, "max |liverseg − smp| = {diff} (logits up to {scale})");
}
