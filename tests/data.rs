//! The data stages: readers on the real shared files (reference values were
//! computed independently with nibabel, pydicom and Pillow), bad input,
//! the patient-level split, augmentation of train only, determinism.

mod common;
use common::*;
use liverseg_engine::tables::read_parquet;
use liverseg_imaging::{dicom, nifti, nrrd, slices2d};

#[test]
fn nifti_reader_on_totalsegmentator() {
    let Some(data) = shared_data() else { return };
    let ct = nifti::read(&data.join("formats/totalsegmentator/example_ct_sm.nii.gz")).unwrap().volume;
    assert_eq!(ct.dims, [122, 101, 30]);
    assert_eq!(ct.orientation(), "RAS");
    assert_eq!(ct.num_slices(), 30);
    assert_eq!(ct.slice_shape().0, (101, 122));
    assert_eq!(ct.spacing, [3.0, 3.0, 3.0]);
    let (lo, hi) = ct.data.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((lo, hi), (-1100.0, 1207.0));
    let seg = nifti::read(&data.join("formats/totalsegmentator/example_seg.nii.gz")).unwrap().volume;
    assert_eq!(seg.data.iter().filter(|&&v| v == 5.0).count(), 38634);
}

#[test]
fn dicom_reader_with_nifti_and_nrrd_masks() {
    let Some(data) = shared_data() else { return };
    let ts = dicom::read_series(&data.join("formats/totalsegmentator/example_ct_dicom")).unwrap();
    assert_eq!(ts.dims, [512, 512, 20]);
    assert!((ts.spacing[0] - 0.9765625).abs() < 1e-9);
    let (lo, hi) = ts.data.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((lo, hi), (-1024.0, 1839.0));
    // The mask is stored LAS; resampled by world coordinates it keeps every liver voxel.
    let mask = nifti::read(&data.join("formats/totalsegmentator/example_seg_dicom.nii.gz")).unwrap().volume;
    let on_grid = dicom::resample_nearest(&mask, &ts).unwrap();
    assert_eq!(on_grid.iter().filter(|&&v| v == 5.0).count(), 366708);

    let q = dicom::read_series(&data.join("formats/dcmqi/ct-3slice")).unwrap();
    assert_eq!(q.dims, [512, 512, 3]);
    let (lo, hi) = q.data.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((lo, hi), (-3024.0, 1381.0));
    // Slices are ordered by position along the normal, whatever the file order.
    assert!((q.affine[2][3] - -128.690002).abs() < 1e-4, "origin z {}", q.affine[2][3]);
    let seg = nrrd::read(&data.join("formats/dcmqi/liver_seg.nrrd")).unwrap();
    assert_eq!(seg.dims, [512, 512, 3]);
    assert_eq!(seg.data.iter().filter(|&&v| v == 1.0).count(), 107098);
    let on_grid = dicom::resample_nearest(&seg, &q).unwrap();
    assert_eq!(on_grid.iter().filter(|&&v| v == 1.0).count(), 107098);
}

#[test]
fn slices2d_reader_and_ingest_on_msd() {
    let Some(data) = shared_data() else { return };
    let root = data.join("msd-liver-2d");
    let pair = slices2d::read_pair(&root.join("images/flipped_10001_103.jpg"), &root.join("masks/flipped_10001_103.jpg"), slices2d::MaskRule::Threshold(127)).unwrap();
    assert_eq!((pair.rows, pair.cols), (256, 256));
    assert_eq!(pair.mask.iter().filter(|&&v| v == 1).count(), 8185);
    let dir = project(
        "data_msd",
        &format!("data: {{source: slices2d, root: {}}}\nstages:\n  ingest: {{}}\n  normalise: {{deps: [ingest], params: {{size: 128}}}}\n  split: {{deps: [normalise]}}\n", root.display()),
    );
    ok(&dir, &["run", "-q"]);
    let ingest = artifacts_of(&dir, "ingest").pop().unwrap();
    let t = read_parquet(&ingest.join("slices.parquet")).unwrap();
    assert_eq!(t.height(), 521);
    let liver: u64 = t.column("liver_pixels").unwrap().u64().unwrap().iter().map(|v| v.unwrap()).sum();
    // Pillow (libjpeg) counts 2,338,121; JPEG decoders may round a handful of
    // pixels at the 127 threshold differently, so allow 0.001%.
    assert!(liver.abs_diff(2338121) <= 23, "liver pixels {liver}");
    let cases: std::collections::BTreeSet<String> = t.column("case_id").unwrap().str().unwrap().iter().map(|s| s.unwrap().to_owned()).collect();
    assert_eq!(cases.len(), 101);
    // The 16 slices exported twice (flipped and mirrored) are found and stay within a patient.
    let split = artifacts_of(&dir, "split").pop().unwrap();
    let dups = read_parquet(&split.join("duplicates.parquet")).unwrap();
    assert_eq!(dups.height(), 16);
    let a = dups.column("case_a").unwrap().str().unwrap().clone();
    let b = dups.column("case_b").unwrap().str().unwrap().clone();
    assert!((0..16).all(|i| a.get(i) == b.get(i)));
    check_split(&split, 101);
}

/// No patient in two splits, and patient counts within one of 70/16/14.
fn check_split(split: &std::path::Path, patients: usize) {
    let t = read_parquet(&split.join("assignment.parquet")).unwrap();
    let cases = t.column("case_id").unwrap().str().unwrap().clone();
    let splits = t.column("split").unwrap().str().unwrap().clone();
    let mut of: std::collections::BTreeMap<String, String> = Default::default();
    for i in 0..t.height() {
        let (c, s) = (cases.get(i).unwrap().to_owned(), splits.get(i).unwrap().to_owned());
        if let Some(prev) = of.insert(c.clone(), s.clone()) {
            assert_eq!(prev, s, "patient {c} is in two splits");
        }
    }
    assert_eq!(of.len(), patients);
    for (name, frac) in [("train", 0.70), ("val", 0.16), ("test", 0.14)] {
        let n = of.values().filter(|s| *s == name).count() as f64;
        assert!((n - frac * patients as f64).abs() <= 1.0, "{name}: {n} of {patients}");
    }
}

#[test]
fn split_is_by_patient_and_augment_touches_train_only() {
    let dir = project("data_split", &DATA_PIPELINE.replace("synthetic_cases: 10", "synthetic_cases: 20"));
    ok(&dir, &["run", "-q"]);
    let split = artifacts_of(&dir, "split").pop().unwrap();
    check_split(&split, 20);
    let assignment = read_parquet(&split.join("assignment.parquet")).unwrap();
    let splits = assignment.column("split").unwrap().str().unwrap().clone();
    let aug = artifacts_of(&dir, "augment").pop().unwrap();
    let idx = read_parquet(&aug.join("index.parquet")).unwrap();
    let sources: Vec<u64> = idx.column("source_idx").unwrap().u64().unwrap().iter().map(|v| v.unwrap()).collect();
    let train = (0..assignment.height()).filter(|&i| splits.get(i) == Some("train")).count();
    assert_eq!(sources.len(), train, "one copy per training slice");
    assert!(sources.iter().all(|&i| splits.get(i as usize) == Some("train")), "augment read a val/test slice");
    // The counts stored with the split add up.
    let counts = read_parquet(&split.join("counts.parquet")).unwrap();
    let slices: u64 = counts.column("slices").unwrap().u64().unwrap().iter().map(|v| v.unwrap()).sum();
    assert_eq!(slices as usize, assignment.height());
}

#[test]
fn same_seed_gives_byte_identical_artifacts() {
    let a = project("data_det_a", DATA_PIPELINE);
    let b = project("data_det_b", DATA_PIPELINE);
    ok(&a, &["run", "-q"]);
    ok(&b, &["run", "-q"]);
    for stage in ["ingest", "normalise", "split", "augment"] {
        let (da, db) = (artifacts_of(&a, stage).pop().unwrap(), artifacts_of(&b, stage).pop().unwrap());
        let ma = liverseg_engine::store::read_manifest(&da.join("manifest.json")).unwrap();
        let mb = liverseg_engine::store::read_manifest(&db.join("manifest.json")).unwrap();
        assert_eq!(ma.key, mb.key);
        assert_eq!(ma.outputs, mb.outputs, "{stage} outputs differ");
    }
    // A different seed changes the data.
    let c = project("data_det_c", &DATA_PIPELINE.replace("synthetic_slices: 6", "synthetic_slices: 6\n  synthetic_seed: 8"));
    ok(&c, &["run", "-q", "ingest"]);
    let (ia, ic) = (artifacts_of(&a, "ingest").pop().unwrap(), artifacts_of(&c, "ingest").pop().unwrap());
    assert_ne!(std::fs::read(ia.join("cases/000.safetensors")).unwrap(), std::fs::read(ic.join("cases/000.safetensors")).unwrap());
}

#[test]
fn phantoms_are_plausible_and_not_trivial() {
    let p = liverseg_imaging::synth::phantom(7, 0, 64, 12);
    let liver: Vec<f32> = p.hu.iter().zip(&p.labels).filter(|(_, &l)| l > 0).map(|(&h, _)| h as f32).collect();
    let mean = liver.iter().sum::<f32>() / liver.len() as f32;
    assert!((30.0..90.0).contains(&mean), "liver mean HU {mean}");
    // Non-liver soft tissue overlaps the liver's HU range: a threshold cannot segment it.
    let confusable = p.hu.iter().zip(&p.labels).filter(|(&h, &l)| l == 0 && (mean - 15.0..mean + 15.0).contains(&(h as f32))).count();
    assert!(confusable > liver.len() / 4, "only {confusable} confusable voxels");
    // Some slices at the ends have no liver.
    let per_slice: Vec<usize> = (0..12).map(|z| p.labels[z * 64 * 64..(z + 1) * 64 * 64].iter().filter(|&&l| l > 0).count()).collect();
    assert!(per_slice.iter().any(|&n| n > 0));
}

/// Each bad input: a clear error naming the file, nothing in the store; with
/// on_error: skip it is quarantined and the rest goes through.
#[test]
fn bad_inputs_fail_clearly_or_are_quarantined() {
    let dir = project("data_bad", "data: {source: nifti, root: raw}\nstages:\n  ingest: {}\n");
    let raw = dir.join("raw");
    ok(&dir, &["synth", "raw", "--cases", "3", "--size", "32", "--slices", "4"]);
    let good = nifti::read(&raw.join("volume-0.nii.gz")).unwrap().volume;
    let hu: Vec<i16> = good.data.iter().map(|&v| v as i16).collect();
    let write = |name: &str, dims: [usize; 3], data: nifti::VoxelData| nifti::write_u8_or_i16(&raw.join(name), dims, &good.affine, data, None).unwrap();

    let mut cases: Vec<(&str, Box<dyn Fn()>, &str)> = Vec::new();
    cases.push((
        "truncated",
        Box::new(|| {
            let b = std::fs::read(raw.join("volume-0.nii.gz")).unwrap();
            std::fs::write(raw.join("volume-9.nii.gz"), &b[..b.len() / 2]).unwrap();
            std::fs::copy(raw.join("segmentation-0.nii.gz"), raw.join("segmentation-9.nii.gz")).unwrap();
        }),
        "volume-9.nii.gz: truncated",
    ));
    cases.push((
        "shape",
        Box::new(|| {
            write("volume-9.nii", good.dims, nifti::VoxelData::I16(&hu));
            write("segmentation-9.nii", [32, 32, 3], nifti::VoxelData::U8(&vec![0u8; 32 * 32 * 3]));
        }),
        "segmentation-9.nii: image is [32, 32, 4] voxels but mask is [32, 32, 3]",
    ));
    cases.push(("missing mask", Box::new(|| write("volume-9.nii", good.dims, nifti::VoxelData::I16(&hu))), "volume-9.nii: missing mask"));
    cases.push((
        "label",
        Box::new(|| {
            write("volume-9.nii", good.dims, nifti::VoxelData::I16(&hu));
            write("segmentation-9.nii", good.dims, nifti::VoxelData::U8(&vec![7u8; 32 * 32 * 4]));
        }),
        "segmentation-9.nii: label 7 is outside the label map",
    ));
    cases.push((
        "nan",
        Box::new(|| {
            // A float32 volume holding a NaN.
            let mut h = nifti::read(&raw.join("volume-0.nii.gz")).unwrap().header;
            h[70..72].copy_from_slice(&16i16.to_le_bytes());
            h[72..74].copy_from_slice(&32i16.to_le_bytes());
            h[108..112].copy_from_slice(&352f32.to_le_bytes());
            let mut bytes = h.clone();
            bytes.extend_from_slice(&[0u8; 4]);
            for i in 0..32 * 32 * 4 {
                bytes.extend_from_slice(&(if i == 5 { f32::NAN } else { 0.0f32 }).to_le_bytes());
            }
            std::fs::write(raw.join("volume-9.nii"), bytes).unwrap();
            std::fs::copy(raw.join("segmentation-0.nii.gz"), raw.join("segmentation-9.nii.gz")).unwrap();
        }),
        "volume-9.nii: voxel 5 is NaN",
    ));
    cases.push(("non-image", Box::new(|| std::fs::write(raw.join("notes.nii"), b"these are notes").unwrap()), "notes.nii"));

    for (what, make, want) in &cases {
        for f in ["volume-9.nii.gz", "segmentation-9.nii.gz", "volume-9.nii", "segmentation-9.nii", "notes.nii"] {
            let _ = std::fs::remove_file(raw.join(f));
        }
        make();
        let _ = std::fs::remove_dir_all(dir.join("artifacts"));
        let err = fails(&dir, &["run", "-q"]);
        assert!(err.contains(want), "{what}: wanted `{want}` in:\n{err}");
        assert!(!err.contains("panicked"), "{what} panicked:\n{err}");
        assert!(artifacts_of(&dir, "ingest").is_empty(), "{what}: an artifact was written");
        // Skip mode quarantines the file and ingests the rest.
        let out = run(&dir, &["run", "-q", "-P", "ingest.on_error=skip"]);
        assert!(out.status.success(), "{what} with skip: {}", String::from_utf8_lossy(&out.stderr));
        let a = artifacts_of(&dir, "ingest").pop().unwrap();
        let q = read_parquet(&a.join("quarantine.parquet")).unwrap();
        assert_eq!(q.height(), 1, "{what}: quarantine has {} rows", q.height());
        let m = liverseg_engine::store::read_manifest(&a.join("manifest.json")).unwrap();
        assert_eq!(m.metrics["quarantined"], 1);
        assert_eq!(m.metrics["cases"], 3);
    }

    // An empty folder.
    let empty = project("data_empty", "data: {source: nifti, root: raw}\nstages:\n  ingest: {}\n");
    std::fs::create_dir_all(empty.join("raw")).unwrap();
    let err = fails(&empty, &["run", "-q"]);
    assert!(err.contains("no input files found"), "{err}");
    // A 2D non-image file among the images.
    let d2 = project("data_2d_bad", "data: {source: slices2d, root: raw}\nstages:\n  ingest: {}\n");
    std::fs::create_dir_all(d2.join("raw/images")).unwrap();
    std::fs::create_dir_all(d2.join("raw/masks")).unwrap();
    std::fs::write(d2.join("raw/images/flipped_1_1.jpg"), b"not a jpeg").unwrap();
    std::fs::write(d2.join("raw/masks/flipped_1_1.jpg"), b"not a jpeg").unwrap();
    let err = fails(&d2, &["run", "-q"]);
    assert!(err.contains("flipped_1_1.jpg: not a decodable PNG/JPEG image"), "{err}");
}

/// The NIfTI layouts ingest reads: LiTS (`volume-N` beside `segmentation-N`),
/// MSD (`imagesTr/X` with `labelsTr/X`) and nnU-Net (`imagesTr/X_0000` with
/// `labelsTr/X`; another channel is named, not read). Each gives the same cases.
#[test]
fn lits_msd_and_nnunet_layouts_pair_images_with_masks() {
    let dir = project("data_layouts", "data: {source: nifti, root: lits}\nstages:\n  ingest: {}\n");
    ok(&dir, &["synth", "lits", "--cases", "2", "--size", "32", "--slices", "4"]);
    for (layout, image_name) in [("msd", "liver_{n}.nii.gz"), ("nnunet", "liver_{n}_0000.nii.gz")] {
        std::fs::create_dir_all(dir.join(layout).join("imagesTr")).unwrap();
        std::fs::create_dir_all(dir.join(layout).join("labelsTr")).unwrap();
        for n in 0..2 {
            std::fs::copy(dir.join(format!("lits/volume-{n}.nii.gz")), dir.join(layout).join("imagesTr").join(image_name.replace("{n}", &n.to_string()))).unwrap();
            std::fs::copy(dir.join(format!("lits/segmentation-{n}.nii.gz")), dir.join(layout).join(format!("labelsTr/liver_{n}.nii.gz"))).unwrap();
        }
    }
    let cases = |root: &str| {
        let out = run(&dir, &["run", "-q", "-P", &format!("data.root={root}")]);
        assert!(out.status.success(), "{root}: {}", String::from_utf8_lossy(&out.stderr));
        let ingest = ok(&dir, &["path", "ingest", "-P", &format!("data.root={root}")]);
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(ingest.trim()).join("manifest.json")).unwrap()).unwrap();
        (manifest["metrics"]["cases"].as_u64(), manifest["metrics"]["quarantined"].as_u64().unwrap_or(0))
    };
    assert_eq!(cases("lits"), (Some(2), 0));
    assert_eq!(cases("msd"), (Some(2), 0));
    assert_eq!(cases("nnunet"), (Some(2), 0));
    // A second channel is not a case: ingest says which file and why.
    std::fs::copy(dir.join("lits/volume-0.nii.gz"), dir.join("nnunet/imagesTr/liver_0_0001.nii.gz")).unwrap();
    let out = run(&dir, &["run", "-P", "data.root=nnunet"]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("liver_0_0001.nii.gz") && said.contains("channel 1 of nnU-Net case `liver_0`"), "{said}");
}
