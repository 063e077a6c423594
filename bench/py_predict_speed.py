"""The smp side of `bench/run.sh predict`: the same model, the same volume,
the same steps as `liverseg predict --no-mirror --no-largest-component`.

    py_predict_speed.py setup DIR [SLICES] [SIZE]   model (smp's init, seed 0) and a 512x512xSLICES CT volume
    py_predict_speed.py smp DIR fp32|bf16 [BATCH]   segment it with smp; prints "slices seconds"
    py_predict_speed.py agree A.nii.gz B.nii.gz     voxel agreement and Dice of two masks

Steps per slice, as liverseg does them: window [-100, 400] HU to 0..1,
bilinear (antialiased) resize to SIZE², quantised to 8 bits and /255, the
network (bf16: autocast and channels-last), softmax, the liver probability
resized bilinearly back to 512², threshold 0.5. Writing the NIfTI is timed.
"""
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def setup(out, slices=100, size=224):
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    out = Path(out)
    (out / "model").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = smp.DeepLabV3Plus("resnet34", encoder_weights=None, in_channels=1, classes=2)
    # Random init leaves running statistics at 0/1; a few training-mode passes
    # give them realistic values so that inference exercises them.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, size, size))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model" / "model.safetensors"))
    card = {
        "spec": {"arch": "deeplabv3plus", "encoder": "resnet34", "in_channels": 1, "classes": 2},
        "size": size, "unit": "HU", "window": [-100.0, 400.0], "minmax_8bit": False,
        "parameters": sum(p.numel() for p in model.parameters()), "best_epoch": 0,
        "best_val_loss": 0.0, "train_stage_key": "smp-seed0",
    }
    (out / "model" / "model.json").write_text(json.dumps(card, indent=2))
    # A body-like volume: an ellipse of soft tissue with a brighter organ, noise.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((xx - 256) / 200) ** 2 + ((yy - 256) / 150) ** 2 < 1
    organ = ((xx - 200) / 80) ** 2 + ((yy - 230) / 60) ** 2 < 1
    vol = np.full((512, 512, slices), -1000, np.int16)
    for k in range(slices):
        s = np.where(body, 40, -1000) + np.where(organ, 60 + k % 7, 0) + rng.normal(0, 15, (512, 512))
        vol[:, :, k] = s.T.astype(np.int16)
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), str(out / "volume.nii.gz"))


def segment(directory, precision, batch=8):
    import segmentation_models_pytorch as smp
    from safetensors.torch import load_file

    directory = Path(directory)
    card = json.loads((directory / "model" / "model.json").read_text())
    size = card["size"]
    model = smp.DeepLabV3Plus("resnet34", encoder_weights=None, in_channels=1, classes=2)
    model.load_state_dict(load_file(str(directory / "model" / "model.safetensors")))
    model.eval()
    bf16 = precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    img = nib.load(str(directory / "volume.nii.gz"))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    lo, hi = card["window"]
    # [slices, rows, cols]: NIfTI x is a slice's column.
    x = torch.from_numpy(np.clip((vol - lo) / (hi - lo), 0, 1)).permute(2, 1, 0).unsqueeze(1)
    n, rows, cols = x.shape[0], x.shape[2], x.shape[3]
    mask = np.zeros((n, rows, cols), np.uint8)
    with torch.inference_mode():
        for s in range(0, n, batch):
            xb = F.interpolate(x[s:s + batch], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            xb = torch.round(xb * 255) / 255
            if bf16:
                xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(xb)
            else:
                logits = model(xb)
            p = logits.float().softmax(1)[:, 1:2]
            p = F.interpolate(p, size=(rows, cols), mode="bilinear", align_corners=False)
            mask[s:s + batch] = (p[:, 0] > 0.5).numpy()
    out = directory / f"smp_{precision}_liver.nii.gz"
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), img.affine), str(out))
    print(n, f"{time.perf_counter() - t0:.3f}")


def agree(a, b):
    ma = np.asarray(nib.load(a).dataobj) > 0
    mb = np.asarray(nib.load(b).dataobj) > 0
    dice = 2 * (ma & mb).sum() / max(ma.sum() + mb.sum(), 1)
    print(f"{(ma == mb).mean():.5f} {dice:.5f}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "setup":
        setup(args[0], *map(int, args[1:]))
    elif cmd == "smp":
        segment(args[0], args[1], *map(int, args[2:]))
    elif cmd == "agree":
        agree(*args)
    else:
        sys.exit(__doc__)
