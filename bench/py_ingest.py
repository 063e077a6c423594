"""Straightforward Python reference for ingest + normalise, one process:
read every image/mask pair (Pillow) or NIfTI pair (nibabel), resize to SIZE²
(bilinear image, nearest mask), scale to [0, 1], keep the arrays.

    .venv/bin/python bench/py_ingest.py slices2d DIR 224
    .venv/bin/python bench/py_ingest.py nifti DIR 224
Prints: slices, seconds, slices/s, peak RSS (MiB).
"""
import glob, os, resource, sys, time
import numpy as np

kind, root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
images, masks = [], []
if kind == "slices2d":
    from PIL import Image
    for path in sorted(glob.glob(os.path.join(root, "images", "*"))):
        img = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
        mask = Image.open(os.path.join(root, "masks", os.path.basename(path))).convert("L").resize((size, size), Image.NEAREST)
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
        masks.append((np.asarray(mask) > 127).astype(np.uint8))
else:
    import nibabel as nib
    from PIL import Image
    for path in sorted(glob.glob(os.path.join(root, "volume-*.nii*"))):
        seg = path.replace("volume-", "segmentation-")
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(seg).dataobj)
        for k in range(vol.shape[2]):
            sl = np.clip((vol[:, :, k].T + 100.0) / 500.0, 0.0, 1.0)
            img = Image.fromarray(sl).resize((size, size), Image.BILINEAR)
            m = Image.fromarray(((lab[:, :, k].T == 1) | (lab[:, :, k].T == 2)).astype(np.uint8)).resize((size, size), Image.NEAREST)
            images.append(np.asarray(img))
            masks.append(np.asarray(m))
secs = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{len(images)} {secs:.3f} {len(images) / secs:.1f} {rss:.0f}")
