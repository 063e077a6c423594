//! DICOM Segmentation objects (binary SEG): how hospitals store a mask in
//! PACS, read by 3D Slicer, OHIF and highdicom. One segment, "Liver", with
//! its SNOMED CT codes; one frame per source slice, each referencing its
//! source image; the source series' study, patient and frame of reference.

use super::dicom::SeriesInfo;
use anyhow::{anyhow, bail, Result};
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use std::path::Path;

const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// A UID from a seed: `2.25.` and 128 bits of the seed's blake3, so the same
/// mask of the same series gets the same UIDs.
pub fn uid(seed: &str) -> String {
    let h = blake3::hash(seed.as_bytes());
    let v = u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"));
    format!("2.25.{}", v >> 1)
}

fn el(tag: (u16, u16), vr: VR, v: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(Tag(tag.0, tag.1), vr, v.into())
}

fn seq(tag: (u16, u16), items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(Tag(tag.0, tag.1), VR::SQ, DataSetSequence::from(items))
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A coded concept: (0008,0100) value, (0008,0102) scheme, (0008,0104) meaning.
fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    item(vec![el((0x0008, 0x0100), VR::SH, value), el((0x0008, 0x0102), VR::SH, scheme), el((0x0008, 0x0104), VR::LO, meaning)])
}

fn ds(v: f64) -> String {
    // DS allows 16 characters.
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.len() > 16 {
        format!("{v:.4e}")
    } else {
        s.to_owned()
    }
}

/// What a SEG needs besides the source series.
pub struct Seg<'a> {
    pub series: &'a SeriesInfo,
    pub rows: usize,
    pub cols: usize,
    /// [frames, rows, cols] 0/1, frame k over source slice k.
    pub mask: &'a [u8],
    /// Seeds the new UIDs (the model's key and the series, say).
    pub seed: &'a str,
    pub software: &'a str,
    /// SegmentAlgorithmName: the tool and the model that made the mask
    /// (`liverseg 0.1.0 model <key>`), so the object names its provenance.
    pub algorithm: &'a str,
}

/// Write `seg` as a binary DICOM Segmentation to `path`.
pub fn write(seg: &Seg, path: &Path) -> Result<()> {
    let n = seg.series.slices.len();
    if seg.mask.len() != n * seg.rows * seg.cols {
        bail!("{}: a mask of {} pixels for {n} frames of {}×{}", path.display(), seg.mask.len(), seg.rows, seg.cols);
    }
    if let Some(k) = seg.series.slices.iter().position(|s| s.sop_instance_uid.is_empty()) {
        bail!("{}: source slice {k} has no SOPInstanceUID, so a SEG cannot reference it", path.display());
    }
    let source_series = source_uid(seg, 0x000E);
    let (sop, series_uid, dim_uid) = (uid(&format!("{}/sop", seg.seed)), uid(&format!("{}/series", seg.seed)), uid(&format!("{}/dimensions", seg.seed)));
    let mut obj = InMemDicomObject::new_empty();
    let study = (Tag(STUDY_INSTANCE_UID.0, STUDY_INSTANCE_UID.1), source_uid(seg, STUDY_INSTANCE_UID.1));
    let attributes = seg.series.attributes.iter().filter(|(t, _)| t.0 != 0x0020 || (t.1 != 0x000D && t.1 != 0x000E)).chain([&study]);
    for (tag, value) in attributes {
        let vr = match (tag.0, tag.1) {
            (0x0008, 0x0020) | (0x0010, 0x0030) => VR::DA,
            (0x0008, 0x0030) => VR::TM,
            (0x0008, 0x0090) | (0x0010, 0x0010) => VR::PN,
            (0x0008, 0x0050) | (0x0020, 0x0010) => VR::SH,
            (0x0010, 0x0040) => VR::CS,
            (0x0010, 0x0020) => VR::LO,
            _ => VR::UI,
        };
        obj.put(DataElement::new(*tag, vr, PrimitiveValue::from(value.as_str())));
    }
    for e in header(seg, &sop, &series_uid, n) {
        obj.put(e);
    }
    for e in geometry(seg, &dim_uid, &source_series) {
        obj.put(e);
    }
    obj.put(seq((0x0062, 0x0002), vec![segment(seg.algorithm)]));
    obj.put(seq((0x5200, 0x9230), (0..n).map(|k| frame(seg, k)).collect()));
    obj.put(el((0x7FE0, 0x0010), VR::OB, pack_bits(seg.mask)));
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(EXPLICIT_VR_LE)
        .media_storage_sop_class_uid(SEGMENTATION_STORAGE)
        .media_storage_sop_instance_uid(sop.as_str())
        .implementation_class_uid(uid("liverseg implementation").as_str());
    let file = obj.with_meta(meta).map_err(|e| anyhow!("{}: cannot build the DICOM meta group: {e}", path.display()))?;
    file.write_to_file(path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

const STUDY_INSTANCE_UID: (u16, u16) = (0x0020, 0x000D);

/// The source's StudyInstanceUID (`element` 0x000D) or SeriesInstanceUID
/// (0x000E); where an anonymiser blanked it, a UID made from the seed, as a
/// SEG must name both (see [`missing_uids`]).
fn source_uid(seg: &Seg, element: u16) -> String {
    let given = seg.series.attributes.iter().find(|(t, _)| *t == Tag(0x0020, element)).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    given.unwrap_or_else(|| uid(&format!("{}/source {element:04x}", seg.seed)))
}

/// The source series' identifying UIDs that are empty (and so made up in
/// the SEG, which then cannot be filed with its images in a PACS).
pub fn missing_uids(series: &SeriesInfo) -> Vec<&'static str> {
    let empty = |e: u16| !series.attributes.iter().any(|(t, v)| *t == Tag(0x0020, e) && !v.is_empty());
    let out: Vec<&str> = [(0x000D, "StudyInstanceUID"), (0x000E, "SeriesInstanceUID")].into_iter().filter(|(e, _)| empty(*e)).map(|(_, n)| n).collect();
    out
}

/// Identity, equipment and image pixel attributes.
fn header(seg: &Seg, sop: &str, series_uid: &str, n: usize) -> Vec<DataElement<InMemDicomObject>> {
    let date = seg.series.attributes.iter().find(|(t, _)| *t == Tag(0x0008, 0x0020)).map(|(_, v)| v.clone()).unwrap_or_default();
    let time = seg.series.attributes.iter().find(|(t, _)| *t == Tag(0x0008, 0x0030)).map(|(_, v)| v.clone()).unwrap_or_default();
    vec![
        el((0x0008, 0x0008), VR::CS, PrimitiveValue::Strs(["DERIVED".to_owned(), "PRIMARY".to_owned()].into_iter().collect())),
        el((0x0008, 0x0016), VR::UI, SEGMENTATION_STORAGE),
        el((0x0008, 0x0018), VR::UI, sop),
        el((0x0008, 0x0023), VR::DA, date.as_str()),
        el((0x0008, 0x0033), VR::TM, time.as_str()),
        el((0x0008, 0x0060), VR::CS, "SEG"),
        el((0x0008, 0x0070), VR::LO, "liverseg"),
        el((0x0008, 0x103E), VR::LO, "Liver segmentation (liverseg)"),
        el((0x0008, 0x1090), VR::LO, "liverseg"),
        el((0x0018, 0x1000), VR::LO, "1"),
        el((0x0018, 0x1020), VR::LO, seg.software),
        el((0x0020, 0x000E), VR::UI, series_uid),
        el((0x0020, 0x0011), VR::IS, "300"),
        el((0x0020, 0x0013), VR::IS, "1"),
        el((0x0028, 0x0002), VR::US, 1u16),
        el((0x0028, 0x0004), VR::CS, "MONOCHROME2"),
        el((0x0028, 0x0008), VR::IS, n.to_string().as_str()),
        el((0x0028, 0x0010), VR::US, seg.rows as u16),
        el((0x0028, 0x0011), VR::US, seg.cols as u16),
        el((0x0028, 0x0100), VR::US, 1u16),
        el((0x0028, 0x0101), VR::US, 1u16),
        el((0x0028, 0x0102), VR::US, 0u16),
        el((0x0028, 0x0103), VR::US, 0u16),
        el((0x0028, 0x2110), VR::CS, "00"),
        el((0x0062, 0x0001), VR::CS, "BINARY"),
        el((0x0070, 0x0080), VR::CS, "LIVER"),
        el((0x0070, 0x0081), VR::LO, "Liver segmented by a liverseg model"),
        el((0x0070, 0x0084), VR::PN, "liverseg"),
    ]
}

/// Dimensions, the shared pixel measures and orientation, and the source series.
fn geometry(seg: &Seg, dim_uid: &str, source_series: &str) -> Vec<DataElement<InMemDicomObject>> {
    let s = seg.series;
    let o = s.orientation.map(ds).join("\\");
    let dimension = |pointer: (u16, u16), group: (u16, u16), label: &str| {
        item(vec![
            el((0x0020, 0x9164), VR::UI, dim_uid),
            el((0x0020, 0x9165), VR::AT, PrimitiveValue::Tags([Tag(pointer.0, pointer.1)].into_iter().collect())),
            el((0x0020, 0x9167), VR::AT, PrimitiveValue::Tags([Tag(group.0, group.1)].into_iter().collect())),
            el((0x0020, 0x9421), VR::LO, label),
        ])
    };
    let shared = item(vec![
        seq(
            (0x0028, 0x9110),
            vec![item(vec![
                el((0x0028, 0x0030), VR::DS, format!("{}\\{}", ds(s.pixel_spacing[0]), ds(s.pixel_spacing[1])).as_str()),
                el((0x0018, 0x0050), VR::DS, ds(s.spacing_between_slices).as_str()),
                el((0x0018, 0x0088), VR::DS, ds(s.spacing_between_slices).as_str()),
            ])],
        ),
        seq((0x0020, 0x9116), vec![item(vec![el((0x0020, 0x0037), VR::DS, o.as_str())])]),
    ]);
    let instances: Vec<InMemDicomObject> =
        s.slices.iter().map(|r| item(vec![el((0x0008, 0x1150), VR::UI, r.sop_class_uid.as_str()), el((0x0008, 0x1155), VR::UI, r.sop_instance_uid.as_str())])).collect();
    vec![
        seq((0x0020, 0x9221), vec![item(vec![el((0x0020, 0x9164), VR::UI, dim_uid)])]),
        seq((0x0020, 0x9222), vec![dimension((0x0062, 0x000B), (0x0062, 0x000A), "ReferencedSegmentNumber"), dimension((0x0020, 0x0032), (0x0020, 0x9113), "ImagePositionPatient")]),
        seq((0x5200, 0x9229), vec![shared]),
        seq((0x0008, 0x1115), vec![item(vec![el((0x0020, 0x000E), VR::UI, source_series), seq((0x0008, 0x114A), instances)])]),
    ]
}

/// The one segment: liver, found by an algorithm.
fn segment(algorithm: &str) -> InMemDicomObject {
    item(vec![
        el((0x0062, 0x0004), VR::US, 1u16),
        el((0x0062, 0x0005), VR::LO, "Liver"),
        el((0x0062, 0x0008), VR::CS, "AUTOMATIC"),
        el((0x0062, 0x0009), VR::LO, algorithm.get(..64).unwrap_or(algorithm)),
        seq((0x0062, 0x0003), vec![code("123037004", "SCT", "Anatomical Structure")]),
        seq((0x0062, 0x000F), vec![code("10200004", "SCT", "Liver")]),
        seq((0x0066, 0x002F), vec![code("123109", "DCM", "Artificial Intelligence")]),
    ])
}

/// Frame `k`: its source slice, position and segment.
fn frame(seg: &Seg, k: usize) -> InMemDicomObject {
    let r = &seg.series.slices[k];
    let source = item(vec![
        el((0x0008, 0x1150), VR::UI, r.sop_class_uid.as_str()),
        el((0x0008, 0x1155), VR::UI, r.sop_instance_uid.as_str()),
        seq((0x0040, 0xA170), vec![code("121322", "DCM", "Source image for image processing operation")]),
    ]);
    item(vec![
        seq((0x0008, 0x9124), vec![item(vec![seq((0x0008, 0x2112), vec![source]), seq((0x0008, 0x9215), vec![code("113076", "DCM", "Segmentation")])])]),
        seq((0x0020, 0x9111), vec![item(vec![el((0x0020, 0x9157), VR::UL, PrimitiveValue::U32([1u32, k as u32 + 1].into_iter().collect()))])]),
        seq((0x0020, 0x9113), vec![item(vec![el((0x0020, 0x0032), VR::DS, r.position.map(ds).join("\\").as_str())])]),
        seq((0x0062, 0x000A), vec![item(vec![el((0x0062, 0x000B), VR::US, 1u16)])]),
    ])
}

/// Pixels one bit each, first pixel in the lowest bit, frames back to back,
/// padded to an even length.
fn pack_bits(mask: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; mask.len().div_ceil(8)];
    for (i, &v) in mask.iter().enumerate() {
        if v > 0 {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    if out.len() % 2 == 1 {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn bits_are_packed_lowest_first_and_uids_are_stable() {
        assert_eq!(super::pack_bits(&[1, 0, 0, 0, 0, 0, 0, 1, 1]), vec![0b1000_0001, 1]);
        assert_eq!(super::uid("a"), super::uid("a"));
        assert_ne!(super::uid("a"), super::uid("b"));
        assert!(super::uid("a").len() <= 64);
    }
}
