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
