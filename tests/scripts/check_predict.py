"""Checks `liverseg predict` output against the DICOM series it came from,
with the tools a hospital's pipeline would use (nibabel, pydicom, highdicom).

usage: check_predict.py SERIES_DIR REFERENCE_NIFTI OUT_NIFTI OUT_SEG

- the NIfTI's world grid (affine and shape, in any voxel order) is the
  reference's (a conversion of the same series);
- the SEG reads with pydicom, highdicom accepts it, its referenced SOP
  Instance UIDs are the series' own, and each frame, placed by its
  ImagePositionPatient, equals the NIfTI mask's slice at that position.
Exits non-zero with the reason on any mismatch."""

import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom


def fail(msg):
    print(f"check_predict: {msg}", file=sys.stderr)
    sys.exit(1)


def sop_uid(ds):
    # Anonymised exports blank SOPInstanceUID; the file meta keeps it.
    return ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID


def main(series_dir, reference, out_nifti, out_seg):
    ours = nib.as_closest_canonical(nib.load(out_nifti))
    ref = nib.as_closest_canonical(nib.load(reference))
    if ours.shape != ref.shape or not np.allclose(ours.affine, ref.affine, atol=1e-4):
        fail(f"world grid differs:\n{ours.shape}\n{ours.affine}\nagainst\n{ref.shape}\n{ref.affine}")
    mask = np.asarray(nib.load(out_nifti).dataobj)
    if set(np.unique(mask)) - {0, 1}:
        fail(f"mask values {np.unique(mask)}")

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(series_dir).iterdir()) if p.is_file()]
    own = {sop_uid(d) for d in sources}
    ds = pydicom.dcmread(out_seg)
    seg = hd.seg.Segmentation.from_dataset(ds)
    if seg.get_segment_numbers() != [1] or seg.get_segment_description(1).segment_label != "Liver":
        fail("expected one segment, Liver")
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    if referenced != own:
        fail(f"the SEG references {len(referenced)} instances, {len(referenced & own)} of the series' {len(own)}")
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    if len(frames) != len(sources):
        fail(f"{len(frames)} frames for {len(sources)} slices")

    # Each frame against the NIfTI slice at its position: world (LPS) to voxel.
    img = nib.load(out_nifti)
    inverse = np.linalg.inv(img.affine)
    for k, f in enumerate(ds.PerFrameFunctionalGroupsSequence):
        lps = np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
        ijk = inverse @ np.array([-lps[0], -lps[1], lps[2], 1.0])
        slice_k = int(round(ijk[2]))
        origin = [int(round(v)) for v in ijk[:2]]
        if not np.allclose(ijk[:3], [*origin, slice_k], atol=1e-3) or not 0 <= slice_k < mask.shape[2]:
            fail(f"frame {k} at {lps} is not on a voxel of the NIfTI ({ijk[:3]})")
        # Our NIfTI stores a DICOM slice's columns along x and rows along y.
        if not np.array_equal(frames[k], mask[:, :, slice_k].T):
            fail(f"frame {k} differs from NIfTI slice {slice_k}")
    check_provenance(img, ds, out_nifti)
    print(f"check_predict: grid matches, SEG valid, {len(frames)} frames equal the NIfTI mask ({int(mask.sum())} liver voxels), provenance in all three")


def check_provenance(img, ds, out_nifti):
    """The model key is in the NIfTI's descrip and comment extension, the
    SEG's algorithm name and the sidecar (whose hashes the Rust test checks)."""
    import json
    sidecar = json.loads(Path(str(out_nifti).replace("_liver.nii.gz", "_liver.json")).read_text())
    key = sidecar["models"][0]["train_stage_key"]
    descrip = img.header["descrip"].tobytes().decode().rstrip("\0")
    if key[:16] not in descrip:
        fail(f"NIfTI descrip {descrip!r} lacks the model key {key}")
    comments = [json.loads(e.get_content()) for e in img.header.extensions if e.get_code() == 6]
    if len(comments) != 1 or comments[0]["models"][0]["train_stage_key"] != key:
        fail(f"NIfTI comment extension: {comments}")
    algorithm = ds.SegmentSequence[0].SegmentAlgorithmName
    if key[:16] not in algorithm:
        fail(f"SEG SegmentAlgorithmName {algorithm!r} lacks the model key {key}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        fail(__doc__)
    main(*sys.argv[1:])
