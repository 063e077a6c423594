//! A corpus of malformed inputs, generated here at test time (no binary junk
//! is committed). For each case: the exit code, that the message names the
//! file, that nothing half-written is left in the store, and (with
//! `ingest.on_error: skip`) what is quarantined and what is kept.

mod common;
use common::*;
use liverseg_engine::tables::read_parquet;
use liverseg_imaging::nifti;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// What a case must do: fail naming `names` (or, `Ok`, go through), and
/// under `skip` quarantine `quarantined` files and keep `cases` cases and
/// `slices` slices.
struct Expect {
    fails: Option<&'static str>,
    quarantined: usize,
    cases: u64,
    slices: u64,
}

/// Address space for every corpus run, as `ulimit -v 8000000` (KiB): a
/// declared size that is not checked aborts on allocation under it.
const ADDRESS_SPACE: u64 = 8_000_000 * 1024;

/// liverseg in `dir` under the address-space limit (as `user`, when given).
fn limited(dir: &Path, args: &[&str], as_user: Option<&str>) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = match as_user {
        Some(u) => {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin());
            c
        }
        None => std::process::Command::new(bin()),
    };
    cmd.args(args).current_dir(dir);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: ADDRESS_SPACE, rlim_max: ADDRESS_SPACE };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// Neither a panic (exit 101) nor an abort (a signal, as on a failed allocation).
fn no_panic_or_abort(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && out.status.code().is_some_and(|c| c != 101), "{what} panicked or aborted ({}):\n{err}", out.status);
}

fn nothing_half_written(dir: &Path, what: &str) {
    assert!(artifacts_of(dir, "ingest").is_empty(), "{what}: an ingest artifact was written");
    let tmp = dir.join("artifacts/.tmp");
    assert!(!tmp.exists() || std::fs::read_dir(&tmp).unwrap().next().is_none(), "{what}: a build was left in .tmp");
}

/// Run one case both ways: `fail` (the default) and `skip`.
fn check(dir: &Path, what: &str, e: &Expect, as_user: Option<&str>) {
    let _ = std::fs::remove_dir_all(dir.join("artifacts"));
    let run = |args: &[&str]| limited(dir, args, as_user);
    let out = run(&["run", "-q"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    no_panic_or_abort(&out, what);
    match e.fails {
        Some(name) => {
            assert!(!out.status.success(), "{what}: should have failed");
            assert_eq!(out.status.code(), Some(1), "{what}: exit code");
            assert!(err.contains(name), "{what}: the error does not name `{name}`:\n{err}");
            nothing_half_written(dir, what);
        }
        None => assert!(out.status.success(), "{what}: {err}"),
    }
    let _ = std::fs::remove_dir_all(dir.join("artifacts"));
    let out = run(&["run", "-q", "-P", "ingest.on_error=skip"]);
    no_panic_or_abort(&out, what);
    assert!(out.status.success(), "{what} with skip: {}", String::from_utf8_lossy(&out.stderr));
    let a = artifacts_of(dir, "ingest").pop().unwrap();
    let q = read_parquet(&a.join("quarantine.parquet")).unwrap();
    let files: Vec<String> = q.column("file").unwrap().str().unwrap().iter().map(|v| v.unwrap().to_owned()).collect();
    assert_eq!(q.height(), e.quarantined, "{what}: quarantined {files:?}");
    if let Some(name) = e.fails {
        let reasons: Vec<String> = q.column("reason").unwrap().str().unwrap().iter().map(|v| v.unwrap().to_owned()).collect();
        assert!(files.iter().chain(&reasons).any(|f| f.contains(name)), "{what}: quarantine does not name `{name}`: {files:?} {reasons:?}");
    }
    let m = liverseg_engine::store::read_manifest(&a.join("manifest.json")).unwrap();
    assert_eq!((m.metrics["cases"].as_u64(), m.metrics["slices"].as_u64()), (Some(e.cases), Some(e.slices)), "{what}: kept");
}

type Make = Box<dyn Fn(&Path)>;

fn nifti_cases(good: &nifti::NiftiFile) -> Vec<(&'static str, Make, Expect)> {
    let hu: Vec<i16> = good.volume.data.iter().map(|&v| v as i16).collect();
    let (dims, affine, header) = (good.volume.dims, good.volume.affine, good.header.clone());
    let write = move |raw: &Path, name: &str, data: nifti::VoxelData| nifti::write_u8_or_i16(&raw.join(name), dims, &affine, data, None).unwrap();
    let seg = |raw: &Path, name: &str| {
        std::fs::copy(raw.join("segmentation-0.nii.gz"), raw.join(name)).unwrap();
    };
    let float_volume = move |raw: &Path, value: f32, at: usize| {
        // A float32 volume of `value` at voxel `at`, zero elsewhere.
        let mut h = header.clone();
        h[70..72].copy_from_slice(&16i16.to_le_bytes());
        h[72..74].copy_from_slice(&32i16.to_le_bytes());
        h[108..112].copy_from_slice(&352f32.to_le_bytes());
        let mut bytes = h;
        bytes.extend_from_slice(&[0u8; 4]);
        for i in 0..dims.iter().product::<usize>() {
            bytes.extend_from_slice(&(if i == at { value } else { 0.0f32 }).to_le_bytes());
        }
        std::fs::write(raw.join("volume-9.nii"), bytes).unwrap();
    };
    let (hu1, hu2, hu3, hu4, hu5) = (hu.clone(), hu.clone(), hu.clone(), hu.clone(), hu);
    let header_of = {
        let header = good.header.clone();
        move |dims: [i16; 3], datatype: i16, vox_offset: f32| {
            let mut h = header.clone();
            for (i, d) in dims.iter().enumerate() {
                h[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
            }
            h[70..72].copy_from_slice(&datatype.to_le_bytes());
            h[108..112].copy_from_slice(&vox_offset.to_le_bytes());
            h
        }
    };
    let header_of2 = header_of.clone();
    let fv = float_volume.clone();
    vec![
        (
            "truncated",
            Box::new(move |raw: &Path| {
                let b = std::fs::read(raw.join("volume-0.nii.gz")).unwrap();
                std::fs::write(raw.join("volume-9.nii.gz"), &b[..b.len() / 2]).unwrap();
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: Some("volume-9.nii.gz"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "lying header",
            Box::new(move |raw: &Path| {
                // The header claims twice the slices the data holds.
                write(raw, "volume-9.nii", nifti::VoxelData::I16(&hu1));
                let mut b = std::fs::read(raw.join("volume-9.nii")).unwrap();
                b[46..48].copy_from_slice(&8i16.to_le_bytes());
                std::fs::write(raw.join("volume-9.nii"), b).unwrap();
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: Some("volume-9.nii"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "nan",
            Box::new(move |raw: &Path| {
                fv(raw, f32::NAN, 5);
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: Some("volume-9.nii: voxel 5 is NaN"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "label out of range",
            Box::new(move |raw: &Path| {
                write(raw, "volume-9.nii", nifti::VoxelData::I16(&hu2));
                write(raw, "segmentation-9.nii", nifti::VoxelData::U8(&vec![7u8; dims.iter().product()]));
            }),
            Expect { fails: Some("segmentation-9.nii: label 7 is outside the label map"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "shape mismatch",
            Box::new(move |raw: &Path| {
                write(raw, "volume-9.nii", nifti::VoxelData::I16(&hu3));
                nifti::write_u8_or_i16(&raw.join("segmentation-9.nii"), [32, 32, 3], &affine, nifti::VoxelData::U8(&vec![0u8; 32 * 32 * 3]), None).unwrap();
            }),
            Expect { fails: Some("segmentation-9.nii: image is [32, 32, 4] voxels but mask is [32, 32, 3]"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "zero bytes",
            Box::new(move |raw: &Path| {
                std::fs::write(raw.join("volume-9.nii"), b"").unwrap();
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: Some("volume-9.nii"), quarantined: 1, cases: 2, slices: 8 },
        ),
        ("text as nifti", Box::new(|raw: &Path| std::fs::write(raw.join("notes.nii"), b"these are notes").unwrap()), Expect { fails: Some("notes.nii"), quarantined: 1, cases: 2, slices: 8 }),
        (
            "missing mask",
            Box::new(move |raw: &Path| write(raw, "volume-9.nii", nifti::VoxelData::I16(&hu_for(dims)))),
            Expect { fails: Some("volume-9.nii: missing mask"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "vox_offset 1e30",
            Box::new(move |raw: &Path| {
                let mut b = header_of(dims.map(|d| d as i16), 4, 1e30);
                b.resize(352 + 2 * dims.iter().product::<usize>(), 0);
                std::fs::write(raw.join("volume-9.nii"), b).unwrap();
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: Some("volume-9.nii: vox_offset 1000000000000000000000000000000 is not a plausible byte offset"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "gzip bomb: a header declaring 3 GiB, and a stream that inflates to it",
            Box::new(move |raw: &Path| {
                use std::io::Write;
                // One gzip member of 32 MiB of zeros (about 32 KiB), repeated:
                // MultiGzDecoder would inflate all 96 of them.
                let mut first = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                first.write_all(&header_of2([2048, 2048, 384], 4, 352.0)).unwrap();
                first.write_all(&[0u8; 4]).unwrap();
                let mut zeros = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                zeros.write_all(&vec![0u8; 32 << 20]).unwrap();
                let zeros = zeros.finish().unwrap();
                let mut file = first.finish().unwrap();
                for _ in 0..96 {
                    file.extend_from_slice(&zeros);
                }
                std::fs::write(raw.join("volume-9.nii.gz"), file).unwrap();
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: Some("volume-9.nii.gz: the header declares 2048×2048×384 voxels of 2 bytes (3072 MiB); volumes over 1024 MiB are refused"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "mask with a mirrored affine",
            Box::new(move |raw: &Path| {
                write(raw, "volume-9.nii", nifti::VoxelData::I16(&hu4));
                let mut mirrored = affine;
                mirrored[0][0] = -mirrored[0][0];
                nifti::write_u8_or_i16(&raw.join("segmentation-9.nii"), dims, &mirrored, nifti::VoxelData::U8(&vec![0u8; dims.iter().product()]), None).unwrap();
            }),
            Expect { fails: Some("segmentation-9.nii: its affine differs from the image's at row 0, column 0"), quarantined: 1, cases: 2, slices: 8 },
        ),
        (
            "two files for one case id",
            Box::new(move |raw: &Path| {
                write(raw, "volume-1.nii", nifti::VoxelData::I16(&hu5));
            }),
            Expect { fails: Some("case id `1` is given by 2 files (volume-1.nii, volume-1.nii.gz)"), quarantined: 2, cases: 1, slices: 4 },
        ),
        (
            "out-of-range floats are kept and counted",
            Box::new(move |raw: &Path| {
                float_volume(raw, 1e9, 3);
                seg(raw, "segmentation-9.nii.gz");
            }),
            Expect { fails: None, quarantined: 0, cases: 3, slices: 12 },
        ),
        (
            "a symlinked volume is read",
            Box::new(|raw: &Path| {
                std::os::unix::fs::symlink(raw.join("volume-0.nii.gz"), raw.join("volume-9.nii.gz")).unwrap();
                std::os::unix::fs::symlink(raw.join("segmentation-0.nii.gz"), raw.join("segmentation-9.nii.gz")).unwrap();
            }),
            Expect { fails: None, quarantined: 0, cases: 3, slices: 12 },
        ),
        ("symlink loop", Box::new(|raw: &Path| std::os::unix::fs::symlink(raw, raw.join("loop")).unwrap()), Expect { fails: Some("loop"), quarantined: 1, cases: 2, slices: 8 }),
        (
            "non-UTF-8 names",
            Box::new(|raw: &Path| {
                let name = |s: &[u8]| raw.join(std::ffi::OsString::from_vec(s.to_vec()));
                std::fs::copy(raw.join("volume-0.nii.gz"), name(b"volume-9\xff.nii.gz")).unwrap();
                std::fs::copy(raw.join("segmentation-0.nii.gz"), name(b"segmentation-9\xff.nii.gz")).unwrap();
            }),
            Expect { fails: None, quarantined: 0, cases: 3, slices: 12 },
        ),
    ]
}

fn hu_for(dims: [usize; 3]) -> Vec<i16> {
    vec![40; dims.iter().product()]
}

#[test]
fn malformed_nifti_inputs() {
    let dir = project("corpus_nifti", "data: {source: nifti, root: raw}\nstages:\n  ingest: {}\n");
    let raw = dir.join("raw");
    ok(&dir, &["synth", "raw", "--cases", "2", "--size", "32", "--slices", "4"]);
    let good = nifti::read(&raw.join("volume-0.nii.gz")).unwrap();
    let originals: Vec<PathBuf> = std::fs::read_dir(&raw).unwrap().map(|e| e.unwrap().path()).collect();
    for (what, make, expect) in nifti_cases(&good) {
        for e in std::fs::read_dir(&raw).unwrap().flatten() {
            if !originals.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        make(&raw);
        check(&dir, what, &expect, None);
    }
    // The clipped voxel was counted, and said so.
    let _ = std::fs::remove_dir_all(dir.join("artifacts"));
    for e in std::fs::read_dir(&raw).unwrap().flatten() {
        if !originals.contains(&e.path()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// 2D pairs: a patient of four 32×32 slices plus whatever the case adds.
fn write_png(path: &Path, img: image::DynamicImage) {
    img.save(path).unwrap();
}

fn grey(w: u32, h: u32, v: u8) -> image::DynamicImage {
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(w, h, image::Luma([v])))
}

fn slices2d_cases() -> Vec<(&'static str, Make, Expect)> {
    vec![
        (
            "text as png",
            Box::new(|raw: &Path| {
                std::fs::write(raw.join("images/flipped_2_5.png"), b"not a png").unwrap();
                write_png(&raw.join("masks/flipped_2_5.png"), grey(32, 32, 0));
            }),
            Expect { fails: Some("flipped_2_5.png: not a decodable PNG/JPEG image"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "truncated jpeg",
            Box::new(|raw: &Path| {
                let mut jpeg = Vec::new();
                grey(32, 32, 90).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
                std::fs::write(raw.join("images/flipped_1_9.jpg"), &jpeg[..jpeg.len() * 2 / 3]).unwrap();
                write_png(&raw.join("masks/flipped_1_9.jpg.png"), grey(32, 32, 0));
                std::fs::rename(raw.join("masks/flipped_1_9.jpg.png"), raw.join("masks/flipped_1_9.jpg")).unwrap();
            }),
            Expect { fails: Some("flipped_1_9.jpg: not a decodable PNG/JPEG image (truncated JPEG"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "png mask of labels 0 and 1",
            Box::new(|raw: &Path| {
                write_png(&raw.join("images/flipped_1_9.png"), grey(32, 32, 90));
                let mut m = image::GrayImage::new(32, 32);
                m.put_pixel(5, 5, image::Luma([1]));
                write_png(&raw.join("masks/flipped_1_9.png"), image::DynamicImage::ImageLuma8(m));
            }),
            Expect { fails: Some("flipped_1_9.png: a label map (pixel values 0 and 1 only)"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "zero-byte image",
            Box::new(|raw: &Path| {
                std::fs::write(raw.join("images/flipped_1_9.png"), b"").unwrap();
                write_png(&raw.join("masks/flipped_1_9.png"), grey(32, 32, 0));
            }),
            Expect { fails: Some("flipped_1_9.png"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "one 1x1 slice among 32x32 ones costs that slice",
            Box::new(|raw: &Path| {
                write_png(&raw.join("images/flipped_1_00.png"), grey(1, 1, 9));
                write_png(&raw.join("masks/flipped_1_00.png"), grey(1, 1, 0));
            }),
            Expect { fails: Some("flipped_1_00.png: 1×1 pixels, most slices of patient 1 are 32×32"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "16-bit png",
            Box::new(|raw: &Path| {
                write_png(&raw.join("images/flipped_1_9.png"), image::DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(32, 32, image::Luma([4000u16]))));
                write_png(&raw.join("masks/flipped_1_9.png"), grey(32, 32, 0));
            }),
            Expect { fails: Some("flipped_1_9.png: a L16 image"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "colour png",
            Box::new(|raw: &Path| {
                write_png(&raw.join("images/flipped_1_9.png"), image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]))));
                write_png(&raw.join("masks/flipped_1_9.png"), grey(32, 32, 0));
            }),
            Expect { fails: Some("flipped_1_9.png: a colour image"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "grey stored as rgb is read",
            Box::new(|raw: &Path| {
                write_png(&raw.join("images/flipped_1_9.png"), image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(32, 32, image::Rgb([90, 90, 90]))));
                write_png(&raw.join("masks/flipped_1_9.png"), grey(32, 32, 0));
            }),
            Expect { fails: None, quarantined: 0, cases: 1, slices: 5 },
        ),
        (
            "mask without an image",
            Box::new(|raw: &Path| write_png(&raw.join("masks/flipped_1_7.png"), grey(32, 32, 0))),
            Expect { fails: Some("masks/flipped_1_7.png"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "a folder named like an image",
            Box::new(|raw: &Path| std::fs::create_dir_all(raw.join("images/flipped_1_8.png")).unwrap()),
            Expect { fails: Some("images/flipped_1_8.png"), quarantined: 1, cases: 1, slices: 4 },
        ),
        (
            "symlinked images are read",
            Box::new(|raw: &Path| {
                std::os::unix::fs::symlink(raw.join("images/flipped_1_1.png"), raw.join("images/mirrored_1_1.png")).unwrap();
                std::os::unix::fs::symlink(raw.join("masks/flipped_1_1.png"), raw.join("masks/mirrored_1_1.png")).unwrap();
            }),
            Expect { fails: None, quarantined: 0, cases: 1, slices: 5 },
        ),
    ]
}

fn fresh_slices(raw: &Path) {
    let _ = std::fs::remove_dir_all(raw);
    std::fs::create_dir_all(raw.join("images")).unwrap();
    std::fs::create_dir_all(raw.join("masks")).unwrap();
    for k in 0..4 {
        write_png(&raw.join(format!("images/flipped_1_{k}.png")), grey(32, 32, 60 + k as u8));
        let mut m = image::GrayImage::new(32, 32);
        for y in 8..20 {
            for x in 8..20 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        write_png(&raw.join(format!("masks/flipped_1_{k}.png")), image::DynamicImage::ImageLuma8(m));
    }
}

#[test]
fn malformed_2d_inputs() {
    let dir = project("corpus_2d", "data: {source: slices2d, root: raw}\nstages:\n  ingest: {}\n");
    let raw = dir.join("raw");
    for (what, make, expect) in slices2d_cases() {
        fresh_slices(&raw);
        make(&raw);
        check(&dir, what, &expect, None);
    }
}

/// A file its reader may not open (chmod 000) is quarantined under skip, not
/// a failure of the whole run. Run as `nobody` when the test runs as root,
/// who may read anything.
#[test]
fn an_unreadable_file_is_reported() {
    let dir = PathBuf::from("/tmp").join(format!("liverseg-corpus-perm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), "data: {source: slices2d, root: raw}\nstages:\n  ingest: {}\n").unwrap();
    let raw = dir.join("raw");
    fresh_slices(&raw);
    write_png(&raw.join("images/flipped_1_9.png"), grey(32, 32, 7));
    write_png(&raw.join("masks/flipped_1_9.png"), grey(32, 32, 0));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(raw.join("images/flipped_1_9.png"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    let user = if root { Some("nobody") } else { None };
    if root {
        // nobody writes the store and reads the rest.
        let status = std::process::Command::new("chmod").args(["-R", "a+rwX"]).arg(&dir).status().unwrap();
        assert!(status.success());
        std::fs::set_permissions(raw.join("images/flipped_1_9.png"), std::fs::Permissions::from_mode(0o000)).unwrap();
        // The binary itself must be reachable by nobody (not so in a checkout
        // under a private folder such as mktemp's).
        if std::process::Command::new("runuser").args(["-u", "nobody", "--"]).arg(bin()).arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
            eprintln!("SKIPPED unreadable-file case: nobody cannot run {} here", bin().display());
            return;
        }
    }
    check(&dir, "chmod 000", &Expect { fails: Some("flipped_1_9.png"), quarantined: 1, cases: 1, slices: 4 }, user);
    let _ = std::fs::remove_dir_all(&dir);
}

/// DICOM series edited file by file from the shared TotalSegmentator
/// series: each bad file is named with its reason, never a panic.
#[test]
fn malformed_dicom_series() {
    let Some(shared) = shared_data() else { return };
    let source = shared.join("formats/totalsegmentator");
    let dir = project("corpus_dicom", "data: {source: dicom, root: raw, liver_labels: [5], max_label: 117, dicom_pairs: [{series: ct, mask: seg.nii.gz}]}\nstages:\n  ingest: {}\n");
    let raw = dir.join("raw");
    type Edit = fn(&mut dicom_object::FileDicomObject<dicom_object::InMemDicomObject>);
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::Tag;
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("rows 0", "Rows × Columns is 0×0", |o| {
            o.put(DataElement::new(Tag(0x0028, 0x0010), VR::US, PrimitiveValue::from(0u16)));
            o.put(DataElement::new(Tag(0x0028, 0x0011), VR::US, PrimitiveValue::from(0u16)));
        }),
        ("rescale slope 0", "RescaleSlope is 0", |o| {
            o.put(DataElement::new(Tag(0x0028, 0x1053), VR::DS, PrimitiveValue::from("0")));
        }),
        ("multi-frame", "a multi-frame object (2 frames)", |o| {
            o.put(DataElement::new(Tag(0x0028, 0x0008), VR::IS, PrimitiveValue::from("2")));
        }),
        ("no pixel data", "missing PixelData", |o| {
            o.remove_element(Tag(0x7FE0, 0x0010));
        }),
    ];
    let files = || {
        let mut f: Vec<PathBuf> = std::fs::read_dir(raw.join("ct")).unwrap().map(|e| e.unwrap().path()).collect();
        f.sort();
        f
    };
    let fresh = || {
        let _ = std::fs::remove_dir_all(&raw);
        std::fs::create_dir_all(raw.join("ct")).unwrap();
        for e in std::fs::read_dir(source.join("example_ct_dicom")).unwrap().flatten() {
            std::fs::copy(e.path(), raw.join("ct").join(e.file_name())).unwrap();
        }
        std::fs::copy(source.join("example_seg_dicom.nii.gz"), raw.join("seg.nii.gz")).unwrap();
    };
    let expect_failure = |what: &str, file: &str, reason: &str| {
        let _ = std::fs::remove_dir_all(dir.join("artifacts"));
        let out = limited(&dir, &["run", "-q"], None);
        no_panic_or_abort(&out, what);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(file) && err.contains(reason), "{what}: the error does not name {file} and `{reason}`:\n{err}");
        nothing_half_written(&dir, what);
    };
    fresh();
    let out = limited(&dir, &["run", "-q"], None);
    assert!(out.status.success(), "the unedited series: {}", String::from_utf8_lossy(&out.stderr));
    for (what, reason, edit) in cases {
        fresh();
        let victim = files()[10].clone();
        let mut obj = dicom_object::open_file(&victim).unwrap();
        edit(&mut obj);
        obj.write_to_file(&victim).unwrap();
        expect_failure(what, &victim.file_name().unwrap().to_string_lossy(), reason);
    }
    // Two series in one folder: the last five files get another SeriesInstanceUID.
    fresh();
    for f in files().iter().rev().take(5) {
        let mut obj = dicom_object::open_file(f).unwrap();
        obj.put(DataElement::new(Tag(0x0020, 0x000E), VR::UI, PrimitiveValue::from("1.2.826.0.1.3680043.8.498.1")));
        obj.write_to_file(f).unwrap();
    }
    expect_failure("two series", "ct", "holds 2 DICOM series");
}

/// Params whose size would exhaust memory, a negative learning rate and a
/// negative thread count are refused when the pipeline loads, naming the key.
#[test]
fn bad_params_are_refused_before_anything_runs() {
    let pipeline = format!("{DATA_PIPELINE}  train:\n    deps: [normalise, split, augment]\n  evaluate:\n    deps: [ingest, normalise, split, train]\n");
    let dir = project("corpus_params", &pipeline);
    for (set, want) in [
        ("normalise.size=1000000", "size must be a positive multiple of 16 (DeepLabV3+ has output stride 16) up to 1024"),
        ("augment.copies=100000000", "copies must be at most 100"),
        ("data.synthetic_size=0", "data.synthetic_size must be 16 to 1024 (got 0)"),
        ("data.synthetic_size=100000", "data.synthetic_size must be 16 to 1024 (got 100000)"),
        ("train.lr=-0.001", "lr must be a positive number"),
        ("evaluate.threads=-2", "threads must be 0 (the allocation) or a positive count, got -2"),
        ("train.threads=-1", "threads must be 0 (the allocation) or a positive count, got -1"),
    ] {
        let out = limited(&dir, &["run", "-q", "-P", set], None);
        no_panic_or_abort(&out, set);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{set}: {err}");
        assert!(err.contains(want), "{set}: wanted `{want}` in:\n{err}");
        assert!(!dir.join("artifacts/ingest").exists(), "{set}: something ran");
    }
}
